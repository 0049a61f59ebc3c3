"""bench/step.py's release-style baseline computes our models' function at the release's cost, and the
benchmark runs end to end at a tiny size (numbers only: no timing is asserted)."""
import json
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import release_style  # noqa: E402

from nas_core.models import create_model  # noqa: E402
from nas_core.search_space import Genotype  # noqa: E402


def _load_into_release(ours: torch.nn.Module, release: torch.nn.Module) -> None:
    missing, unexpected = release.load_state_dict(ours.state_dict(), strict=False)
    assert not unexpected
    # everything but the release's Zero convs (1x1 convs whose output is multiplied by 0) is shared
    assert missing and all(".zero." in k for k in missing), missing


@pytest.mark.parametrize("zero_op", ["paper", "code"])
def test_release_supernet_is_the_reference_supernet(zero_op):
    torch.manual_seed(0)
    ours = create_model("nas-scam-p", supernet="synchronous", impl="reference", zero_op=zero_op).double().eval()
    release = release_style.ReleaseSupernet("parallel", zero_op=zero_op).double().eval()
    with torch.no_grad():  # alpha far from uniform, so a column mix-up would show
        ours.alpha_sam.copy_(torch.randn_like(ours.alpha_sam))
        ours.alpha_cam.copy_(torch.randn_like(ours.alpha_cam))
    _load_into_release(ours, release)
    n_zero = sum(1 for k in release.state_dict() if ".zero." in k and k.endswith("weight"))
    assert n_zero == 8 * 2 * 6  # every slot, both cells, every edge holds a real Zero conv
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        got, want = release(x), ours(x)
    assert got.shape == (2, 4, 32, 32)
    assert float(got.min()) > 0 and float(got.max()) < 1
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_release_zero_conv_is_back_propagated_to_zero_gradient():
    torch.manual_seed(1)
    net = release_style.ReleaseSupernet("parallel").eval()
    net(torch.rand(1, 3, 32, 32)).mean().backward()
    zero_conv = net.attention["down1"].sam.cell.ops[0]["zero"]
    # computed and back-propagated (a gradient tensor exists), contributing nothing (all zero)
    assert zero_conv.weight.grad is not None and float(zero_conv.weight.grad.abs().max()) == 0.0
    assert float(net.alpha_sam.grad.abs().max()) > 0


