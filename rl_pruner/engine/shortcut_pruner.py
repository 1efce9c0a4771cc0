"""Torch-Pruning handler for :class:`~rl_pruner.models.cifar_resnet.ZeroPadShortcut`.

Torch-Pruning cannot see through the shortcut's channel padding: traced as plain
tensor operations, the padded output is tied to the wrong channels and the pruned
model fails at its classifier. Registered as a customised layer, the shortcut gets
input and output channels of its own, like a convolution, so the previous stage's
residual channels and this stage's are separate groups. Pruning either side edits
the index vectors that map each copied input channel to its output channel.

:data:`CUSTOMIZED_PRUNERS` is the one registry of customised layers that every
dependency graph of the engine is built with: this shortcut and the implicit layers of
the YOLOv7 head (:data:`~rl_pruner.models.yolov7.pruners.YOLOV7_PRUNERS`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch_pruning as tp

from rl_pruner.models.cifar_resnet import ZeroPadShortcut
from rl_pruner.models.yolov7.pruners import YOLOV7_PRUNERS


def _remaining_positions(n_channels: int, removed: Sequence[int]) -> torch.Tensor:
    """Map each old channel index to its new index, or -1 where it is removed."""
    keep = torch.ones(n_channels, dtype=torch.bool)
    keep[list(removed)] = False
    new_index = torch.full((n_channels,), -1, dtype=torch.long)
    new_index[keep] = torch.arange(int(keep.sum()))
    return new_index


class ZeroPadShortcutPruner(tp.pruner.function.BasePruningFunc):
    """Prunes the two sides of a zero-padding shortcut independently."""

    TARGET_MODULES = ZeroPadShortcut

    def prune_out_channels(self, layer: ZeroPadShortcut, idxs: Sequence[int]) -> ZeroPadShortcut:
        new_index = _remaining_positions(layer.out_channels, idxs)
        mapped = new_index[layer.target_index]
        kept = mapped >= 0
        layer.source_index = layer.source_index[kept]
        layer.target_index = mapped[kept]
        layer.out_channels -= len(set(idxs))
        return layer

    def prune_in_channels(self, layer: ZeroPadShortcut, idxs: Sequence[int]) -> ZeroPadShortcut:
        new_index = _remaining_positions(layer.in_channels, idxs)
        mapped = new_index[layer.source_index]
        kept = mapped >= 0
        layer.source_index = mapped[kept]
        layer.target_index = layer.target_index[kept]
        layer.in_channels -= len(set(idxs))
        return layer

    def get_out_channels(self, layer: ZeroPadShortcut) -> int:
        return layer.out_channels

    def get_in_channels(self, layer: ZeroPadShortcut) -> int:
        return layer.in_channels


CUSTOMIZED_PRUNERS: dict[type, tp.pruner.function.BasePruningFunc] = {
    ZeroPadShortcut: ZeroPadShortcutPruner(),
    **YOLOV7_PRUNERS,
}
