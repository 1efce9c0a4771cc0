"""Non-maximum suppression of decoded YOLO predictions, per image and per class."""

from __future__ import annotations

import torch
from torchvision.ops import batched_nms, box_convert

from rl_pruner.errors import InputError


def non_max_suppression(
    predictions: torch.Tensor,
    conf_threshold: float = 0.25,
    iou_threshold: float = 0.45,
    max_detections: int = 300,
    max_candidates: int = 30000,
    multi_label: bool = False,
    class_agnostic: bool = False,
) -> list[torch.Tensor]:
    """Keep the best non-overlapping boxes of each image.

    Args:
        predictions: ``(batch, n_predictions, 5 + n_classes)`` as a YOLOv7 model returns
            in eval mode: centre x, centre y, width, height (pixels), objectness and
            class probabilities, all in [0, 1] except the box.
        conf_threshold: minimum confidence, objectness x class probability, in [0, 1].
        iou_threshold: boxes of one class that overlap a higher-scoring box by more
            than this intersection over union are removed, in [0, 1].
        max_detections: maximum number of boxes kept per image, after NMS.
        max_candidates: maximum number of boxes per image that enter NMS (the highest
            scoring), which bounds its time on images with many candidates.
        multi_label: keep one candidate per class above ``conf_threshold`` instead of
            only the best class of each box (the usual setting for mAP evaluation).
        class_agnostic: suppress overlapping boxes across classes too.

    Returns:
        One ``(n_detections, 6)`` tensor per image: x1, y1, x2, y2 (pixels), confidence
        and class index (as a float), sorted by decreasing confidence.
    """
    if predictions.dim() != 3 or predictions.shape[-1] < 6:
        raise InputError(
            f"predictions must have shape (batch, n_predictions, 5 + n_classes), got {tuple(predictions.shape)}"
        )
    for name, value in (("conf_threshold", conf_threshold), ("iou_threshold", iou_threshold)):
        if not 0.0 <= value <= 1.0:
            raise InputError(f"{name} must be in [0, 1], got {value}")
    if max_detections < 1 or max_candidates < 1:
        raise InputError(
            f"max_detections and max_candidates must be positive, got {max_detections} and {max_candidates}"
        )
    return [
        _suppress_image(
            image, conf_threshold, iou_threshold, max_detections, max_candidates, multi_label, class_agnostic
        )
        for image in predictions
    ]


def _suppress_image(
    predictions: torch.Tensor,
    conf_threshold: float,
    iou_threshold: float,
    max_detections: int,
    max_candidates: int,
    multi_label: bool,
    class_agnostic: bool,
) -> torch.Tensor:
    # Objectness bounds the confidence from above, so this cheap filter drops no box
    # that the confidence filter would keep.
    predictions = predictions[predictions[:, 4] > conf_threshold]
    boxes = box_convert(predictions[:, :4], in_fmt="cxcywh", out_fmt="xyxy")
    class_scores = predictions[:, 5:] * predictions[:, 4:5]

    if multi_label:
        box_index, classes = (class_scores > conf_threshold).nonzero(as_tuple=True)
        scores = class_scores[box_index, classes]
        boxes = boxes[box_index]
    else:
        scores, classes = class_scores.max(1)
        kept = scores > conf_threshold
        boxes, scores, classes = boxes[kept], scores[kept], classes[kept]

    if scores.numel() > max_candidates:
        top = scores.topk(max_candidates).indices
        boxes, scores, classes = boxes[top], scores[top], classes[top]

    groups = torch.zeros_like(classes) if class_agnostic else classes
    kept = batched_nms(boxes, scores, groups, iou_threshold)[:max_detections]
    return torch.cat((boxes[kept], scores[kept, None], classes[kept, None].to(boxes.dtype)), 1)
