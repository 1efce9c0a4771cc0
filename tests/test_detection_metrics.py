"""Box mAP through pycocotools on hand-made boxes, and non-maximum suppression."""

from __future__ import annotations

import pytest
import torch

from rl_pruner.detection.metrics import BoxMAPEvaluator, box_map
from rl_pruner.detection.nms import non_max_suppression
from rl_pruner.errors import InputError

pytest.importorskip("pycocotools")

# Ground truth rows: x1, y1, x2, y2, class. Prediction rows: x1, y1, x2, y2, score, class.
TWO_IMAGES_TRUTH = [
    torch.tensor([[10.0, 10.0, 50.0, 60.0, 0.0], [100.0, 40.0, 180.0, 120.0, 1.0]]),
    torch.tensor([[0.0, 0.0, 30.0, 30.0, 1.0]]),
]


def _with_scores(truth: torch.Tensor, scores: list[float]) -> torch.Tensor:
    return torch.cat((truth[:, :4], torch.tensor(scores)[:, None], truth[:, 4:]), 1)


def test_perfect_predictions_score_one() -> None:
    predictions = [_with_scores(TWO_IMAGES_TRUTH[0], [0.9, 0.8]), _with_scores(TWO_IMAGES_TRUTH[1], [0.7])]

    result = box_map(predictions, TWO_IMAGES_TRUTH)

    assert result.map_50 == pytest.approx(1.0)
    assert result.map_50_95 == pytest.approx(1.0)
    assert result.n_images == 2
    assert result.n_ground_truths == 3
    assert result.n_predictions == 3


def test_missed_object() -> None:
    # One class, two objects, one exact detection. Recall reaches 0.5 at precision 1
    # and never goes higher. COCO samples the interpolated precision at 101 recall
    # levels 0.00, 0.01, ..., 1.00: it is 1 at the 51 levels up to 0.50 and 0 at the
    # 50 above, so AP = 51 / 101 = 0.50495 at every IoU threshold (the box is exact).
    truth = [torch.tensor([[0.0, 0.0, 10.0, 10.0, 0.0], [20.0, 20.0, 30.0, 30.0, 0.0]])]
    predictions = [torch.tensor([[0.0, 0.0, 10.0, 10.0, 0.9, 0.0]])]

    result = box_map(predictions, truth)

    assert result.map_50 == pytest.approx(51 / 101)
    assert result.map_50_95 == pytest.approx(51 / 101)


@pytest.mark.parametrize("max_detections", [1, 10, 300])
def test_detection_cap_other_than_coco_default(max_detections: int) -> None:
    """Both means honour the cap: the best box of each image counts, a second one only above a cap of 1."""
    truth = [torch.tensor([[0.0, 0.0, 10.0, 10.0, 0.0], [20.0, 20.0, 30.0, 30.0, 0.0]])]
    predictions = [torch.tensor([[0.0, 0.0, 10.0, 10.0, 0.9, 0.0], [20.0, 20.0, 30.0, 30.0, 0.8, 0.0]])]

    result = BoxMAPEvaluator(max_detections=max_detections)
    result.update(predictions, truth)
    scores = result.compute()

    expected = 51 / 101 if max_detections == 1 else 1.0
    assert scores.map_50 == pytest.approx(expected)
    assert scores.map_50_95 == pytest.approx(expected)


def test_false_positive_ranked_first() -> None:
    # One object. Sorted by score: a false positive (0.9, no overlap), then the exact
    # box (0.8). Precision/recall after each: (0/1, 0), then (1/2, 1). The interpolated
    # precision at recall r is the best precision at any recall >= r, which is 0.5 for
    # every r in [0, 1], so AP = 0.5.
    truth = [torch.tensor([[0.0, 0.0, 10.0, 10.0, 0.0]])]
    predictions = [torch.tensor([[50.0, 50.0, 60.0, 60.0, 0.9, 0.0], [0.0, 0.0, 10.0, 10.0, 0.8, 0.0]])]

    result = box_map(predictions, truth)

    assert result.map_50 == pytest.approx(0.5)
    assert result.map_50_95 == pytest.approx(0.5)


def test_false_positive_ranked_last() -> None:
    # The exact box comes first: recall 1 is reached at precision 1, and the later
    # false positive only adds a point at (1/2, 1), which cannot lower the best
    # precision at recall >= r. AP = 1.
    truth = [torch.tensor([[0.0, 0.0, 10.0, 10.0, 0.0]])]
    predictions = [torch.tensor([[0.0, 0.0, 10.0, 10.0, 0.9, 0.0], [50.0, 50.0, 60.0, 60.0, 0.8, 0.0]])]

    result = box_map(predictions, truth)

    assert result.map_50 == pytest.approx(1.0)


def test_loose_box_low_iou_only() -> None:
    # Truth 10 x 10 (area 100); prediction 10 x 7.2 inside it (area 72): IoU = 72 / 100
    # = 0.72. It matches at the thresholds 0.50, 0.55, 0.60, 0.65, 0.70 (AP 1) and not
    # at 0.75 ... 0.95 (AP 0), so mAP@0.5 = 1 and mAP@0.5:0.95 = 5 / 10 = 0.5.
    truth = [torch.tensor([[0.0, 0.0, 10.0, 10.0, 0.0]])]
    predictions = [torch.tensor([[0.0, 0.0, 10.0, 7.2, 0.9, 0.0]])]

    result = box_map(predictions, truth)

    assert result.map_50 == pytest.approx(1.0)
    assert result.map_50_95 == pytest.approx(0.5)


