"""Figures a slide can show: the search's alpha figures (16:9, <= 4 panels, no text under 12 pt) in the
run folder and the report, learning curves titled by run with 1-based epochs, the overlay's legend."""
import json
import struct
from pathlib import Path
from types import SimpleNamespace

import matplotlib.figure
import matplotlib.text
import numpy as np
import pytest

from nas_core.classes import PALETTE
from nas_core.search_space.ops import OP_TABLES, edge_list
from orchestrator import curves, figures
from orchestrator.report import alpha_section, write_report


def _npz(path, slots, epochs=5):
    """A search's alpha_history.npz: ``slots`` slot-wise alpha sets (0: a shared search's one set)."""
    rng = np.random.default_rng(0)
    arrays = {"epochs": np.arange(epochs)}
    for kind, ops in OP_TABLES.items():
        shape = (epochs, slots, len(edge_list()), len(ops)) if slots else (epochs, len(edge_list()), len(ops))
        a = rng.random(shape)
        arrays[kind] = a / a.sum(-1, keepdims=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return path


def _png_size(path: Path) -> tuple[int, int]:
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    return struct.unpack(">II", data[16:24])


def _panels(fig) -> list:
    return [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]


class _Seen(dict):
    """What each figure showed when written, by file name: panels, smallest text, x ticks, titles, legend."""

    def spy(self, original):
        seen = self

        def savefig(fig, path, *a, **k):
            out = original(fig, path, *a, **k)  # drawn: tick labels and legends are laid out now
            texts = [t for t in fig.findobj(matplotlib.text.Text) if t.get_visible() and t.get_text().strip()]
            renderer = fig.canvas.get_renderer()
            seen[Path(path).name] = SimpleNamespace(
                panels=len(_panels(fig)), min_font=min(t.get_fontsize() for t in texts),
                xticks=[list(ax.get_xticks()) for ax in _panels(fig)], titles=[ax.get_title() for ax in fig.axes],
                legend_labels=[t.get_text() for lg in fig.legends for t in lg.get_texts()],
                legend_boxes=[lg.get_window_extent(renderer) for lg in fig.legends],
                axes_boxes=[ax.get_window_extent(renderer) for ax in fig.axes])
            return out

        return savefig


@pytest.fixture
def seen(monkeypatch):
    s = _Seen()
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", s.spy(matplotlib.figure.Figure.savefig))
    return s


@pytest.mark.parametrize("slots, count", [(8, 9), (0, 3)], ids=["synchronous", "shared"])
def test_search_figures_are_slides_in_out_dir(tmp_path, seen, slots, count):
    npz = _npz(tmp_path / "search__m__seed0" / "alpha_history.npz", slots)
    out = tmp_path / "search__m__seed0" / "figures"
    paths = figures.search_figures(npz, out)
    # the summary, then the final weights and the evolution in groups of at most four panels
    assert len(paths) == count and paths[0].name == "alpha_summary.png"
    assert figures.search_figures_in(out) == paths  # found again in the same reading order
    for p in paths:
        assert p.parent == out
        w, h = _png_size(p)
        assert abs((w / h) / (16 / 9) - 1) < 0.01, (p.name, w, h)
        shown = seen[p.name]
        assert 1 <= shown.panels <= figures.MAX_PANELS, p.name
        assert shown.min_font >= 12, (p.name, shown.min_font)
    for p in paths:
        if p.name.startswith("alpha_evolution"):
            for ticks in seen[p.name].xticks:  # epochs 1..5, integers, no epoch 0
                assert ticks == [1, 2, 3, 4, 5], (p.name, ticks)
            assert seen[p.name].legend_labels == list(dict.fromkeys(
                op for k in OP_TABLES if f"_{k}" in p.name or "sam-cam" in p.name for op in OP_TABLES[k]))
    if slots:  # each slot shows once per kind, by name
        titles = [t for p in paths if p.name.startswith("alpha_final") for t in seen[p.name].titles if t]
        assert sorted(titles) == sorted(f"{k.upper()} {s}" for k in OP_TABLES for s in figures.SLOT_NAMES)


def test_the_mlflow_names_draw_slides_too(tmp_path, seen):
    npz = _npz(tmp_path / "alpha_history.npz", 8)
    for p in (figures.alpha_heatmap(npz, tmp_path / "final.png"), figures.alpha_figure(npz, tmp_path / "evo.png", 7)):
        w, h = _png_size(p)
        assert abs((w / h) / (16 / 9) - 1) < 0.01
        assert seen[p.name].panels == len(OP_TABLES) and seen[p.name].min_font >= 12
    assert seen["evo.png"].titles[:2] == ["SAM up4", "CAM up4"]


def test_an_alpha_file_without_alphas_is_named(tmp_path):
    bad = tmp_path / "alpha_history.npz"
    np.savez(bad, epochs=np.arange(3))
    with pytest.raises(ValueError, match="alpha_history.npz.*expected 'epochs' and one of sam, cam"):
        figures.search_figures(bad, tmp_path / "figures")


@pytest.mark.parametrize("last", [1, 3, 10, 11, 40, 120, 301])
def test_epoch_ticks_are_integers_from_one(last):
    plt = figures.pyplot()
    fig, ax = plt.subplots()
    figures.epoch_ticks(ax, last)
    ticks = list(ax.get_xticks())
    plt.close(fig)
    assert ticks[0] == 1 and all(float(t).is_integer() for t in ticks) and ticks == sorted(set(ticks))
    assert ticks[-1] <= last and len(ticks) <= 11
    assert ticks == list(range(1, last + 1)) if last <= 10 else len(ticks) > 2


def _history(n, search=False):
    return [{"epoch": e, "train_loss": 1.0 / (e + 1), **({"alpha_loss": 0.5} if search else {}),
             **({"val_dsc": 0.1 * e} if e % 2 else {})} for e in range(n)]


@pytest.mark.parametrize("phase, folder, title, band", [
    ("search", "search__nas-scam-p-sync__seed1", "search: nas-scam-p-sync, seed 1", True),
    ("train", "train__unet__seed0__fold2", "retrain: unet, seed 0 (fold 2)", False),
    ("train", "train__cbam__3f2a_00001", "retrain: cbam, seed 7", False),  # an HPO trial: no trial id
])
def test_learning_curve_titled_by_run_integer_epochs_legend_off_the_lines(tmp_path, seen, phase, folder, title,
                                                                          band):
    cfg = SimpleNamespace(seed=7, model=SimpleNamespace(name="unet"), search=SimpleNamespace(warmup_epochs=2),
                          train=SimpleNamespace(epochs=7))
    curves.learning_curve(phase, cfg, SimpleNamespace(history=_history(7, phase == "search")), tmp_path / folder)
    shown = seen[curves.FIGURE]
    assert shown.titles[0] == title
    assert shown.xticks[0] == [1, 2, 3, 4, 5, 6, 7]
    # a search shades its warm-up; a retrain has none to shade
    assert ("warm-up" in shown.legend_labels) is band
    assert "val DSC" in shown.legend_labels and "train loss" in shown.legend_labels
    for legend in shown.legend_boxes:
        assert not any(legend.overlaps(ax) for ax in shown.axes_boxes)


def test_report_curves_have_integer_epochs_from_one(tmp_path, seen):
    from orchestrator.report import curves_figure

    runs = [{"method": "unet", "seed": 0, "history": _history(6)},
            {"method": "cbam", "seed": 1, "history": _history(4)}]
    curves_figure(runs, tmp_path / "curves.png")
    assert seen["curves.png"].xticks[0] == [1, 2, 3, 4, 5, 6]
    w, h = _png_size(tmp_path / "curves.png")
    assert abs((w / h) / (16 / 9) - 1) < 0.01


def test_alpha_section_copies_or_draws_each_searchs_figures(tmp_path):
    root, out = tmp_path / "abl", tmp_path / "report"
    written = figures.search_figures(_npz(root / "search__a__seed0" / "alpha_history.npz", 0),
                                     root / "search__a__seed0" / "figures")
    _npz(root / "search__b__seed0" / "alpha_history.npz", 0)  # figures not written by the search: drawn
    (root / "search__c__seed0").mkdir()  # neither: said so
    paths = {}
    md = "\n".join(alpha_section(root, out, paths, "png"))
    assert "## Architecture weights (alpha) of the searches" in md
    for search in ("search__a__seed0", "search__b__seed0"):
        for p in written:
            assert (out / "alphas" / search / p.name).is_file()
            assert f"(alphas/{search}/{p.name})" in md
            assert paths[f"alphas:{search}:{p.name}"] == out / "alphas" / search / p.name
    assert (out / "alphas" / "search__a__seed0" / "alpha_summary.png").read_bytes() == written[0].read_bytes()
    assert "search__c__seed0: no alpha figures" in md
    # reading order: summary first
    assert md.index("search__a__seed0/alpha_summary") < md.index("search__a__seed0/alpha_final")


def test_report_shows_the_searchs_alpha_figures(tmp_path):
    from tests.orchestrator.test_report import _run_folder

    root = tmp_path / "runs" / "abl"
    _run_folder(root)
    _npz(root / "search__nas-scam-p-sync__seed0" / "alpha_history.npz", 0)
    report = write_report(root, tmp_path / "out", fmt="png")
    md = (tmp_path / "out" / "report.md").read_text()
    assert "## Architecture weights (alpha) of the searches" in md
    assert "![alpha_summary](alphas/search__nas-scam-p-sync__seed0/alpha_summary.png)" in md
    figs = [p for k, p in report.paths.items() if k.startswith("alphas:")]
    assert len(figs) == 3 and all(p.is_file() and str(p.relative_to(tmp_path / "out")) in md for p in figs)


def _legend_pixels(rgb: np.ndarray) -> dict[int, int]:
    return {cid: int(np.all(rgb == np.asarray(PALETTE[cid], np.uint8), axis=-1).sum()) for cid in range(1, 5)}


def test_overlay_legend_names_each_class_colour():
    from nas_core.engine.predict import overlay

    image = np.full((300, 500, 3), 128, np.uint8)
    labels = np.zeros((300, 500), np.uint8)
    before = labels.copy()
    with_legend, without = overlay(image, labels), overlay(image, labels, legend=False)
    assert with_legend.shape == image.shape  # still pixel-aligned with the labels
    assert all(n > 20 for n in _legend_pixels(with_legend).values()), _legend_pixels(with_legend)
    assert not any(_legend_pixels(without).values())
    # the legend sits in the bottom-left corner, nowhere else
    changed = np.argwhere(np.any(with_legend != without, axis=-1))
    assert changed[:, 0].min() > 150 and changed[:, 1].max() < 250
    np.testing.assert_array_equal(labels, before)
    # an image too small to hold it keeps all its pixels
    small = np.full((64, 64, 3), 128, np.uint8)
    np.testing.assert_array_equal(overlay(small, np.zeros((64, 64), np.uint8)), small)


def test_predict_files_legend_only_in_the_overlay(tmp_path, monkeypatch):
    import cv2
    import torch

    from nas_core.config import load_config
    from nas_core.engine import predict
    from nas_core.engine.checkpoint import save_checkpoint
    from nas_core.models import create_model

    torch.manual_seed(0)
    cfg = load_config(overrides=["model.name=unet", "data.crop_size=64", "data.stride=64", "data.stain=none"])
    ckpt = save_checkpoint(tmp_path / "u.pt", model=create_model("unet"), config=cfg.to_dict(), phase="train",
                           epoch=0)
    image = tmp_path / "tile.png"
    cv2.imwrite(str(image), np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8))
    runs = {}
    for legend in (True, False):
        if not legend:
            monkeypatch.setattr(predict, "draw_legend", lambda rgb: rgb)
        out = tmp_path / f"legend_{legend}"
        (p,) = predict.predict_files(ckpt, [image], out, device="cpu")
        runs[legend] = {k: Path(p[k]).read_bytes() for k in ("labels", "geojson")}
        runs[legend]["overlay"] = cv2.cvtColor(cv2.imread(p["overlay"]), cv2.COLOR_BGR2RGB)
    assert runs[True]["labels"] == runs[False]["labels"]
    assert json.loads(runs[True]["geojson"]) == json.loads(runs[False]["geojson"])
    assert runs[True]["overlay"].shape == runs[False]["overlay"].shape == (256, 256, 3)
    # where the two overlays differ (the legend box), each class's colour shows
    differ = np.any(runs[True]["overlay"] != runs[False]["overlay"], axis=-1)
    gained = _legend_pixels(runs[True]["overlay"][differ])
    assert all(n > 20 for n in gained.values()), gained
