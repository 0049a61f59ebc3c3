"""Per-class thresholds fitted on the validation split (nas_core.engine.calibrate): the threshold a known
probability map calls for, the 0.5 fallback for a class the split lacks, and the test split scored at
0.5 exactly as the engine's evaluation scores it."""

import numpy as np
import pytest
import torch
from torch import nn

from nas_core.engine.calibrate import GRID, count_above, fit_thresholds, score_split
from nas_core.engine.evaluate import evaluate_split

SIZE = 32


class RedIsProbability(nn.Module):
    """Every class channel's probability is the image's red channel (0..1): the maps are known."""

    def forward(self, x):
        return x[:, :1].expand(-1, 4, -1, -1).clone()


class TwoSplits:
    """The PreparedData surface evaluation reads: one val and one test image, labels of class 1 only.

    Class-1 pixels have probability ``pos`` (red = pos * 255), the rest ``neg``."""

    grid = "release"

    def __init__(self, pos: int, neg: int):
        rng = np.random.default_rng(0)
        self.labels, self.images = {}, {}
        for key in ("v", "t"):
            label = np.zeros((SIZE, SIZE), np.uint8)
            label[rng.random((SIZE, SIZE)) < 0.3] = 1  # Epithelial
            image = np.zeros((SIZE, SIZE, 3), np.uint8)
            image[..., 0] = np.where(label == 1, pos, neg)
            self.labels[key], self.images[key] = label, image
        self.manifest = {"images": [{"id": "v", "patient": "P1"}, {"id": "t", "patient": "P2"}]}

    def image_ids(self, split):
        return {"val": ["v"], "test": ["t"]}[split]

    def load_image(self, i):
        return self.images[i]

    def load_label(self, i):
        return self.labels[i]

    def load_ignore(self, i):
        return np.zeros((SIZE, SIZE), bool)

    def load_instances(self, i):
        return None


def test_counts_strictly_above_each_threshold_as_the_engine_cuts():
    values = np.array([0.5, 0.6, 0.6, 0.95], np.float32)
    assert count_above(values, np.array([0.05, 0.5, 0.6, 0.95])).tolist() == [4, 3, 1, 0]
    assert count_above(values, np.array([0.5])).item() == int((torch.tensor(values) > 0.5).sum())


def test_the_threshold_between_the_two_probabilities_is_found_and_absent_classes_keep_half():
    data = TwoSplits(pos=214, neg=143)  # 0.84 and 0.56: every cut of the grid from 0.60 to 0.80 separates them
    cal = fit_thresholds(RedIsProbability(), data, tile=SIZE, stride=SIZE)
    assert cal.val_images == 1
    # class 1 (Epithelial): DSC 1 for cuts 0.60 ... 0.80; the tie goes to the cut nearest 0.5
    assert cal.thresholds[0] == pytest.approx(0.6) and cal.fitted[0]
    k = {round(t, 2): i for i, t in enumerate(cal.grid)}
    assert cal.val_dsc[0][k[0.6]] == pytest.approx(1.0) and cal.val_dsc[0][k[0.8]] == pytest.approx(1.0)
    assert cal.val_dsc[0][k[0.85]] == 0.0  # nothing above 0.85, the truth is there: DSC 0
    truth = int((data.labels["v"] == 1).sum())
    assert cal.val_pixels == [truth, 0, 0, 0]
    assert cal.val_dsc[0][k[0.5]] == pytest.approx(2 * truth / (truth + SIZE * SIZE))  # 0.5 predicts every pixel
    # classes 2-4 have no true pixel on val: kept at 0.5, not fitted
    assert cal.thresholds[1:] == [0.5, 0.5, 0.5] and cal.fitted[1:] == [False, False, False]
    assert cal.to_dict()["classes"][:2] == ["Epithelial", "Lymphocyte"]


def test_a_class_best_at_half_is_not_moved():
    data = TwoSplits(pos=255, neg=0)  # 1.0 and 0.0: every cut is perfect; the tie keeps 0.5
    cal = fit_thresholds(RedIsProbability(), data, tile=SIZE, stride=SIZE)
    assert cal.thresholds[0] == 0.5 and not cal.fitted[0]


def test_the_test_split_at_half_is_the_engines_evaluation_and_calibrated_uses_the_fit():
    data = TwoSplits(pos=214, neg=143)
    model = RedIsProbability()
    cal = fit_thresholds(model, data, tile=SIZE, stride=SIZE)
    scored = score_split(model, data, "test", cal.thresholds, tile=SIZE, stride=SIZE)
    engine = evaluate_split(model, data, "test", tile=SIZE, stride=SIZE, images=True)
    assert scored["fixed"]["dsc"] == engine["dsc"]
    assert scored["fixed"]["images"] == engine["images"]
    assert scored["calibrated"]["dsc"]["Epithelial"] == pytest.approx(1.0)
    assert scored["fixed"]["dsc"]["Epithelial"] < 0.8
    assert scored["calibrated"]["images"][0]["patient"] == "P2"
    # the other classes: 0.5 on both sides, so the same predictions (every pixel) and the same DSC
    assert scored["calibrated"]["dsc"]["Lymphocyte"] == scored["fixed"]["dsc"]["Lymphocyte"]


def test_a_grid_must_stay_inside_0_1_and_hold_half():
    data = TwoSplits(pos=214, neg=143)
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        fit_thresholds(RedIsProbability(), data, tile=SIZE, stride=SIZE, grid=[0.5, 1.0])
    with pytest.raises(ValueError, match="0.5"):
        fit_thresholds(RedIsProbability(), data, tile=SIZE, stride=SIZE, grid=[0.3, 0.7])
    with pytest.raises(ValueError, match="4 thresholds"):
        score_split(RedIsProbability(), data, "test", [0.5], tile=SIZE, stride=SIZE)
    assert 0.5 in GRID and min(GRID) > 0 and max(GRID) < 1
