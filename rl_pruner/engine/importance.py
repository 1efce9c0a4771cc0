"""Channel importance criteria, computed once per dense model.

Each criterion scores every channel of every layer; pruning a layer removes its
lowest-scoring channels (ties go to the lower index). Scores come from
Torch-Pruning's group importance, which combines all modules of a dependency group
(the producing convolution, its batch norm, the consuming layers' input weights):

- ``l1``, ``l2``: group L1 / L2 norm of the weights (``MagnitudeImportance``).
- ``lamp``: layer-adaptive magnitude (LAMP). Within one layer it ranks channels as
  ``l2`` does; the two differ only when layers are compared, as in global allocation.
- ``fpgm``: distance to the geometric median of the layer's filters.
- ``bn_scale``: absolute batch-norm scale (network slimming).
- ``taylor``: first-order Taylor, |weight x gradient| summed over the group, with
  gradients of a calibration loss summed over calibration batches. The loss is the
  model's method ``rl_pruner_calibration_loss(images, targets)`` where it defines one
  (a detector, whose output does not fit a classification loss), else the
  cross-entropy of the output against the labels.
- ``apoz``: 1 - average percentage of zeros in the layer's output activations, as
  seen at the inputs of the layers that consume it, over calibration batches.
  Torch-Pruning 1.6.1 has no APoZ criterion, so this one is implemented here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
import torch_pruning as tp
from torch import nn

from rl_pruner.engine.shortcut_pruner import CUSTOMIZED_PRUNERS
from rl_pruner.engine.structure import ModelStructure
from rl_pruner.errors import InputError
from rl_pruner.policy import DATA_CRITERIA, check_criterion

logger = logging.getLogger(__name__)

Batches = Sequence[tuple[torch.Tensor, torch.Tensor]]
CalibrationLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# Method a model may define to replace the cross-entropy of ``taylor``. It takes a
# calibration batch (images, targets) and returns a scalar loss to differentiate.
CALIBRATION_LOSS_METHOD = "rl_pruner_calibration_loss"


def _torch_pruning_importance(criterion: str) -> tp.importance.Importance:
    if criterion == "l1":
        return tp.importance.MagnitudeImportance(p=1)
    if criterion == "l2":
        return tp.importance.MagnitudeImportance(p=2)
    if criterion == "lamp":
        return tp.importance.LAMPImportance(p=2)
    if criterion == "fpgm":
        return tp.importance.FPGMImportance(p=2)
    if criterion == "bn_scale":
        return tp.importance.BNScaleImportance()
    if criterion == "taylor":
        return tp.importance.TaylorImportance()
    raise ValueError(f"no Torch-Pruning importance for {criterion!r}")


def compute_importance(
    model: nn.Module,
    structure: ModelStructure,
    criterion: str,
    calibration_batches: Batches | None = None,
) -> dict[str, torch.Tensor]:
    """Score every channel of every layer of the dense ``model``; higher is more important.

    ``taylor`` and ``apoz`` need ``calibration_batches`` of (images, labels). The model's
    weights and batch-norm statistics are left unchanged.
    """
    check_criterion(criterion)
    if criterion in DATA_CRITERIA and not calibration_batches:
        raise InputError(
            f"criterion {criterion!r} needs calibration images; pass --data (and --calibration-images)"
        )
    model.eval()
    if criterion == "apoz":
        return _apoz_scores(model, structure, calibration_batches or [])

    example = torch.zeros(1, *structure.input_shape)
    graph = tp.DependencyGraph().build_dependency(
        model, example, customized_pruners=dict(CUSTOMIZED_PRUNERS), verbose=False
    )
    if criterion == "taylor":
        _accumulate_gradients(model, calibration_batches or [])
    importance = _torch_pruning_importance(criterion)
    modules = dict(model.named_modules())
    scores: dict[str, torch.Tensor] = {}
    try:
        for layer in structure.layers:
            root = modules[layer.name]
            handler = graph.get_pruner_of_module(root).prune_out_channels
            group = graph.get_pruning_group(root, handler, idxs=list(range(layer.channels)))
            score = importance(group)
            if score is None:
                logger.warning("criterion %s gave no score for layer %s; using zeros", criterion, layer.name)
                score = torch.zeros(layer.channels)
            scores[layer.name] = score.detach().float().cpu()
    finally:
        if criterion == "taylor":
            model.zero_grad(set_to_none=True)
    return scores


def _calibration_loss(model: nn.Module) -> CalibrationLoss:
    """Return the model's own calibration loss if it defines one, else cross-entropy on its output."""
    model_loss = getattr(model, CALIBRATION_LOSS_METHOD, None)
    if model_loss is None:
        cross_entropy = nn.CrossEntropyLoss()
        return lambda images, labels: cross_entropy(model(images), labels)
    if not callable(model_loss):
        raise InputError(
            f"{type(model).__name__}.{CALIBRATION_LOSS_METHOD} is not callable (type "
            f"{type(model_loss).__name__}). Make it a method taking (images, targets) that returns a scalar loss tensor"
        )
    return model_loss


