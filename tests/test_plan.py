"""`nas-scam ablate SPEC --plan`: what will run, before anything runs (no Ray, no MLflow run)."""

import json
from pathlib import Path

import pytest

from orchestrator.cli import main
from orchestrator.plan import trial_list
from orchestrator.specs import parse_spec

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ["ablate", str(ROOT / "experiments" / "table2.yaml"), "--preset", "smoke",
         "--methods", "unet,nas-scam-p-sync", "--seeds", "2", "--plan"]


def test_trial_list_follows_the_repeat_scope():
    retrain = parse_spec({"seeds": 3})
    assert len(trial_list(retrain)) == 4 + 8 * 3  # one search per NAS method, then every seed retrains
    assert [t for t in trial_list(retrain) if t[0] == "search"] == [
        ("search", m, 0) for m in ("nas-scam-s-shared", "nas-scam-p-shared", "nas-scam-s-sync", "nas-scam-p-sync")]
    full = parse_spec({"seeds": 3, "repeat": "full"})
    assert len(trial_list(full)) == (8 + 4) * 3
    assert ("search", "nas-scam-p-sync", 2) in trial_list(full)


def _plan(capsys, *extra):
    assert main([*SMOKE, *extra]) == 0
    return capsys.readouterr().out


@pytest.mark.slow  # counting the supernet's FLOPs takes tens of seconds on a busy 2-core machine
def test_plan_prints_trials_and_numbers_without_running(home, capsys):
    text = _plan(capsys)
    assert "Plan of ablation 'table2': protocol paper, preset smoke" in text
    assert "stain         macenko" in text and "population std (ddof=0)" in text and "precision     float32" in text
    assert "data.split: '120,39,50' -> '0.6,0.2,0.2'" in text  # the preset's diff against the paper table
    assert "crops per epoch: train" in text and "iterations per epoch: w 4, alpha 4, train 8" in text
    assert "FLOP/s measured now on cpu" in text
    assert "trials (5):" in text and "search  nas-scam-p-sync  0" in text
    # nothing ran: no MLflow store, no run folder
    assert not (home / "mlflow").exists() and not (home / "runs").exists()

    p = json.loads(_plan(capsys, "--json"))
    assert [(t["phase"], t["method"], t["seed"]) for t in p["trials"]] == [
        ("search", "nas-scam-p-sync", 0), ("train", "unet", 0), ("train", "unet", 1),
        ("train", "nas-scam-p-sync", 0), ("train", "nas-scam-p-sync", 1)]
    search, unet = p["trials"][0], p["trials"][1]
    # paper: 1 warm-up epoch of 4 w steps, then 2 epochs of 4 (w step + alpha step)
    assert search["steps"] == {"w": 12, "alpha": 8} and search["iterations_per_epoch"] == {"w": 4, "alpha": 4}
    assert unet["steps"] == {"w": 4 * 8, "alpha": 0} and unet["batch"] == 4
    buckets = p["data"][0]["bucket_sizes"]
    # an epoch draws from the bucketed crops (windows with a nucleus): all training buckets, and the
    # alpha-update buckets built from the validation images' windows
    assert unet["crops_per_epoch"]["train"] == sum(buckets.values())
    assert 0 < unet["crops_per_epoch"]["alpha"] <= p["data"][0]["crops"]["val"]
    # the supernet costs more per step than the U-Net, and every estimate is FLOPs / the measured rate
    assert search["flops"] / 20 > unet["flops"] / 32 > 0
    for t in p["trials"]:
        assert t["time_s"] == pytest.approx(t["flops"] / p["rate"]["flops_per_s"])
        assert set(t["overrides"]) == set(p["common_overrides"])  # only the preset's changes, no others
    assert p["totals"]["flops"] == sum(t["flops"] for t in p["trials"])


@pytest.mark.slow
def test_plan_of_the_code_protocol_shows_the_release(home, capsys):
    p = json.loads(_plan(capsys, "--json", "--set", "protocol=code"))
    assert p["protocol"] == "code"
    lines = {x["item"]: x["value"] for x in p["protocol_lines"]}
    assert lines["stain"] == "none" and lines["loss"].startswith("exp_log_dice")
    assert "alternation per epoch" in lines["search"] and "lr w 0.001 / alpha 0.001" in lines["search"]
    assert "Adam rebuilt every epoch" in lines["search"] and lines["retrain"].startswith("4 epochs, lr 0.001")
    assert p["common_overrides"]["data.split"] == ["120,41,48", "0.6,0.2,0.2"]
    # code: warm-up epoch 0 (w), then epochs 1 and 2 are alpha-epochs (epoch % 3 != 0)
    assert p["trials"][0]["steps"] == {"w": 4, "alpha": 8}


def test_json_needs_plan(home, capsys):
    assert main([*SMOKE[:-1], "--json"]) == 2
    assert "--json goes with --plan" in capsys.readouterr().err
