"""Batch-norm re-estimation after pruning.

Pruning changes the inputs of each batch norm, so its running statistics go stale.
:func:`reestimate_batchnorm` resets them and recomputes exact averages over a few
training batches without gradients; weights are not changed.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def reestimate_batchnorm(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> nn.Module:
    """Reset every batch norm's running statistics and re-estimate them on ``batches``.

    Statistics are cumulative averages over all batches (``momentum=None``), and only
    batch-norm layers run in training mode, so dropout and the like stay in eval mode.
    The model is returned in eval mode.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return model.eval()
    saved_momentum = [m.momentum for m in norms]
    model.eval()
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
        norm.train()
    try:
        with torch.no_grad():
            for images, _labels in batches:
                model(images)
    finally:
        for norm, momentum in zip(norms, saved_momentum, strict=True):
            norm.momentum = momentum
        model.eval()
    return model
