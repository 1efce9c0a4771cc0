"""Rewards for pruning detectors: box mAP on labelled images, or fidelity to the dense model.

Both follow :class:`rl_pruner.reward.RewardEvaluator`: ``evaluate(model)`` returns
``{"reward": r, ...}`` with r in [0, 1]. They hold only tensors and numbers, so they
pickle cheaply to remote workers.

- :class:`DetectionMAPReward` needs labelled images (:func:`rl_pruner.detection.data.load_detection_batches`).
- :class:`FidelityReward` needs no labels: the dense model's own detections are the
  ground truth, so the reward measures how much of the dense model's output survives
  pruning, whatever its accuracy. That also works on a randomly initialised detector.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from rl_pruner.detection.data import DetectionBatch
from rl_pruner.detection.metrics import BoxMAP, BoxMAPEvaluator
from rl_pruner.detection.nms import non_max_suppression
from rl_pruner.errors import DataError, InputError

logger = logging.getLogger(__name__)

# COCO's limit of detections per image in its mAP.
COCO_MAX_DETECTIONS = 100
# Confidence threshold of the official YOLOv7 test script for mAP: low, so that the
# precision-recall curve reaches high recall.
MAP_CONF_THRESHOLD = 0.001


def detect(
    model: nn.Module,
    images: Tensor,
    conf_threshold: float,
    iou_threshold: float,
    max_detections: int,
    multi_label: bool = True,
) -> list[Tensor]:
    """Run ``model`` on ``images`` in eval mode and return its detections after NMS.

    The model's train or eval mode is restored afterwards. Images move to the device
    of the model's first parameter, and the detections come back on the CPU.

    Args:
        model: returns decoded predictions ``(B, N, 5 + n_classes)`` in eval mode, as
            :class:`rl_pruner.models.yolov7.YOLOv7` does.
        images: ``(B, 3, S, S)`` floats in [0, 1].
        conf_threshold, iou_threshold, max_detections, multi_label: see
            :func:`rl_pruner.detection.nms.non_max_suppression`.

    Returns:
        Per image, ``(n, 6)``: x1, y1, x2, y2 (pixels), confidence, class.
    """
    was_training = model.training
    parameter = next(model.parameters(), None)
    if parameter is not None:
        images = images.to(parameter.device)

    model.eval()
    try:
        with torch.inference_mode():
            predictions = model(images)
            if not isinstance(predictions, Tensor):
                raise InputError(
                    f"the detector returned {type(predictions).__name__} in eval mode, but a reward needs one tensor "
                    "(batch, n_predictions, 5 + n_classes) of decoded boxes"
                )
            detections = non_max_suppression(
                predictions.float(),
                conf_threshold=conf_threshold,
                iou_threshold=iou_threshold,
                max_detections=max_detections,
                multi_label=multi_label,
            )
    finally:
        model.train(was_training)
    return [boxes.cpu() for boxes in detections]


class DetectionMAPReward:
    """Box mAP on cached labelled batches; the reward is the chosen mAP, a fraction in [0, 1].

    Detection follows the official YOLOv7 test script: a low confidence threshold and
    one candidate per class above it (multi-label NMS). The batches must come from
    training data, never from the split the pruned model is finally judged on.

    Args:
        batches: ``(images, ground_truths)`` pairs as
            :func:`rl_pruner.detection.data.load_detection_batches` returns.
        metric: ``"map50"`` (mAP at IoU 0.5) or ``"map50_95"`` (mean over IoU 0.50 to
            0.95): which one the reward is.
        conf_threshold: minimum detection confidence, in [0, 1].
        iou_threshold: IoU above which NMS removes the lower-scoring box, in [0, 1].
        max_detections: detections kept per image by NMS and scored, >= 1 (COCO uses 100).
    """

    METRICS = ("map50", "map50_95")

    def __init__(
        self,
        batches: Sequence[DetectionBatch],
        metric: str = "map50",
        conf_threshold: float = MAP_CONF_THRESHOLD,
        iou_threshold: float = 0.65,
        max_detections: int = COCO_MAX_DETECTIONS,
    ) -> None:
        _check_choice("metric", metric, self.METRICS)
        _check_thresholds(conf_threshold, iou_threshold, "max_detections", max_detections)
        if not batches:
            raise DataError("the detection reward split is empty; give it at least one batch of labelled images")
        for index, (images, ground_truths) in enumerate(batches):
            _check_images(images, f"batch {index}")
            if len(ground_truths) != len(images):
                raise InputError(
                    f"batch {index} has {len(images)} images but {len(ground_truths)} ground-truth tensors; "
                    "give one (m, 5) tensor per image"
                )
        n_ground_truths = sum(len(boxes) for _, truths in batches for boxes in truths)
        if n_ground_truths == 0:
            raise DataError(
                "the detection reward images contain no ground-truth box, so mAP is undefined; check that each "
                "image's label file exists at the matching .../labels/... path and is not empty"
            )

        self.metric = metric
        self.conf_threshold = conf_threshold
        self.iou_threshold = iou_threshold
        self.max_detections = max_detections
        self.batches = [(images.detach().cpu(), [boxes.detach().cpu() for boxes in truths]) for images, truths in batches]
        self.n_images = sum(len(images) for images, _ in self.batches)
        self.n_ground_truths = n_ground_truths

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Return ``{"reward": chosen mAP, "map50": ..., "map50_95": ...}`` of ``model``."""
        evaluator = BoxMAPEvaluator(max_detections=self.max_detections)
        for images, ground_truths in self.batches:
            detections = detect(model, images, self.conf_threshold, self.iou_threshold, self.max_detections)
            evaluator.update(detections, ground_truths)
        return _reward_values(evaluator.compute(), self.metric, prefix="")


