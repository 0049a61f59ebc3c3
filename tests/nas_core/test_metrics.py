import math

import numpy as np
import pytest
import torch

from nas_core.classes import CLASS_BY_ID, TABLE_ORDER
from nas_core.metrics import (SegmentationMetrics, PQCounts, flatten_metrics,
                              labels_to_stack, match_instances, panoptic_counts)


def approx(x):
    return pytest.approx(x, abs=1e-12)


def stack(masks: dict, shape=(4, 6)):
    """Prediction stack (4, H, W) from {class_id: (H, W) bool}."""
    out = np.zeros((4, *shape), dtype=bool)
    for c, mask in masks.items():
        out[c - 1] = mask
    return out


def box(shape, rows, cols):
    m = np.zeros(shape, dtype=bool)
    m[rows, cols] = True
    return m


def test_constants():
    assert CLASS_BY_ID == {1: "Epithelial", 2: "Lymphocyte", 3: "Neutrophil", 4: "Macrophage"}
    assert TABLE_ORDER == ("Average", "Epithelial", "Lymphocyte", "Macrophage", "Neutrophil")


# ---------------------------------------------------------------- DSC ----

def two_images():
    """Class 1: image A 4 px true / 4 predicted / 2 shared; image B 1 px true, none predicted.
    Class 4 (Macrophage): image A only, predicted exactly (2 px). Classes 2, 3 absent everywhere."""
    gt_a = np.zeros((4, 6), np.uint8)
    gt_a[0, 0:4] = 1
    gt_a[3, 4:6] = 4
    epithelial = box((4, 6), 0, slice(2, 4)) | box((4, 6), 1, slice(0, 2))  # 2 px right, 2 px wrong
    pred_a = stack({1: epithelial, 4: gt_a == 4})
    gt_b = np.zeros((4, 6), np.uint8)
    gt_b[2, 2] = 1
    pred_b = np.zeros((4, 4, 6), bool)
    return (pred_a, gt_a), (pred_b, gt_b)


def test_global_dsc_differs_from_per_image_mean():
    acc = SegmentationMetrics()
    (pa, ga), (pb, gb) = two_images()
    assert pa[0].sum() == 4 and (pa[0] & (ga == 1)).sum() == 2
    img_a = acc.update(pa, ga)
    img_b = acc.update(pb, gb)
    assert img_a[0] == approx(1 / 2) and img_a[3] == 1.0 and np.isnan(img_a[1]) and np.isnan(img_a[2])
    assert img_b[0] == 0.0 and np.isnan(img_b[1:]).all()

    res = acc.compute()
    # global: 2 * (2 + 0) / ((4 + 4) + (0 + 1))
    assert res["dsc"]["Epithelial"] == approx(4 / 9)
    assert res["dsc"]["Macrophage"] == 1.0
    assert math.isnan(res["dsc"]["Lymphocyte"]) and math.isnan(res["dsc"]["Neutrophil"])
    assert res["dsc"]["Average"] == approx((4 / 9 + 1) / 2)  # NaN classes skipped
    # per image: class columns average the images where the class is defined
    assert res["dsc_per_image"]["Epithelial"] == approx(1 / 4)
    assert res["dsc_per_image"]["Macrophage"] == 1.0
    # Average: image A mean (1/2 + 1) / 2 = 3/4, image B 0 -> 3/8 (not the mean of the columns, 5/8)
    assert res["dsc_per_image"]["Average"] == approx(3 / 8)
    assert list(res["dsc"]) == list(TABLE_ORDER) and list(res["dsc_per_image"]) == list(TABLE_ORDER)
    assert res["n_images"] == 2


