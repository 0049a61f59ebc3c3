"""Learning curves and the "no learning" flag: decided from the history, shown in the log and Table 2."""

import logging
from types import SimpleNamespace

import pytest

from orchestrator import curves, tables
from orchestrator.phases import phase_figures


def _hist(vals, every=1):
    """Epochs 0..n-1 with a falling loss; val_dsc on every ``every``-th epoch from ``vals``."""
    out, it = [], iter(vals)
    for e in range(len(vals) * every):
        h = {"epoch": e, "train_loss": 1.0 / (e + 1)}
        if (e + 1) % every == 0:
            h["val_dsc"] = next(it)
        out.append(h)
    return out


@pytest.mark.parametrize("vals, warmup, expect", [
    ([0.0, 0.0, 0.0, 0.0], 1, True),
    ([0.3, 0.0, 0.0, 0.0], 1, True),        # learning before warm-up ended does not count
    ([0.0, 0.0, 0.0, 0.01], 1, False),      # one late validation above 0 is learning
    ([0.0, float("nan"), 0.0], 1, True),    # NaN: no class predicted anywhere
    ([0.0, 0.0], 2, False),                 # nothing validated after warm-up: no verdict
    ([], 0, False),
])
def test_no_learning(vals, warmup, expect):
    assert curves.no_learning(_hist(vals), warmup) is expect


def test_no_learning_skips_epochs_without_validation():
    h = _hist([0.0, 0.0, 0.2], every=3)  # validations at epochs 2, 5, 8
    assert curves.no_learning(h, 3) is False
    assert curves.no_learning(h[:6], 3) is True


def test_warmup_per_phase():
    cfg = SimpleNamespace(search=SimpleNamespace(warmup_epochs=7), train=SimpleNamespace(epochs=20))
    assert curves.warmup_epochs("search", cfg) == 7
    assert curves.warmup_epochs("train", cfg) == 5
    assert curves.train_warmup(2) == 1


@pytest.mark.parametrize("vals, flagged", [([0.0, 0.0, 0.0, 0.0], True), ([0.0, 0.1, 0.2, 0.3], False)])
def test_the_curve_is_written_flagged_and_warned_and_the_phase_hands_it_to_the_recorder(tmp_path, caplog, vals,
                                                                                          flagged):
    cfg = SimpleNamespace(search=SimpleNamespace(warmup_epochs=1), train=SimpleNamespace(epochs=4),
                          model=SimpleNamespace(genotype=None))
    out = tmp_path / "train__unet__seed0"
    result = SimpleNamespace(history=_hist(vals))
    with caplog.at_level(logging.WARNING, logger="orchestrator.curves"):
        png, got = curves.learning_curve("train", cfg, result, out)
    assert got is flagged and png == out / curves.FIGURE
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert ("train__unet__seed0: validation DSC stayed 0" in caplog.text) is flagged
    # what run_phase hands the recorder: the curve, and the flag as the run's tag
    made = phase_figures("train", cfg, result, out)
    assert made.paths == [png] and made.tags == ({"no_learning": "true"} if flagged else {})


def test_table_flags_a_method_that_did_not_learn():
    recs = [{"method": "unet", "seed": s, **{c: 0.4 for c in tables.CLASSES}, "no_learning": False} for s in (0, 1)]
    recs += [{"method": "cbam", "seed": s, **{c: 0.0 for c in tables.CLASSES}, "no_learning": s == 1} for s in (0, 1)]
    t = tables.with_flags(tables.compare(tables.summarize(recs)), recs)
    assert set(t.loc[t["method"] == "cbam", "flag"]) == {"no learning 1/2"}
    assert set(t.loc[t["method"] == "unet", "flag"]) == {""}
    text, md = tables.to_text(t), tables.to_markdown(t)
    assert "[no learning 1/2]" in text and "[no learning 1/2]" in md
    assert text.count("no learning") == 1
    # with folds a record is a fold's retrain, not one of the table's n replicates: the flag says so
    folded = [{**r, "fold": f} for r in recs for f in (0, 1)]
    t = tables.with_flags(tables.compare(tables.summarize(folded)), folded)
    assert set(t.loc[t["method"] == "cbam", "flag"]) == {"no learning 2/4 fold runs"}
