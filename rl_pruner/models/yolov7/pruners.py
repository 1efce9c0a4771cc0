"""Torch-Pruning handlers for the implicit layers of the YOLOv7 detection head.

Traced as plain tensor operations, an :class:`~rl_pruner.models.yolov7.modules.ImplicitA`
or :class:`~rl_pruner.models.yolov7.modules.ImplicitM` is an add or a multiply with a
``(1, channels, 1, 1)`` parameter. Registered as customised layers, they behave like a
batch norm instead: input and output channels are the same channels, so pruning one
side removes the same entries of ``implicit``.

To trace a YOLOv7 model with Torch-Pruning 1.6.1, pass :data:`YOLOV7_PRUNERS` (merged
with any other customised pruners) as ``customized_pruners`` and, preferably,
:func:`trace_forward` as ``forward_fn`` to ``DependencyGraph.build_dependency``; never
prune the layers :func:`head_output_convs` returns. Only an unfused head has implicit layers:
fusion folds them into the output convolutions and removes them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch_pruning as tp
from torch import nn

from rl_pruner.models.yolov7.model import YOLOv7
from rl_pruner.models.yolov7.modules import ImplicitA, ImplicitM

ImplicitLayer = ImplicitA | ImplicitM


class ImplicitPruner(tp.pruner.function.BasePruningFunc):
    """Removes channels from an implicit layer's ``(1, channels, 1, 1)`` parameter."""

    TARGET_MODULES = (ImplicitA, ImplicitM)

    def prune_out_channels(self, layer: ImplicitLayer, idxs: Sequence[int]) -> ImplicitLayer:
        removed = {int(index) for index in idxs}
        kept = [channel for channel in range(layer.channel) if channel not in removed]
        kept_index = torch.tensor(kept, dtype=torch.long, device=layer.implicit.device)
        implicit = layer.implicit.data.index_select(1, kept_index).clone()
        layer.implicit = nn.Parameter(implicit, requires_grad=layer.implicit.requires_grad)
        layer.channel = len(kept)
        return layer

    # The same channels enter and leave the layer, so both sides prune alike. Torch-Pruning
    # reads this equality as "input and output channels form one group".
    prune_in_channels = prune_out_channels

    def get_out_channels(self, layer: ImplicitLayer) -> int:
        return layer.channel

    def get_in_channels(self, layer: ImplicitLayer) -> int:
        return layer.channel


_IMPLICIT_PRUNER = ImplicitPruner()

YOLOV7_PRUNERS: dict[type, tp.pruner.function.BasePruningFunc] = {
    ImplicitA: _IMPLICIT_PRUNER,
    ImplicitM: _IMPLICIT_PRUNER,
}


def trace_forward(model: YOLOv7, example_inputs: torch.Tensor) -> list[torch.Tensor]:
    """Forward pass for Torch-Pruning's tracer: the raw head outputs, without box decoding.

    Keeping the decoding (reshapes, slices, a concatenation across levels) out of the
    traced graph keeps the head's output channels out of every group. With the full
    forward pass, the head convolutions must be ignored: rooted at them, grouping
    YOLOv7-tiny with Torch-Pruning 1.6.1 had not finished after 10 minutes on 2 CPU
    cores, against well under a second otherwise.
    """
    return model.level_maps(example_inputs)


def head_output_convs(model: YOLOv7) -> list[nn.Conv2d]:
    """The head's per-level output convolutions; their output channels must never be pruned."""
    return list(model.head.m)