def test_image_rows_hold_each_images_dsc_and_pixel_sums():
    (pa, ga), (pb, gb) = two_images()
    left, right = SegmentationMetrics(), SegmentationMetrics()
    left.update(pa, ga)
    right.update(pb, gb)
    rows = left.merge(right).image_rows(["a", "b"], ["p1", "p2"])
    a, b = rows
    assert (a["id"], a["patient"], b["id"], b["patient"]) == ("a", "p1", "b", "p2")
    assert a["dsc_Epithelial"] == approx(1 / 2) and a["dsc_Macrophage"] == 1.0 and a["dsc_Average"] == approx(3 / 4)
    assert a["dsc_Lymphocyte"] is None and a["dsc_Neutrophil"] is None  # undefined: JSON null, not NaN
    assert (a["inter_Epithelial"], a["pred_Epithelial"], a["gt_Epithelial"]) == (2, 4, 4)
    assert (b["inter_Epithelial"], b["pred_Epithelial"], b["gt_Epithelial"]) == (0, 0, 1) and b["dsc_Epithelial"] == 0
    # the sums give back the global DSC
    inter = sum(r["inter_Epithelial"] for r in rows)
    assert 2 * inter / sum(r["pred_Epithelial"] + r["gt_Epithelial"] for r in rows) == approx(4 / 9)
    assert SegmentationMetrics().image_rows([]) == []
    with pytest.raises(ValueError, match="1 image ids .* for 2 scored images"):
        left.image_rows(["a"])


def test_predicted_but_absent_class_scores_zero():
    gt = np.zeros((3, 3), np.uint8)
    gt[0, 0] = 2
    pred = labels_to_stack(gt)
    pred[2, 2, 2] = True  # Neutrophil predicted, not in the ground truth
    acc = SegmentationMetrics()
    img = acc.update(pred, gt)
    assert img[1] == 1.0 and img[2] == 0.0 and np.isnan(img[0]) and np.isnan(img[3])
    res = acc.compute()
    assert res["dsc"]["Neutrophil"] == 0.0 and res["dsc"]["Average"] == approx(1 / 2)
    assert res["dsc_per_image"]["Average"] == approx(1 / 2)


def test_ignore_region_removes_pixels_from_dsc_and_accuracy():
    gt = np.zeros((2, 4), np.uint8)
    gt[0, :2] = 1
    pred = labels_to_stack(gt)
    pred[0, 1, 2:] = True  # two false-positive Epithelial pixels...
    ignore = np.zeros((2, 4), bool)
    ignore[1, 3] = True  # ...one of them ignored
    acc = SegmentationMetrics()
    acc.update(pred, gt, ignore)
    res = acc.compute()
    assert res["dsc"]["Epithelial"] == approx(2 * 2 / (3 + 2))
    assert res["pixel_accuracy"] == approx(6 / 7)
    acc2 = SegmentationMetrics()
    acc2.update(pred, gt, np.ones((2, 4), bool))
    assert math.isnan(acc2.compute()["dsc"]["Epithelial"]) and math.isnan(acc2.compute()["pixel_accuracy"])


def test_pixel_accuracy_multilabel_pixel_is_wrong():
    gt = np.array([[0, 1, 2, 3]], np.uint8)
    pred = labels_to_stack(gt)
    pred[3, 0, 2] = True  # pixel labelled 2 also predicted Macrophage
    pred[0, 0, 0] = True  # background predicted Epithelial
    acc = SegmentationMetrics(with_pq=False)
    acc.update(pred, gt)
    assert acc.compute()["pixel_accuracy"] == approx(2 / 4)
    assert "pq" not in acc.compute()


def test_merge_equals_single_pass_and_torch_inputs():
    (pa, ga), (pb, gb) = two_images()
    one = SegmentationMetrics()
    one.update(pa, ga)
    one.update(pb, gb)
    left, right = SegmentationMetrics(), SegmentationMetrics()
    left.update(torch.from_numpy(pa), torch.from_numpy(ga))
    right.update(pb.astype(np.uint8), gb)
    merged = flatten_metrics(left.merge(right).compute())
    single = flatten_metrics(one.compute())
    assert merged.keys() == single.keys()
    assert all(merged[k] == single[k] or (math.isnan(merged[k]) and math.isnan(single[k])) for k in single)


def test_flatten_metrics_keys():
    acc = SegmentationMetrics()
    acc.update(*two_images()[0])
    flat = flatten_metrics(acc.compute(), prefix="test")
    assert flat["test/dsc/Epithelial"] == approx(1 / 2) and flat["test/n_images"] == 1.0
    assert {f"test/pq/{n}" for n in TABLE_ORDER} <= flat.keys() and "test/pixel_accuracy" in flat
    assert all(isinstance(v, float) for v in flat.values())
    no_nan = flatten_metrics(acc.compute(), skip_nan=True)
    assert "dsc/Lymphocyte" not in no_nan and "dsc/Epithelial" in no_nan


