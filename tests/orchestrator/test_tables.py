import math

import pandas as pd
import pytest

from orchestrator import tables
from orchestrator.specs import METHODS, PAPER_METHODS


def _rec(method, seed, avg, epi, lym, mac, neu):
    return {"method": method, "seed": seed, "Average": avg, "Epithelial": epi, "Lymphocyte": lym,
            "Macrophage": mac, "Neutrophil": neu}


RECORDS = [
    _rec("unet", 0, 0.50, 0.70, 0.60, 0.20, 0.50),
    _rec("unet", 1, 0.60, 0.80, 0.70, 0.30, 0.60),
    _rec("unet", 2, 0.70, 0.75, 0.65, 0.40, 1.00),
    _rec("nas-scam-p-sync", 0, 0.65, 0.81, 0.77, 0.41, 0.61),
]


def test_mean_and_sample_std_by_hand():
    s = tables.summarize(RECORDS, std="sample").set_index(["method", "class"])
    # unet Average: 50, 60, 70 -> mean 60, sample std sqrt(((-10)^2 + 0 + 10^2) / 2) = 10
    assert s.loc[("unet", "Average"), "mean"] == pytest.approx(60.0)
    assert s.loc[("unet", "Average"), "std"] == pytest.approx(10.0)
    # Neutrophil: 50, 60, 100 -> mean 70, deviations -20, -10, 30 -> sqrt(1400 / 2)
    assert s.loc[("unet", "Neutrophil"), "mean"] == pytest.approx(70.0)
    assert s.loc[("unet", "Neutrophil"), "std"] == pytest.approx(math.sqrt(700.0))
    assert s.loc[("unet", "Epithelial"), "std"] == pytest.approx(5.0)
    assert int(s.loc[("unet", "Average"), "n"]) == 3
    # one seed: the sample std is undefined, never a misleading 0
    assert int(s.loc[("nas-scam-p-sync", "Average"), "n"]) == 1
    assert math.isnan(s.loc[("nas-scam-p-sync", "Average"), "std"])


def test_population_std_is_the_default_and_the_releases_np_std():
    s = tables.summarize(RECORDS).set_index(["method", "class"])
    # unet Average: 50, 60, 70 -> population std sqrt(200 / 3) (np.std, ddof=0)
    assert s.loc[("unet", "Average"), "std"] == pytest.approx(math.sqrt(200.0 / 3))
    # Neutrophil: deviations -20, -10, 30 -> sqrt(1400 / 3)
    assert s.loc[("unet", "Neutrophil"), "std"] == pytest.approx(math.sqrt(1400.0 / 3))
    assert math.isnan(s.loc[("nas-scam-p-sync", "Average"), "std"])  # one seed: no spread, not 0
    with pytest.raises(ValueError, match="std: 'ddof1'"):
        tables.summarize(RECORDS, std="ddof1")


def test_every_rendering_states_std_and_repeats(tmp_path):
    t = tables.compare(tables.summarize(RECORDS))
    for text in (tables.to_text(t, std="population", repeat="retrain"),
                 tables.to_markdown(t, std="population", repeat="retrain"),
                 tables.to_latex(t, std="population", repeat="retrain")):
        assert "population std (ddof=0)" in text and "repeat=retrain (one search per NAS method" in text
    assert "sample std (ddof=1)" in tables.to_text(t, std="sample", repeat="full")
    assert "repeat=full (a search and a retrain per seed)" in tables.to_text(t, std="sample", repeat="full")
    paths = tables.write_all(t, tmp_path, std="sample", repeat="full")
    back = pd.read_csv(paths["csv"])
    assert set(back["std_kind"]) == {"sample (ddof=1)"} and set(back["repeat"]) == {"full"}


def test_rows_follow_table2_order_and_duplicates_keep_last():
    recs = [RECORDS[3], *RECORDS[:3], _rec("unet", 2, 0.10, 0.10, 0.10, 0.10, 0.10)]
    s = tables.summarize(recs)
    assert list(dict.fromkeys(s["method"])) == ["unet", "nas-scam-p-sync"]
    assert list(s[s["method"] == "unet"]["class"]) == list(tables.CLASSES)
    # seed 2 re-reported: only its last value counts, n stays 3
    unet = s[(s["method"] == "unet") & (s["class"] == "Average")].iloc[0]
    assert unet["n"] == 3 and unet["mean"] == pytest.approx((50 + 60 + 10) / 3)


def test_reference_is_the_papers_table():
    ref = tables.load_reference()
    assert set(ref["method"]) == set(PAPER_METHODS)  # the random controls have no paper row
    assert len(ref) == len(PAPER_METHODS) * len(tables.CLASSES)
    row = ref[(ref["method"] == "nas-scam-p-sync") & (ref["class"] == "Average")].iloc[0]
    assert (row["mean"], row["std"]) == (65.01, 1.07)
    row = ref[(ref["method"] == "deeplabv3plus") & (ref["class"] == "Macrophage")].iloc[0]
    assert (row["mean"], row["std"]) == (33.61, 11.52)


def test_compare_difference_and_renderings(tmp_path):
    t = tables.compare(tables.summarize(RECORDS, std="sample"))
    unet_avg = t[(t["method"] == "unet") & (t["class"] == "Average")].iloc[0]
    assert unet_avg["paper_mean"] == 56.77 and unet_avg["diff"] == pytest.approx(60.0 - 56.77)
    assert unet_avg["label"] == "U-Net"
    text = tables.to_text(t, std="sample")
    assert "60.00 ± 10.00" in text and "56.77 ± 3.40" in text and "+3.23" in text and "ddof=1" in text
    md = tables.to_markdown(t, std="sample")
    assert md.count("\n| U-Net | 3 | ours |") == 1
    tex = tables.to_latex(t, std="sample")
    assert r"60.00 $\pm$ 10.00" in tex and r"\begin{tabular}" in tex
    paths = tables.write_all(t, tmp_path)
    assert all(p.exists() and p.stat().st_size > 0 for p in paths.values())
    back = pd.read_csv(paths["csv"])
    assert len(back) == 2 * len(tables.CLASSES)
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"