def test_mean_over_classes() -> None:
    # Class 0 is found exactly (AP 1); the only class-1 object is missed and a class-1
    # box lands on empty background (AP 0). The mean over the two classes is 0.5.
    truth = [torch.tensor([[0.0, 0.0, 10.0, 10.0, 0.0], [20.0, 20.0, 30.0, 30.0, 1.0]])]
    predictions = [torch.tensor([[0.0, 0.0, 10.0, 10.0, 0.9, 0.0], [60.0, 60.0, 70.0, 70.0, 0.8, 1.0]])]

    result = box_map(predictions, truth)

    assert result.map_50 == pytest.approx(0.5)
    assert result.map_50_95 == pytest.approx(0.5)


def test_no_predictions_score_zero() -> None:
    result = box_map([torch.zeros(0, 6)], [torch.tensor([[0.0, 0.0, 10.0, 10.0, 0.0]])])

    assert result.map_50 == 0.0
    assert result.map_50_95 == 0.0


def test_evaluator_accumulates_batches() -> None:
    evaluator = BoxMAPEvaluator()
    evaluator.update([_with_scores(TWO_IMAGES_TRUTH[0], [0.9, 0.8])], TWO_IMAGES_TRUTH[:1])
    evaluator.update([torch.zeros(0, 6)], TWO_IMAGES_TRUTH[1:])

    result = evaluator.compute()

    # Class 0: AP 1. Class 1: one of two objects found, AP 51 / 101 (see test_missed_object).
    assert result.n_images == 2
    assert result.map_50 == pytest.approx((1 + 51 / 101) / 2)


def test_no_ground_truth_rejected() -> None:
    with pytest.raises(InputError, match="at least one ground-truth box"):
        box_map([torch.zeros(0, 6)], [torch.zeros(0, 5)])


@pytest.mark.parametrize(("boxes", "expected"), [
    (torch.zeros(2, 4), r"shape \(n, 5\)"),
    (torch.tensor([[10.0, 0.0, 5.0, 5.0, 0.0]]), "x2 < x1"),
    (torch.tensor([[0.0, 0.0, 5.0, 5.0, 0.5]]), "invalid class index"),
    (torch.tensor([[0.0, 0.0, float("nan"), 5.0, 0.0]]), "not finite"),
])
def test_malformed_ground_truth_rejected(boxes: torch.Tensor, expected: str) -> None:
    with pytest.raises(InputError, match=expected):
        box_map([torch.zeros(0, 6)], [boxes])


def test_image_count_mismatch_rejected() -> None:
    with pytest.raises(InputError, match="1 images but ground truth for 2"):
        box_map([torch.zeros(0, 6)], TWO_IMAGES_TRUTH)


# --- non-maximum suppression ---


def _prediction(cx: float, cy: float, w: float, h: float, objectness: float, classes: list[float]) -> list[float]:
    return [cx, cy, w, h, objectness, *classes]


def test_nms_removes_same_class_overlap() -> None:
    predictions = torch.tensor([[
        _prediction(50, 50, 20, 20, 0.9, [0.9, 0.1]),
        _prediction(51, 50, 20, 20, 0.8, [0.9, 0.1]),  # IoU 0.90 with the first
        _prediction(150, 150, 20, 20, 0.7, [0.9, 0.1]),
    ]])

    (detections,) = non_max_suppression(predictions, conf_threshold=0.25, iou_threshold=0.45)

    assert detections.shape == (2, 6)
    torch.testing.assert_close(detections[0], torch.tensor([40.0, 40.0, 60.0, 60.0, 0.81, 0.0]))
    assert detections[1, :4].tolist() == [140.0, 140.0, 160.0, 160.0]


def test_nms_keeps_other_class_overlap() -> None:
    predictions = torch.tensor([[
        _prediction(50, 50, 20, 20, 0.9, [0.9, 0.1]),
        _prediction(51, 50, 20, 20, 0.8, [0.1, 0.9]),
    ]])

    (per_class,) = non_max_suppression(predictions)
    (agnostic,) = non_max_suppression(predictions, class_agnostic=True)

    assert per_class[:, 5].tolist() == [0.0, 1.0]
    assert agnostic[:, 5].tolist() == [0.0]


def test_nms_confidence_threshold_and_multi_label() -> None:
    # Confidence = objectness x class probability: 0.5 x 0.6 = 0.30 and 0.5 x 0.4 = 0.20.
    predictions = torch.tensor([[_prediction(50, 50, 20, 20, 0.5, [0.6, 0.4])]])

    (best_class,) = non_max_suppression(predictions, conf_threshold=0.25)
    (multi,) = non_max_suppression(predictions, conf_threshold=0.1, multi_label=True)
    (none,) = non_max_suppression(predictions, conf_threshold=0.35)

    torch.testing.assert_close(best_class[:, 4:], torch.tensor([[0.30, 0.0]]))
    torch.testing.assert_close(multi[:, 4:], torch.tensor([[0.30, 0.0], [0.20, 1.0]]))
    assert none.shape == (0, 6)


def test_nms_limits_detections() -> None:
    centres = torch.arange(10, dtype=torch.float32) * 100
    rows = [_prediction(float(c), 50, 20, 20, 0.9 - 0.01 * i, [1.0]) for i, c in enumerate(centres)]

    (detections,) = non_max_suppression(torch.tensor([rows]), max_detections=4)

    assert detections[:, 0].tolist() == [-10.0, 90.0, 190.0, 290.0]


def test_nms_rejects_wrong_shape() -> None:
    with pytest.raises(InputError, match="batch, n_predictions"):
        non_max_suppression(torch.zeros(10, 85))