@pytest.mark.parametrize("pred, gt, match", [
    (np.zeros((4, 2, 2), np.float32), np.zeros((2, 2), np.uint8), "threshold"),
    (np.zeros((4, 2, 2), bool), np.full((2, 2), 7, np.uint8), "0..4"),
    (np.zeros((3, 2, 2), bool), np.zeros((2, 2), np.uint8), r"\(4, H, W\)"),
    (np.zeros((4, 2, 2), bool), np.zeros((4, 2, 2), np.uint8), r"\(H, W\) label map"),
])
def test_bad_inputs_raise(pred, gt, match):
    with pytest.raises(ValueError, match=match):
        SegmentationMetrics().update(pred, gt)


def test_bad_ignore_and_instances_raise():
    pred, gt = np.zeros((4, 2, 2), bool), np.zeros((2, 2), np.uint8)
    with pytest.raises(ValueError, match="ignore mask shape"):
        SegmentationMetrics().update(pred, gt, ignore=np.zeros((3, 3), bool))
    with pytest.raises(ValueError, match="instance map"):
        SegmentationMetrics().update(pred, gt, instances=np.full((2, 2), -1))


# ---------------------------------------------------------------- PQ ----

def test_pq_perfect_match_and_iou_04_non_match():
    shape = (4, 12)
    gt = np.zeros(shape, int)
    gt[0, 0:4] = 1  # nucleus 1, predicted exactly
    gt[2, 0:7] = 2  # nucleus 2: 7 px
    pred = box(shape, 0, slice(0, 4)) | box(shape, 2, slice(3, 10))  # 7 px, overlap 4, union 10: IoU 0.4
    counts = panoptic_counts(pred, gt)
    assert (counts.tp, counts.fp, counts.fn) == (1, 1, 1) and counts.iou_sum == 1.0
    pq, sq, rq = counts.quality()
    assert (pq, sq, rq) == (approx(1 / 2), 1.0, approx(1 / 2))
    assert panoptic_counts(box(shape, 0, slice(0, 4)), gt == 1).quality() == (1.0, 1.0, 1.0)


def test_pq_split_and_merge():
    shape = (3, 12)
    gt = np.zeros(shape, int)
    gt[1, 0:10] = 1
    # split: the 10-px nucleus predicted as 6 px + 3 px with a gap -> IoU 6/10 matches, the 3 px is a FP
    split = box(shape, 1, slice(0, 6)) | box(shape, 1, slice(7, 10))
    c = panoptic_counts(split, gt)
    assert (c.tp, c.fp, c.fn) == (1, 1, 0) and c.quality()[0] == approx((6 / 10) / (1 + 1 / 2))
    # merge: two touching true nuclei (6 + 4 px, from the instance map) predicted as one component
    inst = np.zeros(shape, int)
    inst[1, 0:6], inst[1, 6:10] = 5, 9
    c = panoptic_counts(gt == 1, inst)
    assert (c.tp, c.fp, c.fn) == (1, 0, 1) and c.iou_sum == approx(6 / 10)
    assert c.quality()[0] == approx((6 / 10) / (1 + 1 / 2))


def test_pq_exactly_half_iou_is_no_match():
    gt = np.zeros((1, 4), int)
    gt[0, 0:2] = 1
    c = panoptic_counts(np.array([[True, True, True, True]]), gt)  # IoU 2/4
    assert (c.tp, c.fp, c.fn) == (0, 1, 1) and c.quality() == (0.0, 0.0, 0.0)


def test_pq_eight_connectivity():
    pred = np.eye(3, dtype=bool)  # diagonal pixels: one component under 8-connectivity
    c = panoptic_counts(pred, pred.astype(int))
    assert (c.tp, c.fp, c.fn) == (1, 0, 0)


