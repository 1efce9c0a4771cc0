"""YOLOv7 and YOLOv7-tiny detectors built from official-style model YAMLs.

Our own implementation of the architecture: parameter names match the official
release, so its state_dicts load key for key. Configurations are read without
evaluating their text (see :mod:`rl_pruner.models.yolov7.config`).
"""

from rl_pruner.models.yolov7.config import (
    ActivationSpec,
    LayerSpec,
    YOLOv7Config,
    load_yolov7_config,
)
from rl_pruner.models.yolov7.export import export_yolov7
from rl_pruner.models.yolov7.model import MODULES, DroppedLayer, ElanTail, YOLOv7, build_yolov7, fuse_yolov7
from rl_pruner.models.yolov7.modules import (
    MP,
    SP,
    SPPCSPC,
    Concat,
    Conv,
    Detect,
    IDetect,
    ImplicitA,
    ImplicitM,
    RepConv,
)

__all__ = [
    "MODULES",
    "MP",
    "SP",
    "SPPCSPC",
    "ActivationSpec",
    "Concat",
    "Conv",
    "Detect",
    "DroppedLayer",
    "ElanTail",
    "IDetect",
    "ImplicitA",
    "ImplicitM",
    "LayerSpec",
    "RepConv",
    "YOLOv7",
    "YOLOv7Config",
    "build_yolov7",
    "export_yolov7",
    "fuse_yolov7",
    "load_yolov7_config",
]