class FidelityReward:
    """Label-free reward: the mAP of the pruned model against the dense model's detections.

    At construction the dense model runs once on the images. Per image, its
    ``max_ground_truths`` highest-scoring detections above ``conf_threshold`` (one class
    per box) become the ground truth, and only these tensors are kept, no reference to
    the dense model. ``evaluate`` then scores the pruned model's detections against them,
    with the low confidence threshold of mAP (0.001, or ``conf_threshold`` when lower).
    The dense model itself scores 1.0 because its predictions are the ground-truth boxes
    plus, on images with fewer than ``max_ground_truths`` of them, extras scored at most
    ``conf_threshold``, which rank after every ground-truth box.

    Args:
        dense_model: the unpruned detector.
        image_batches: ``(B, 3, S, S)`` images in [0, 1], for example from
            :func:`rl_pruner.detection.data.load_image_batches`.
        metric: ``"fidelity_map50"`` or ``"fidelity_map50_95"``: which one the reward is.
        conf_threshold: minimum confidence of a dense detection to count as ground truth,
            in [0, 1]. An untrained detector needs 0, so that its top detections count
            even though none is confident.
        iou_threshold: NMS IoU threshold for both models, in [0, 1].
        max_ground_truths: detections kept per image, >= 1, of the dense model as
            ground truth and of the evaluated model as predictions. Capping the predictions too
            keeps the dense model at 1: otherwise its extra detections in one image can
            outrank ground-truth boxes of another image and count as false positives first.

    Raises:
        DataError: the dense model detects nothing above ``conf_threshold`` on any image.
    """

    METRICS = ("fidelity_map50", "fidelity_map50_95")

    def __init__(
        self,
        dense_model: nn.Module,
        image_batches: Sequence[Tensor],
        metric: str = "fidelity_map50",
        conf_threshold: float = 0.25,
        iou_threshold: float = 0.65,
        max_ground_truths: int = COCO_MAX_DETECTIONS,
    ) -> None:
        _check_choice("metric", metric, self.METRICS)
        _check_thresholds(conf_threshold, iou_threshold, "max_ground_truths", max_ground_truths)
        if not image_batches:
            raise DataError("the fidelity reward split is empty; give it at least one batch of images")
        for index, images in enumerate(image_batches):
            _check_images(images, f"image batch {index}")

        self.metric = metric
        self.conf_threshold = conf_threshold
        self.iou_threshold = iou_threshold
        self.max_ground_truths = max_ground_truths
        # Predictions are thresholded no higher than the ground truth, so every dense
        # ground-truth box is also among the dense model's predictions.
        self.prediction_conf_threshold = min(MAP_CONF_THRESHOLD, conf_threshold)
        self.image_batches = [images.detach().cpu() for images in image_batches]
        self.ground_truths = [self._dense_ground_truths(dense_model, images) for images in self.image_batches]

        self.n_images = sum(len(images) for images in self.image_batches)
        self.n_ground_truths = sum(len(boxes) for truths in self.ground_truths for boxes in truths)
        if self.n_ground_truths == 0:
            raise DataError(
                f"the dense model detects no box with confidence above {conf_threshold} on any of the "
                f"{self.n_images} fidelity reward images; lower reward.conf_threshold "
                "(an untrained detector needs reward.conf_threshold: 0)"
            )
        logger.info(
            "fidelity reward: %d dense detections kept as ground truth on %d images",
            self.n_ground_truths, self.n_images,
        )

    def _dense_ground_truths(self, dense_model: nn.Module, images: Tensor) -> list[Tensor]:
        # One class per box, like the official detect script, so that a box is never
        # ground truth twice under two classes.
        detections = detect(
            dense_model, images, self.conf_threshold, self.iou_threshold, self.max_ground_truths, multi_label=False
        )
        # Drop the score column: ground truth is x1, y1, x2, y2, class.
        return [boxes[:, [0, 1, 2, 3, 5]].clone() for boxes in detections]

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Return ``{"reward": chosen mAP, "fidelity_map50": ..., "fidelity_map50_95": ...}`` of ``model``."""
        evaluator = BoxMAPEvaluator(max_detections=self.max_ground_truths)
        for images, ground_truths in zip(self.image_batches, self.ground_truths, strict=True):
            # Single-label NMS as for the ground truth: multi-label NMS would add boxes
            # under second-best classes, so even the dense model would score below 1.
            detections = detect(
                model,
                images,
                self.prediction_conf_threshold,
                self.iou_threshold,
                self.max_ground_truths,
                multi_label=False,
            )
            evaluator.update(detections, ground_truths)
        return _reward_values(evaluator.compute(), self.metric, prefix="fidelity_")


def _reward_values(result: BoxMAP, metric: str, prefix: str) -> dict[str, float]:
    values = {f"{prefix}map50": result.map_50, f"{prefix}map50_95": result.map_50_95}
    return {"reward": values[metric], **values}


def _check_choice(name: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise InputError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")


def _check_thresholds(conf_threshold: float, iou_threshold: float, count_name: str, count: int) -> None:
    for name, value in (("conf_threshold", conf_threshold), ("iou_threshold", iou_threshold)):
        if not 0.0 <= value <= 1.0:
            raise InputError(f"{name} must be in [0, 1], got {value}")
    if count < 1:
        raise InputError(f"{count_name} must be a positive number of detections per image, got {count}")


def _check_images(images: Tensor, what: str) -> None:
    if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise InputError(f"{what} must be a (batch, 3, height, width) image tensor, got {shape}")