def test_pq_ignore_region_removes_false_positive():
    shape = (4, 10)
    gt = np.zeros(shape, int)
    gt[0, 0:3] = 1
    pred = box(shape, 0, slice(0, 3)) | box(shape, 3, slice(6, 9))  # a FP in the bottom right
    assert panoptic_counts(pred, gt).quality()[0] == approx(1 / (1 + 1 / 2))
    ignore = box(shape, slice(2, 4), slice(5, 10))
    assert panoptic_counts(pred, gt, ignore).quality() == (1.0, 1.0, 1.0)
    # a FP only 1/3 inside the ignore region stays a FP
    pred2 = box(shape, 0, slice(0, 3)) | box(shape, 1, slice(4, 7))
    c = panoptic_counts(pred2, gt, box(shape, 1, 6))
    assert (c.tp, c.fp, c.fn) == (1, 1, 0)


def test_pq_ignore_applies_to_both_sides():
    shape = (1, 10)
    nucleus = box(shape, 0, slice(2, 7))  # 5 px, predicted exactly
    mostly_ignored = box(shape, 0, slice(0, 5))  # covers 3 of its 5 px: dropped on both sides
    c = panoptic_counts(nucleus, nucleus.astype(int), mostly_ignored)
    assert (c.tp, c.fp, c.fn) == (0, 0, 0) and math.isnan(c.quality()[0])
    partly = box(shape, 0, slice(0, 4))  # 2 of 5 px: both keep their 3 remaining pixels, IoU 1
    assert panoptic_counts(nucleus, nucleus.astype(int), partly).quality() == (1.0, 1.0, 1.0)


def test_match_instances_any_ids():
    gt = np.array([[0, 7, 7, 0, 3]])
    pred = np.array([[0, 2, 2, 2, 0]])
    c = match_instances(pred, gt)
    assert (c.tp, c.fp, c.fn) == (1, 0, 1) and c.iou_sum == approx(2 / 3)


def test_pq_accumulates_over_images_per_class():
    acc = SegmentationMetrics()
    gt1 = np.zeros((4, 8), np.uint8)
    gt1[0, 0:2] = 1
    gt1[2, 4:6] = 2  # Lymphocyte nucleus, missed (FN)
    pred1 = labels_to_stack(np.where(gt1 == 1, 1, 0))
    gt2 = np.zeros((4, 8), np.uint8)
    gt2[1, 0:4] = 1
    pred2 = labels_to_stack(np.where(gt2 == 1, 1, 0))
    pred2[0, 1, 0] = False  # 3 of 4 px predicted: IoU 3/4
    acc.update(pred1, gt1)
    acc.update(pred2, gt2)
    res = acc.compute()
    # Epithelial over the set: TP 2, IoU 1 + 3/4 -> PQ = SQ = 7/8, RQ 1
    assert res["pq"]["Epithelial"] == approx(7 / 8) and res["sq"]["Epithelial"] == approx(7 / 8)
    assert res["pq"]["Lymphocyte"] == 0.0 and res["rq"]["Lymphocyte"] == 0.0
    assert math.isnan(res["pq"]["Neutrophil"]) and math.isnan(res["pq"]["Macrophage"])
    assert res["pq"]["Average"] == approx(7 / 16)
    assert list(res["pq"]) == list(TABLE_ORDER)


def test_pq_instance_map_separates_touching_nuclei():
    gt = np.zeros((2, 6), np.uint8)
    gt[0, 0:6] = 1  # two touching Epithelial nuclei: one component without the instance map
    inst = np.zeros((2, 6), int)
    inst[0, 0:3], inst[0, 3:6] = 1, 2
    pred = labels_to_stack(gt)
    with_map, without = SegmentationMetrics(), SegmentationMetrics()
    with_map.update(pred, gt, instances=inst)
    without.update(pred, gt)
    assert without.compute()["pq"]["Epithelial"] == 1.0
    assert with_map.compute()["pq"]["Epithelial"] == 0.0  # IoU 3/6 with each: no match, 1 FP + 2 FN


def test_pqcounts_add():
    a = PQCounts(1, 2, 3, 0.5)
    a += PQCounts(1, 0, 0, 0.75)
    assert (a.tp, a.fp, a.fn, a.iou_sum) == (2, 2, 3, 1.25)