def test_release_fixed_net_is_our_fixed_net():
    torch.manual_seed(2)
    geno = Genotype.uniform("parallel", "synchronous", "conv3", "conv9")
    ours = create_model("nas-scam-p", genotype=geno).double().eval()
    release = release_style.ReleaseFixedNet(geno).double().eval()
    assert release.load_state_dict(ours.state_dict())  # no Zero edge: the same parameters, strictly
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    torch.testing.assert_close(release(x), ours(x), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("combine", ["parallel", "serial"])
@pytest.mark.parametrize("zero_op", ["paper", "code"])
def test_release_fixed_net_runs_what_ours_prunes_and_computes_the_same(zero_op, combine):
    """A searched genotype has Zero edges and dead nodes: the release builds and runs them (Zero as a
    zeroed conv, ops into a node that never reaches the output), ours builds neither; same function."""
    torch.manual_seed(3)
    # SAM: node 2 is dead (its only way out, 2 -> 3, is Zero); CAM: Zero edges into hidden and output nodes
    sam = ("conv3", "conv1", "atrous5", "conv1", "conv3", "zero")
    cam = ("zero", "conv9", "conv15", "zero", "atrous3", "conv5")
    geno = Genotype(combine, "synchronous", (sam,) * 8, (cam,) * 8)
    ours = create_model(f"nas-scam-{combine[0]}", genotype=geno, zero_op=zero_op).double().eval()
    release = release_style.ReleaseFixedNet(geno, zero_op=zero_op).double().eval()
    missing, unexpected = release.load_state_dict(ours.state_dict(), strict=False)
    assert not unexpected
    # per slot: the SAM Zero conv, the two SAM ops into dead node 2 (conv + BN), the two CAM Zero convs
    assert {k.split(".", 2)[2].rsplit(".", 1)[0] for k in missing} == {
        "sam.cell.ops.5.zero", "sam.cell.ops.1.conv1.0", "sam.cell.ops.1.conv1.1",
        "sam.cell.ops.2.atrous5.0", "sam.cell.ops.2.atrous5.1", "cam.cell.ops.0.zero", "cam.cell.ops.3.zero"}
    state = release.state_dict()
    with torch.no_grad():  # the release's ops ours skips get weights that would show if they leaked
        for k in missing:
            if state[k].is_floating_point():
                state[k].copy_(torch.rand_like(state[k]) + 0.5)  # positive: a valid running_var too
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    torch.testing.assert_close(release(x), ours(x), rtol=1e-10, atol=1e-12)


def test_release_adam_is_per_tensor():
    opt = release_style.release_adam([torch.nn.Parameter(torch.zeros(2))], 1e-3)
    assert opt.defaults["foreach"] is False and opt.defaults["fused"] is False


@pytest.mark.slow  # half a minute on a shared CPU
def test_step_bench_runs_tiny_and_reports_ratios_against_the_release(tmp_path):
    import step

    out_json = tmp_path / "step.json"
    out = step.main(["--size", "32", "--batches", "2", "--reps", "1", "--threads", "1", "--no-flops",
                     "--no-memory", "--kinds", "release-style fixed", "unet", "supernet release-style",
                     "supernet straightforward", "supernet stacked", "--json", str(out_json)])
    saved = json.loads(out_json.read_text())
    assert saved["size"] == 32 and saved["amp"] is False  # CPU: no autocast
    assert saved["genotype"] == "uniform conv3/conv9"
    kinds = {(r["what"], r["kind"]) for r in saved["rows"]}
    assert kinds == {("train", "release-style fixed"), ("train", "unet"), ("train", "supernet stacked"),
                     ("search", "supernet release-style"), ("search", "supernet straightforward"),
                     ("search", "supernet stacked")}
    assert all(r["median_s"] > 0 and r["crops_per_s"] > 0 for r in saved["rows"])
    pairs = {(r["kind"], r["baseline"]) for r in saved["ratios"]}
    assert ("supernet stacked", "supernet release-style") in pairs
    assert ("supernet stacked", "supernet straightforward") in pairs
    assert ("unet", "release-style fixed") in pairs
    for r in saved["ratios"]:
        rows = {(x["kind"], x["batch"]): x for x in saved["rows"] if x["what"] == r["what"]}
        expect = rows[(r["baseline"], 2)]["median_s"] / rows[(r["kind"], 2)]["median_s"]
        assert r["speedup"] == pytest.approx(expect)
    assert len(out["rows"]) == 6


def test_step_bench_fixed_rows_take_a_searched_genotype(tmp_path, capsys):
    """--genotype: both fixed rows build that genotype (a serial one builds NAS-SCAM-S), FLOPs counted."""
    import step

    sam = ("conv3", "zero", "atrous5", "conv1", "zero", "conv5")
    path = Genotype("serial", "shared", (sam,) * 8, (("conv9",) * 6,) * 8).save(tmp_path / "genotype.json")
    out = step.main(["--size", "32", "--batches", "1", "--reps", "1", "--threads", "1", "--no-memory",
                     "--rows", "train", "--kinds", "release-style fixed", "nas-scam-p fixed",
                     "--genotype", str(path)])
    assert out["genotype"] == str(path) and [r["kind"] for r in out["rows"]] == ["release-style fixed",
                                                                               "nas-scam-p fixed"]
    assert "(serial, 16 Zero edges of 96)" in capsys.readouterr().out
    # the models the rows time: our NAS-SCAM-S of that genotype, the release's build of it with Zero convs
    geno = Genotype.load(path)
    ours, _ = step.build("nas-scam-p fixed", torch.device("cpu"), False, genotype=geno)
    assert ours.model_spec["name"] == "nas-scam-s" and ours.model_spec["options"]["genotype"] == geno.to_dict()
    release, _ = step.build("release-style fixed", torch.device("cpu"), False, genotype=geno)
    assert {m.combine for m in release.attention.values()} == {"serial"}
    assert sum(1 for k in release.state_dict() if ".zero." in k and k.endswith("weight")) == 16
    # both rows are credited with the same useful work, that of the genotype (not the uniform default)
    uniform = step.main(["--size", "32", "--batches", "1", "--reps", "1", "--threads", "1", "--no-memory",
                         "--rows", "train", "--kinds", "nas-scam-p fixed"])
    assert out["rows"][0]["gflop"] == pytest.approx(out["rows"][1]["gflop"]) and out["rows"][0]["gflop"] > 0
    assert out["rows"][1]["gflop"] != pytest.approx(uniform["rows"][0]["gflop"], rel=1e-3)
    for bad in (tmp_path / "nope.json", tmp_path):  # missing; a folder
        with pytest.raises(SystemExit, match=f"--genotype {bad}"):
            step.main(["--size", "32", "--batches", "1", "--rows", "train", "--genotype", str(bad)])