def _accumulate_gradients(model: nn.Module, batches: Batches) -> None:
    """Sum the calibration loss's gradients over the batches, with batch norm in eval mode."""
    model.zero_grad(set_to_none=True)
    loss_fn = _calibration_loss(model)
    for images, targets in batches:
        loss = loss_fn(images, targets)
        _check_scalar_loss(model, loss)
        loss.backward()


def _check_scalar_loss(model: nn.Module, loss: object) -> None:
    """Raise InputError unless ``loss`` is a scalar tensor that gradients can flow from."""
    if not isinstance(loss, torch.Tensor):
        returned = f"a {type(loss).__name__}"
    elif loss.dim() != 0:
        returned = f"a tensor of shape {tuple(loss.shape)}"
    elif not loss.requires_grad:
        returned = "a scalar tensor without gradient"
    else:
        return
    raise InputError(
        f"the taylor calibration loss of {type(model).__name__} returned {returned}, but it must return "
        "a scalar tensor computed from the model's parameters"
    )


def _apoz_scores(model: nn.Module, structure: ModelStructure, batches: Batches) -> dict[str, torch.Tensor]:
    modules = dict(model.named_modules())
    consumers = {
        member.module_name
        for layer in structure.layers
        for member in layer.members
        if isinstance(modules[member.module_name], (nn.Conv2d, nn.Linear)) and member.dimension == "in"
    }
    zeros: dict[str, torch.Tensor] = {}
    totals: dict[str, int] = {}

    def record(name: str, inputs: tuple[torch.Tensor, ...]) -> None:
        activation = inputs[0]
        channel_dim = 1 if activation.dim() > 2 else -1
        moved = activation.movedim(channel_dim, 0).reshape(activation.shape[channel_dim], -1)
        zeros[name] = zeros.get(name, 0) + (moved == 0).sum(dim=1).double()
        totals[name] = totals.get(name, 0) + moved.shape[1]

    hooks = [
        modules[name].register_forward_pre_hook(lambda _m, inputs, name=name: record(name, inputs))
        for name in consumers
    ]
    try:
        with torch.no_grad():
            for images, _labels in batches:
                model(images)
    finally:
        for hook in hooks:
            hook.remove()

    scores: dict[str, torch.Tensor] = {}
    for layer in structure.layers:
        per_member = []
        for member in layer.members:
            if member.dimension != "in" or member.module_name not in zeros:
                continue
            share = zeros[member.module_name] / totals[member.module_name]
            per_member.append(torch.stack([share[list(idx)].mean() for idx in member.index_map]))
        if per_member:
            apoz = torch.stack(per_member).mean(dim=0)
        else:
            apoz = torch.zeros(layer.channels, dtype=torch.float64)
        scores[layer.name] = (1.0 - apoz).float()
    return scores
