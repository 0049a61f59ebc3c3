"""Figures: they render from the engine's files, for both search forms, and say what they show."""
import numpy as np
import pandas as pd
import pytest

from nas_core.search_space.ops import OP_TABLES, edge_list
from orchestrator import figures, tables
from orchestrator.specs import load_spec


def _npz(path, slots):
    rng = np.random.default_rng(0)
    arrays = {"epochs": np.arange(3)}
    for kind, ops in OP_TABLES.items():
        shape = (3, slots, len(edge_list()), len(ops)) if slots else (3, len(edge_list()), len(ops))
        a = rng.random(shape)
        arrays[kind] = a / a.sum(-1, keepdims=True)
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("slots, expected", [(8, 8), (0, 1)], ids=["synchronous", "shared"])
def test_alpha_figures_for_both_search_forms(tmp_path, slots, expected):
    npz = _npz(tmp_path / "alpha_history.npz", slots)
    assert figures.alpha_slots(npz) == expected
    for path in (figures.alpha_heatmap(npz, tmp_path / "final.png"),
                 figures.alpha_figure(npz, tmp_path / "evo.png", slot=expected - 1)):
        assert path.read_bytes()[:4] == b"\x89PNG"


def test_genotype_figure_draws_every_slot(tmp_path):
    row_sam = ["conv3", "zero", "atrous5", "conv1", "conv5", "atrous3"]
    row_cam = ["conv15", "conv9", "zero", "conv1", "atrous5", "conv3"]
    geno = {"combine": "parallel", "search": "synchronous", "sam": [row_sam] * 8, "cam": [row_cam] * 8}
    assert figures.genotype_figure(geno, tmp_path / "g.png").read_bytes()[:4] == b"\x89PNG"


def test_table2_figure_title_names_data_protocol_seeds_and_scope(tmp_path, monkeypatch):
    spec = load_spec(str(tables.REFERENCE_CSV.parent / "table2.yaml"), preset="smoke", seeds=2,
                     methods=["unet", "nas-scam-p-sync"])
    text = tables.describe(spec)
    assert text == ("data: synthetic data, smoke preset | protocol: paper | seeds: 0, 1 (n=2) | "
                    "repeat: retrain (one search (seed 0), a retrain per seed)")
    records = [{"method": "unet", "seed": s, **{c: v for c, v in zip(tables.CLASSES, (.1, .02, .3, .0, .5))}}
               for s in (0, 1)]
    records[1]["Epithelial"] = 0.2  # a std larger than the mean: the error bar must go below 0
    table = tables.compare(tables.summarize(records, "sample"))
    seen = {}
    import matplotlib.figure

    def spy(self, *a, **k):  # read the figure as drawn, just before the file is written
        (ax,) = self.axes
        seen["size"] = tuple(self.get_size_inches())
        seen["ylim"] = ax.get_ylim()
        seen["xticks"] = [t.get_text() for t in ax.get_xticklabels()]
        seen["title"] = ax.get_title()
        seen["labels"] = [t.get_text() for legend in self.legends for t in legend.get_texts()]
        seen["fonts"] = min(t.get_fontsize() for t in [ax.title, *ax.get_xticklabels(), *ax.get_yticklabels(),
                                                       *[t for legend in self.legends for t in legend.get_texts()]])
        return original(self, *a, **k)

    original = matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", spy)
    tables.bar_chart(table, tmp_path / "t2.png", "Table 2 (smoke)", "sample", "retrain", text)
    epi = table[table["class"] == "Epithelial"].iloc[0]
    # slide-ready: 16:9, no text under 11 pt; the methods side by side per class, Average first
    assert abs(seen["size"][0] / seen["size"][1] - 16 / 9) < 0.01 and seen["fonts"] >= 11
    assert seen["xticks"] == list(tables.CLASSES)
    assert seen["ylim"][0] < epi["mean"] - epi["std"] < 0  # an error bar below 0 is drawn whole
    assert seen["labels"] == ["U-Net (n=2)", "paper (mean, 3 runs)"]
    # title, then data/protocol/seeds/scope on one line (repeat said once; the std kind is on the y axis)
    first, *rest = seen["title"].split("\n")
    assert first == "Table 2 (smoke)" and " ".join(rest) == text and seen["title"].count("repeat") == 1
