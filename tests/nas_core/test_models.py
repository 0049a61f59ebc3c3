import json

import pytest
import torch

from nas_core.models import (
    BUILDERS,
    CBAM,
    NASCAM,
    NASSAM,
    NASSCAM,
    SCSE,
    ModelError,
    NASSCAMSupernet,
    create_model,
)
from nas_core.search_space import CAM_OPS, N_SLOTS, SAM_OPS, Genotype, GenotypeError, num_edges

# a genotype with a mix of ops and no dead nodes, so every built weight is used
ROW_SAM = ("conv3", "zero", "conv5", "atrous3", "conv1", "atrous5")
ROW_CAM = ("conv15", "conv9", "atrous5", "zero", "conv3", "conv1")


def fixed_genotype(combine: str, search: str = "synchronous") -> Genotype:
    return Genotype(combine, search, (ROW_SAM,) * N_SLOTS, (ROW_CAM,) * N_SLOTS)


CASES = [
    ("unet", {}),
    ("deeplabv3plus", {}),
    ("cbam", {}),
    ("scse", {}),
    ("nas-scam-s", {"supernet": "synchronous"}),
    ("nas-scam-s", {"supernet": "shared", "zero_op": "code"}),
    ("nas-scam-p", {"supernet": "synchronous"}),
    ("nas-scam-p", {"supernet": "shared"}),
    ("nas-scam-s", {"genotype": fixed_genotype("serial")}),
    ("nas-scam-p", {"genotype": fixed_genotype("parallel").to_dict(), "zero_op": "code"}),
]
IDS = ["unet", "deeplabv3plus", "cbam", "scse", "s-sync", "s-shared-code", "p-sync", "p-shared",
       "s-fixed", "p-fixed-dict-code"]


def test_cases_cover_the_registry():
    assert {name for name, _ in CASES} == set(BUILDERS)


@pytest.mark.parametrize("name, options", CASES, ids=IDS)
def test_forward_backward_and_parameter_split(name, options):
    torch.manual_seed(0)
    model = create_model(name, **options)
    x = torch.rand(2, 3, 32, 32)
    y = model(x)
    assert y.shape == (2, 4, 32, 32) and y.dtype == torch.float32
    assert 0 <= y.min() and y.max() <= 1
    y.pow(2).mean().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{pname} got no gradient"
        assert torch.isfinite(p.grad).all(), pname
    arch, weights = model.arch_parameters(), model.weight_parameters()
    assert {id(p) for p in arch} | {id(p) for p in weights} == {id(p) for p in model.parameters()}
    assert not {id(p) for p in arch} & {id(p) for p in weights}
    assert len(arch) == (2 if "supernet" in options else 0)
    for a in arch:
        assert a.grad.abs().sum() > 0  # alpha receives a real gradient


@pytest.mark.parametrize("name, options", CASES, ids=IDS)
def test_model_spec_rebuilds_the_same_architecture(name, options):
    model = create_model(name, **options)
    spec = json.loads(json.dumps(model.model_spec))  # JSON-serialisable, as a checkpoint stores it
    assert spec["name"] == name
    rebuilt = create_model(spec["name"], **spec["options"])
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()}
    assert rebuilt.model_spec == spec


@pytest.mark.parametrize("name", list(BUILDERS))
def test_input_size_must_be_a_multiple_of_16(name):
    options = {"supernet": "shared"} if name.startswith("nas-scam") else {}
    model = create_model(name, **options)
    with pytest.raises(ValueError, match="multiples of 16, got 40x32"):
        model(torch.rand(1, 3, 40, 32))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model(torch.rand(1, 1, 32, 32))


