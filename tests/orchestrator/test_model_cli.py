import json

import pytest

from nas_core.models import BUILDERS, create_model
from nas_core.search_space import N_SLOTS, Genotype
from orchestrator.cli import main
from orchestrator.commands.model import MODEL_NAMES

CLI_CASES = [
    ["unet"], ["deeplabv3plus"], ["cbam"], ["scse"],
    ["nas-scam-s", "--supernet", "synchronous"], ["nas-scam-p", "--supernet", "shared", "--zero-op", "code"],
]


def run_json(capsys, args):
    assert main(["model", "info", *args, "--size", "32", "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_cli_names_match_the_registry():
    assert MODEL_NAMES == list(BUILDERS)


@pytest.mark.parametrize("args", CLI_CASES, ids=["_".join(a) for a in CLI_CASES])
def test_model_info_json_for_every_registry_model(capsys, args):
    info = run_json(capsys, args)
    options = {k.lstrip("-").replace("-", "_"): v for k, v in zip(args[1::2], args[2::2])}
    model = create_model(args[0], **options)
    assert info["params_total"] == sum(p.numel() for p in model.parameters())
    assert info["output_shape"] == [1, 4, 32, 32] and info["input_shape"] == [1, 3, 32, 32]
    assert info["flops"] > 0
    if args[0] == "deeplabv3plus":
        assert info["params_attention"] is None
    else:
        assert info["params_attention"] == sum(p.numel() for p in model.attention.parameters())
    if "--supernet" in args:
        prefix = [N_SLOTS] if args[2] == "synchronous" else []
        assert info["alpha_shapes"] == {"sam": prefix + [6, 6], "cam": prefix + [6, 8]}
        assert info["params_arch"] == sum(p.numel() for p in model.arch_parameters())
        assert info["options"]["zero_op"] == options.get("zero_op", "paper")
    else:
        assert info["alpha_shapes"] == {} and info["params_arch"] == 0


def test_flops_scale_with_pixels(capsys):
    # every op of the plain U-Net is a conv, so FLOPs grow exactly with H*W
    small = run_json(capsys, ["unet"])["flops"]
    assert main(["model", "info", "unet", "--size", "64", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["flops"] == 4 * small


def test_model_info_text_with_a_genotype_file(capsys, tmp_path):
    row_sam = ("conv3", "zero", "conv5", "atrous3", "conv1", "atrous5")
    row_cam = ("conv15", "conv9", "atrous5", "zero", "conv3", "conv1")
    g = Genotype("serial", "synchronous", (row_sam,) * N_SLOTS, (row_cam,) * N_SLOTS)
    path = g.save(tmp_path / "geno.json")
    assert main(["model", "info", "nas-scam-s", "--genotype", str(path), "--size", "32"]) == 0
    out = capsys.readouterr().out
    expected = create_model("nas-scam-s", genotype=g)
    total = sum(p.numel() for p in expected.parameters())
    attention = sum(p.numel() for p in expected.attention.parameters())
    assert f"parameters        {total:,}" in out
    assert f"attention params  {attention:,}" in out
    assert "genotype=serial/synchronous" in out and "(1, 4, 32, 32)" in out and "GFLOPs" in out
    info = run_json(capsys, ["nas-scam-s", "--genotype", str(path), "--zero-op", "code"])
    assert info["options"]["genotype"] == g.to_dict() and info["options"]["zero_op"] == "code"


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["resnet"], "valid names: unet, deeplabv3plus"),
        (["nas-scam-p"], "exactly one of supernet="),
        (["unet", "--supernet", "shared"], "unknown option 'supernet' for model 'unet'"),
        (["nas-scam-s", "--genotype", "/nonexistent/g.json"], "/nonexistent/g.json does not exist"),
        (["unet", "--size", "40"], "--size must be a positive multiple of 16"),
    ],
)
def test_model_info_user_errors_exit_2_with_one_line(capsys, args, fragment):
    assert main(["model", "info", *args]) == 2
    err = capsys.readouterr().err
    assert fragment in err and err.count("\n") == 1
