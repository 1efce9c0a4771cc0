"""Object detection utilities: non-maximum suppression and box mAP."""

from rl_pruner.detection.metrics import BoxMAP, BoxMAPEvaluator, box_map
from rl_pruner.detection.nms import non_max_suppression

__all__ = ["BoxMAP", "BoxMAPEvaluator", "box_map", "non_max_suppression"]