def test_unet_slots_channels_and_placement():
    model = create_model("scse")
    assert list(model.attention) == ["down1", "down2", "down3", "down4", "up1", "up2", "up3", "up4"]
    seen = {}
    for name, module in model.attention.items():
        module.register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, tuple(i[0].shape)))
    model(torch.rand(1, 3, 64, 64))
    # down slots sit after the pool: C = 32..256 at H/2..H/16; up slots deep -> shallow
    assert seen == {
        "down1": (1, 32, 32, 32), "down2": (1, 64, 16, 16), "down3": (1, 128, 8, 8), "down4": (1, 256, 4, 4),
        "up1": (1, 128, 8, 8), "up2": (1, 64, 16, 16), "up3": (1, 32, 32, 32), "up4": (1, 16, 64, 64),
    }
    norms = [m for m in model.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(m.num_groups == 4 for m in norms)
    assert sum(p.numel() for p in create_model("unet").attention.parameters()) == 0


def test_deeplab_output_stride_16_and_low_level_48():
    model = create_model("deeplabv3plus")
    seen = {}
    model.aspp.register_forward_hook(lambda m, i, o: seen.__setitem__("aspp", tuple(i[0].shape)))
    model.low_level.register_forward_hook(lambda m, i, o: seen.__setitem__("low", tuple(o.shape)))
    model(torch.rand(1, 3, 64, 64))
    assert seen["aspp"][-2:] == (4, 4)
    assert seen["low"] == (1, 48, 16, 16)
    rates = [b[0].dilation[0] for b in model.aspp.branches[1:]]
    assert rates == [6, 12, 18]


@pytest.mark.parametrize("search, prefix", [("synchronous", (N_SLOTS,)), ("shared", ())])
def test_supernet_alpha_shapes_init_and_state_dict(search, prefix):
    torch.manual_seed(0)
    model = create_model("nas-scam-p", supernet=search)
    e = num_edges(3)
    assert model.alphas()["sam"].shape == (*prefix, e, len(SAM_OPS))
    assert model.alphas()["cam"].shape == (*prefix, e, len(CAM_OPS))
    state = model.state_dict()
    assert torch.equal(state["alpha_sam"], model.alpha_sam.detach())
    assert "alpha_cam" in state
    assert 0 < model.alpha_sam.std() < 1e-2  # 1e-3 * N(0, 1)


@pytest.mark.parametrize("search", ["synchronous", "shared"])
def test_genotype_argmax_picks_the_largest_alpha(search):
    model = create_model("nas-scam-s", supernet=search)
    sam_names, cam_names = list(SAM_OPS), list(CAM_OPS)
    with torch.no_grad():
        model.alpha_sam.zero_()
        model.alpha_cam.zero_()
        if search == "synchronous":
            for s in range(N_SLOTS):
                for e in range(6):
                    model.alpha_sam[s, e, (s + e) % 6] = 1.0
                    model.alpha_cam[s, e, (s * e) % 8] = 1.0
        else:
            model.alpha_sam[:, 4] = 1.0
            model.alpha_cam[2, 0] = 2.0  # zero wins on one edge: Zero is a candidate like any other
            model.alpha_cam[[0, 1, 3, 4, 5], 5] = 1.0
    g = model.genotype()
    assert (g.combine, g.search) == ("serial", search)
    if search == "synchronous":
        assert g.sam[3] == tuple(sam_names[(3 + e) % 6] for e in range(6))
        assert g.cam[2] == tuple(cam_names[(2 * e) % 8] for e in range(6))
    else:
        assert len(set(g.sam)) == 1 and len(set(g.cam)) == 1 and len(g.sam) == N_SLOTS
        assert g.sam[0] == ("atrous3",) * 6
        assert g.cam[5] == ("conv15", "conv15", "zero", "conv15", "conv15", "conv15")


@pytest.mark.parametrize("combine", ["parallel", "serial"])
def test_supernet_to_genotype_to_fixed_net(tmp_path, combine):
    name = f"nas-scam-{combine[0]}"
    g = create_model(name, supernet="synchronous").genotype()
    path = g.save(tmp_path / "g.json")
    fixed = create_model(name, genotype=str(path))
    assert fixed.model_spec["options"]["genotype"] == g.to_dict()
    assert fixed(torch.rand(1, 3, 32, 32)).shape == (1, 4, 32, 32)
    assert fixed.arch_parameters() == []


@pytest.mark.parametrize("module_cls", [NASSAM, NASCAM])
def test_all_zero_attention_gives_zero_or_half_of_the_input(module_cls):
    x = torch.randn(2, 8, 16, 16)
    paper = module_cls(8, ("zero",) * 6, zero_op="paper")
    code = module_cls(8, ("zero",) * 6, zero_op="code")
    assert torch.equal(paper(x), 0 * x)
    assert torch.equal(code(x), 0.5 * x)


@pytest.mark.parametrize("combine", ["parallel", "serial"])
def test_joint_module_combination_rule(combine):
    torch.manual_seed(0)
    module = NASSCAM(8, combine, ROW_SAM, ROW_CAM).eval()
    x = torch.randn(2, 8, 16, 16)
    expected = (torch.maximum(module.sam(x), module.cam(x)) if combine == "parallel"
                else module.cam(module.sam(x)))
    assert torch.equal(module(x), expected)
    assert not torch.equal(module.sam(x), module.cam(x))  # the rule is actually exercised
    zeros = NASSCAM(8, combine, ("zero",) * 6, ("zero",) * 6, zero_op="code")
    assert torch.allclose(zeros(x), (0.5 if combine == "parallel" else 0.25) * x)


def test_cam_parameter_count_does_not_depend_on_channels():
    count = lambda c: sum(p.numel() for p in NASCAM(c).parameters())  # noqa: E731
    assert count(16) == count(256)
    assert sum(p.numel() for p in NASSAM(16).parameters()) < sum(p.numel() for p in NASSAM(256).parameters())


@pytest.mark.parametrize("module_cls", [CBAM, SCSE])
@pytest.mark.parametrize("channels", [1, 4, 32])
def test_baseline_attention_handles_tiny_channel_counts(module_cls, channels):
    module = module_cls(channels)
    x = torch.randn(2, channels, 8, 8)
    y = module(x)
    assert y.shape == x.shape
    y.sum().backward()
    assert all(p.grad is not None for p in module.parameters())


@pytest.mark.parametrize(
    "name, options, error, fragment",
    [
        ("resnet", {}, ModelError, "valid names: unet, deeplabv3plus, cbam, scse, nas-scam-s, nas-scam-p"),
        ("unet", {"depth": 5}, ModelError, "unknown option 'depth' for model 'unet'"),
        ("nas-scam-p", {"genotpye": "x"}, ModelError, "unknown option 'genotpye'"),
        ("nas-scam-p", {}, ModelError, "exactly one of supernet="),
        ("nas-scam-p", {"supernet": "shared", "genotype": fixed_genotype("parallel")}, ModelError, "exactly one"),
        ("nas-scam-p", {"supernet": "async"}, ModelError, "supernet 'async'"),
        ("nas-scam-s", {"genotype": fixed_genotype("parallel")}, ModelError, "needs a serial genotype"),
        ("nas-scam-p", {"supernet": "shared", "zero_op": "half"}, ModelError, "zero_op 'half'"),
        ("nas-scam-p", {"supernet": "shared", "impl": "fused"}, ModelError, "impl 'fused'"),
        ("nas-scam-p", {"genotype": {"format": 1}}, GenotypeError, "missing key 'combine'"),
        ("nas-scam-p", {"genotype": "/nonexistent/g.json"}, FileNotFoundError, "/nonexistent/g.json"),
    ],
)
def test_registry_errors_name_the_culprit(name, options, error, fragment):
    with pytest.raises(error) as info:
        create_model(name, **options)
    assert fragment in str(info.value)


def test_supernet_class_is_the_same_skeleton():
    model = create_model("nas-scam-p", supernet="shared")
    assert isinstance(model, NASSCAMSupernet)
    plain = create_model("unet")
    backbone = lambda m: {k: v.shape for k, v in m.state_dict().items()  # noqa: E731
                          if not k.startswith(("attention.", "alpha_"))}
    assert backbone(model) == backbone(plain)
