"""Box mAP@0.5 and mAP@0.5:0.95, computed by pycocotools' COCO evaluation.

The figures are COCO's: average precision per class, 101-point interpolated, over
IoU thresholds 0.50, 0.55, ..., 0.95 (or 0.50 alone), with at most
``max_detections`` highest-scoring detections per image, averaged over the classes
that have at least one ground-truth box. Object sizes are not separated.

Boxes are x1, y1, x2, y2 in pixels. Class indices start at 0.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from rl_pruner.errors import InputError, RLPrunerError

logger = logging.getLogger(__name__)

PYCOCOTOOLS_REQUIREMENT = "pycocotools==2.0.11"


@dataclass(frozen=True)
class BoxMAP:
    """Detection accuracy on a set of images; mAP values are fractions in [0, 1]."""

    map_50: float  # mean average precision at IoU 0.5
    map_50_95: float  # mean over IoU thresholds 0.50, 0.55, ..., 0.95
    n_images: int
    n_ground_truths: int
    n_predictions: int


class BoxMAPEvaluator:
    """Collects detections image by image, then computes :class:`BoxMAP` once.

    Args:
        max_detections: per image, only this many highest-scoring detections count
            (COCO uses 100).
    """

    def __init__(self, max_detections: int = 100) -> None:
        if max_detections < 1:
            raise InputError(f"max_detections must be positive, got {max_detections}")
        self.max_detections = max_detections
        self._predictions: list[torch.Tensor] = []
        self._ground_truths: list[torch.Tensor] = []

    def update(self, predictions: Sequence[torch.Tensor], ground_truths: Sequence[torch.Tensor]) -> None:
        """Add a batch of images.

        Args:
            predictions: per image, ``(n, 6)``: x1, y1, x2, y2, score, class, as
                :func:`rl_pruner.detection.nms.non_max_suppression` returns.
            ground_truths: per image, ``(m, 5)``: x1, y1, x2, y2, class.
        """
        if len(predictions) != len(ground_truths):
            raise InputError(
                f"got predictions for {len(predictions)} images but ground truth for {len(ground_truths)}"
            )
        offset = len(self._predictions)
        for index, (predicted, truth) in enumerate(zip(predictions, ground_truths, strict=True)):
            image = offset + index
            self._predictions.append(_checked_boxes(predicted, 6, f"predictions of image {image}"))
            self._ground_truths.append(_checked_boxes(truth, 5, f"ground truth of image {image}"))

    def reset(self) -> None:
        """Forget every image added so far."""
        self._predictions.clear()
        self._ground_truths.clear()

    def compute(self) -> BoxMAP:
        """Run the COCO evaluation on every image added.

        Raises:
            InputError: no ground-truth box was added, so no class can be scored.
            RLPrunerError: pycocotools is not installed.
        """
        n_ground_truths = sum(len(boxes) for boxes in self._ground_truths)
        n_predictions = sum(len(boxes) for boxes in self._predictions)
        if n_ground_truths == 0:
            raise InputError("mAP needs at least one ground-truth box; none was added")

        if n_predictions == 0:
            map_50, map_50_95 = 0.0, 0.0
        else:
            map_50, map_50_95 = self._coco_map()
        result = BoxMAP(
            map_50=map_50,
            map_50_95=map_50_95,
            n_images=len(self._ground_truths),
            n_ground_truths=n_ground_truths,
            n_predictions=n_predictions,
        )
        logger.debug("box mAP: %s", result)
        return result

    def _coco_map(self) -> tuple[float, float]:
        coco_module, cocoeval_module = _import_pycocotools()
        ground_truth = coco_module.COCO()
        ground_truth.dataset = _ground_truth_dataset(self._ground_truths, self._predictions)
        captured = io.StringIO()
        # pycocotools reports progress with print; keep it out of the caller's stdout.
        with contextlib.redirect_stdout(captured):
            ground_truth.createIndex()
            detections = ground_truth.loadRes(_detection_records(self._predictions))
            evaluation = cocoeval_module.COCOeval(ground_truth, detections, iouType="bbox")
            # pycocotools expects the caps in ascending order and matches with the last.
            caps = sorted({1, 10, self.max_detections})
            evaluation.params.maxDets = caps
            evaluation.evaluate()
            evaluation.accumulate()
        logger.debug("pycocotools output:\n%s", captured.getvalue())
        # COCOeval.summarize() computes its headline AP with 100 detections per image
        # whatever maxDets is set to (pycocotools 2.0.11), so the means are taken here from
        # the precision table: IoU thresholds x recall points x classes x areas x caps,
        # with -1 where a class has no ground truth. Area 0 is "all".
        precision = evaluation.eval["precision"][:, :, :, 0, caps.index(self.max_detections)]
        at_50 = precision[int(np.argmin(np.abs(evaluation.params.iouThrs - 0.5)))]
        return _mean_of_valid(at_50), _mean_of_valid(precision)


def _mean_of_valid(precision: np.ndarray) -> float:
    valid = precision[precision > -1]
    return float(valid.mean()) if valid.size else 0.0


def box_map(
    predictions: Sequence[torch.Tensor],
    ground_truths: Sequence[torch.Tensor],
    max_detections: int = 100,
) -> BoxMAP:
    """mAP@0.5 and mAP@0.5:0.95 of ``predictions`` against ``ground_truths``.

    Both are per-image sequences in the formats of :meth:`BoxMAPEvaluator.update`.
    """
    evaluator = BoxMAPEvaluator(max_detections=max_detections)
    evaluator.update(predictions, ground_truths)
    return evaluator.compute()


def _import_pycocotools() -> tuple[Any, Any]:
    try:
        from pycocotools import coco, cocoeval
    except ImportError as err:
        raise RLPrunerError(
            f"box mAP needs pycocotools, which is not installed; run: pip install '{PYCOCOTOOLS_REQUIREMENT}'"
        ) from err
    return coco, cocoeval


def _checked_boxes(boxes: torch.Tensor, n_columns: int, what: str) -> torch.Tensor:
    boxes = torch.as_tensor(boxes).detach().to("cpu", torch.float64)
    if boxes.numel() == 0:
        return boxes.reshape(0, n_columns)
    if boxes.dim() != 2 or boxes.shape[1] != n_columns:
        raise InputError(f"{what} must have shape (n, {n_columns}), got {tuple(boxes.shape)}")
    if not torch.isfinite(boxes).all():
        raise InputError(f"{what} contains a value that is not finite (NaN or infinity)")
    if (boxes[:, 2] < boxes[:, 0]).any() or (boxes[:, 3] < boxes[:, 1]).any():
        raise InputError(f"{what} contains an invalid box with x2 < x1 or y2 < y1. Boxes must be x1, y1, x2, y2")
    classes = boxes[:, -1]
    if (classes < 0).any() or (classes != classes.round()).any():
        raise InputError(f"{what} contains an invalid class index; classes must be non-negative integers")
    return boxes


def _category_id(class_index: float) -> int:
    # COCO ids start at 1; 0 would read as "no match" inside pycocotools' matching.
    return int(class_index) + 1


def _xywh(box: torch.Tensor) -> list[float]:
    x1, y1, x2, y2 = (float(value) for value in box[:4])
    return [x1, y1, x2 - x1, y2 - y1]


def _ground_truth_dataset(
    ground_truths: Sequence[torch.Tensor], predictions: Sequence[torch.Tensor]
) -> dict[str, Any]:
    annotations = []
    for image_index, boxes in enumerate(ground_truths):
        for box in boxes:
            bbox = _xywh(box)
            annotations.append({
                "id": len(annotations) + 1,
                "image_id": image_index + 1,
                "category_id": _category_id(float(box[4])),
                "bbox": bbox,
                "area": bbox[2] * bbox[3],
                "iscrowd": 0,
            })
    classes = {float(c) for boxes in (*ground_truths, *predictions) for c in boxes[:, -1].tolist()}
    return {
        "images": [{"id": index + 1} for index in range(len(ground_truths))],
        "annotations": annotations,
        "categories": [{"id": _category_id(c)} for c in sorted(classes)],
    }


def _detection_records(predictions: Sequence[torch.Tensor]) -> list[dict[str, Any]]:
    return [
        {
            "image_id": image_index + 1,
            "category_id": _category_id(float(box[5])),
            "bbox": _xywh(box),
            "score": float(box[4]),
        }
        for image_index, boxes in enumerate(predictions)
        for box in boxes
    ]
