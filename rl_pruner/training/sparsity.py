"""Sparsity training before pruning: a batch-norm L1 penalty and gradual magnitude masks.

Batch-norm L1 penalty (network slimming: Liu et al., "Learning Efficient Convolutional
Networks through Network Slimming", ICCV 2017). The training loss gets the extra term
``strength * sum(|gamma|)`` over the scales ``gamma`` of every batch norm. It is added
as its subgradient ``strength * sign(gamma)`` to the scales' gradients after
``backward()``, so the loss itself and its logged value stay unchanged. Channels whose
scale reaches about 0 then contribute little, and the ``bn_scale`` criterion removes
them first. The strength follows :class:`BNPenaltySchedule`: constant, or a linear
warm-up from 0.

Gradual magnitude masks (Zhu and Gupta, "To prune, or not to prune", 2017). Each
masked layer's weight is multiplied by a 0/1 mask that keeps its largest-magnitude
entries. The share of zeros in every layer follows the cubic schedule of
:class:`CubicSparsitySchedule`, and the masks are recomputed from the dense weights every
``update_every`` steps. The forward pass uses the masked weight, while the backward pass
uses a straight-through estimator: the dense weight receives the gradient of the
masked weight unchanged, so a removed weight can grow back while the schedule is
running. :func:`remove_weight_masks` writes the masked weights into the layers.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.utils.data import Dataset

from rl_pruner.errors import InputError, RLPrunerError
from rl_pruner.training.loop import (
    Batch,
    MetricsTracker,
    ModelExporter,
    TrainingConfig,
    TrainingHooks,
    TrainingResult,
    log_models,
    train,
)

logger = logging.getLogger(__name__)

SMALL_BN_SCALE = 1e-2
"""Threshold below which :func:`bn_scale_share_below` counts a batch-norm scale as small."""
PENALTY_KINDS = ("constant", "linear_warmup")


class MaskedWeight(nn.Module):
    """Weight parametrization that multiplies the weight by a fixed 0/1 ``mask`` buffer.

    With ``straight_through=True`` the forward value is still ``weight * mask``, but the
    gradient reaches every entry of the dense weight unchanged (straight-through
    estimator). With ``straight_through=False`` masked entries get zero gradient, so
    they stay removed. The mask is a buffer, so it is saved with the model's state dict.
    """

    def __init__(self, mask: Tensor, straight_through: bool) -> None:
        super().__init__()
        self.straight_through = straight_through
        self.register_buffer("mask", mask.detach().clone().to(torch.bool))

    def forward(self, weight: Tensor) -> Tensor:
        masked = weight * self.mask
        if self.straight_through:
            return weight + (masked - weight).detach()
        return masked


@dataclass(frozen=True)
class BNPenaltySchedule:
    """Strength of the batch-norm L1 penalty at each optimizer step.

    :param strength: penalty weight per unit of ``sum(|gamma|)``, >= 0, added to a loss
        that is a mean over the batch. Network slimming used 1e-5 to 1e-4 over full
        training runs, so a run of one or a few epochs needs larger values to move the scales.
        With SGD momentum ``m``, the penalty alone lowers every scale by about
        ``learning_rate * strength / (1 - m)`` per step, 10 times the plain step for m = 0.9.
    :param kind: ``"constant"``, or ``"linear_warmup"`` from 0 at step 0 to ``strength`` at ``warmup_steps``.
    :param warmup_steps: optimizer steps of the warm-up, at least 1 with ``"linear_warmup"``.
    """

    strength: float
    kind: str = "constant"
    warmup_steps: int = 0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.strength) and self.strength >= 0):
            raise InputError(f"batch-norm L1 strength is {self.strength}; it must be 0 or more")
        if self.kind not in PENALTY_KINDS:
            raise InputError(f"batch-norm L1 schedule is {self.kind!r}; use one of {', '.join(PENALTY_KINDS)}")
        if self.kind == "linear_warmup" and self.warmup_steps < 1:
            raise InputError(
                f"batch-norm L1 warm-up is {self.warmup_steps} steps; a linear warm-up needs at least 1 step"
            )

    def strength_at(self, step: int) -> float:
        """Return the penalty strength at optimizer step ``step`` (from 0)."""
        if self.kind == "constant":
            return self.strength
        return self.strength * min(1.0, step / self.warmup_steps)

    def to_dict(self) -> dict[str, Any]:
        return {"bn_l1.strength": self.strength, "bn_l1.kind": self.kind, "bn_l1.warmup_steps": self.warmup_steps}


@dataclass(frozen=True)
class CubicSparsitySchedule:
    """Target share of zero weights per masked layer at each optimizer step (Zhu and Gupta, 2017).

    ``s(t) = final + (initial - final) * (1 - (t - begin_step) / (end_step - begin_step)) ** 3``
    for ``begin_step <= t <= end_step``, ``initial`` before and ``final`` after. Masks
    change only at steps that are multiples of ``update_every`` and at ``end_step``.

    :param final_sparsity: share of zeros at ``end_step``, in [0, 1).
    :param begin_step: optimizer step where pruning starts, >= 0.
    :param end_step: optimizer step where the final sparsity is reached, > ``begin_step``.
    :param update_every: optimizer steps between two mask updates, at least 1.
    :param initial_sparsity: share of zeros at ``begin_step``, in [0, ``final_sparsity``].
    """

    final_sparsity: float
    begin_step: int
    end_step: int
    update_every: int = 100
    initial_sparsity: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.final_sparsity < 1.0:
            raise InputError(f"final sparsity is {self.final_sparsity}; it must be in [0, 1)")
        if not 0.0 <= self.initial_sparsity <= self.final_sparsity:
            raise InputError(
                f"initial sparsity is {self.initial_sparsity}; it must be in [0, final sparsity {self.final_sparsity}]"
            )
        if self.begin_step < 0 or self.end_step <= self.begin_step:
            raise InputError(
                f"sparsity schedule runs from step {self.begin_step} to {self.end_step}; "
                "the begin step must be 0 or more and the end step after it"
            )
        if self.update_every < 1:
            raise InputError(f"mask update interval is {self.update_every}; it must be at least 1 optimizer step")

    def sparsity_at(self, step: int) -> float:
        """Return the target share of zero weights at optimizer step ``step``."""
        if step <= self.begin_step:
            return self.initial_sparsity
        if step >= self.end_step:
            return self.final_sparsity
        remaining = 1.0 - (step - self.begin_step) / (self.end_step - self.begin_step)
        return self.final_sparsity + (self.initial_sparsity - self.final_sparsity) * remaining**3

    def updates_at(self, step: int) -> bool:
        """Return True when the masks change at optimizer step ``step``."""
        in_range = self.begin_step <= step <= self.end_step
        return in_range and (step % self.update_every == 0 or step == self.end_step)

    def to_dict(self) -> dict[str, Any]:
        return {
            "magnitude.final_sparsity": self.final_sparsity, "magnitude.begin_step": self.begin_step,
            "magnitude.end_step": self.end_step, "magnitude.update_every": self.update_every,
            "magnitude.initial_sparsity": self.initial_sparsity,
        }


def batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """Return every batch norm of ``model`` that has a learnable scale (``affine=True``)."""
    return [
        module for module in model.modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.weight is not None
    ]


def add_bn_l1_subgradient(model: nn.Module, strength: float) -> None:
    """Add ``strength * sign(gamma)`` to the gradient of every batch-norm scale ``gamma``.

    This is the subgradient of ``strength * sum(|gamma|)``, with 0 at ``gamma = 0``.
    Call it after ``loss.backward()`` and before the optimizer step. A scale without a
    gradient gets this term as its gradient, and a frozen scale is skipped.
    """
    if strength == 0:
        return
    with torch.no_grad():
        for norm in batchnorm_layers(model):
            scale = norm.weight
            if not scale.requires_grad:
                continue
            penalty = torch.sign(scale) * strength
            if scale.grad is None:
                scale.grad = penalty
            else:
                scale.grad.add_(penalty)


def bn_scale_share_below(model: nn.Module, threshold: float = SMALL_BN_SCALE) -> float:
    """Return the share, in [0, 1], of batch-norm channels whose scale has ``|gamma| < threshold``.

    Raises InputError when the model has no batch norm with a learnable scale.
    """
    scales = [norm.weight.detach().abs().flatten() for norm in batchnorm_layers(model)]
    if not scales:
        raise InputError("the model has no batch norm with a learnable scale, so no share of small scales exists")
    values = torch.cat(scales)
    return float((values < threshold).float().mean())


def magnitude_mask(weight: Tensor, sparsity: float) -> Tensor:
    """Return a 0/1 mask that zeroes the ``round(sparsity * numel)`` smallest-magnitude entries of ``weight``.

    Ties between equal magnitudes go to the entry that comes first in memory order.
    """
    n_zeros = round(sparsity * weight.numel())
    mask = torch.ones(weight.numel(), dtype=torch.bool, device=weight.device)
    if n_zeros > 0:
        order = torch.sort(weight.detach().abs().flatten(), stable=True).indices
        mask[order[:n_zeros]] = False
    return mask.view_as(weight)


def default_mask_layers(model: nn.Module) -> list[str]:
    """Names of the convolutions and linear layers of ``model``, except the first convolution and the last layer.

    The first convolution has few weights and takes the raw image, and the last layer
    produces the logits. Both are commonly left dense in magnitude pruning.
    """
    names = [name for name, module in model.named_modules() if isinstance(module, (nn.Conv2d, nn.Linear))]
    return names[1:-1]


def attach_weight_masks(model: nn.Module, masks: Mapping[str, Tensor], *, straight_through: bool) -> None:
    """Register a :class:`MaskedWeight` parametrization with the given mask on each named layer.

    Raises InputError for a name that is not a layer of ``model`` with a ``weight`` or
    for a mask whose shape differs from that weight.
    """
    modules = dict(model.named_modules())
    for name, mask in masks.items():
        module = modules.get(name)
        if module is None or not isinstance(getattr(module, "weight", None), Tensor):
            raise InputError(f"layer {name!r} to mask is not a layer of the model with a weight")
        if parametrize.is_parametrized(module, "weight"):
            raise InputError(f"layer {name!r} already has a weight parametrization; remove it before masking")
        if tuple(mask.shape) != tuple(module.weight.shape):
            raise InputError(f"mask of {name!r} has shape {tuple(mask.shape)}, the weight {tuple(module.weight.shape)}")
        parametrize.register_parametrization(module, "weight", MaskedWeight(mask.to(module.weight.device), straight_through))


def masked_layers(model: nn.Module) -> dict[str, MaskedWeight]:
    """Return the :class:`MaskedWeight` parametrization of every masked layer, by layer name."""
    found = {}
    for name, module in model.named_modules():
        if parametrize.is_parametrized(module, "weight"):
            for parametrization in module.parametrizations["weight"]:
                if isinstance(parametrization, MaskedWeight):
                    found[name] = parametrization
    return found


def remove_weight_masks(model: nn.Module) -> list[str]:
    """Write the masked weights into every masked layer and remove the parametrizations; return the layer names."""
    names = list(masked_layers(model))
    modules = dict(model.named_modules())
    for name in names:
        parametrize.remove_parametrizations(modules[name], "weight", leave_parametrized=True)
    return names


def weight_sparsity(model: nn.Module) -> float:
    """Return the share of zero entries over all masks of ``model``, or 0.0 without masks."""
    masks = [parametrization.mask for parametrization in masked_layers(model).values()]
    if not masks:
        return 0.0
    n_total = sum(mask.numel() for mask in masks)
    n_zero = sum(int((~mask).sum()) for mask in masks)
    return n_zero / n_total


class SparsityHooks(TrainingHooks):
    """Training hooks that add the batch-norm L1 subgradient and update the magnitude masks.

    ``magnitude`` needs masks attached beforehand with :func:`attach_weight_masks`
    (``straight_through=True``), as :func:`train_sparse` does.
    """

    def __init__(
        self, bn_penalty: BNPenaltySchedule | None = None, magnitude: CubicSparsitySchedule | None = None
    ) -> None:
        self.bn_penalty = bn_penalty
        self.magnitude = magnitude

    def after_backward(self, model: nn.Module, step: int) -> None:
        if self.bn_penalty is not None:
            add_bn_l1_subgradient(model, self.bn_penalty.strength_at(step))

    def after_step(self, model: nn.Module, step: int) -> None:
        # The step just taken is number step + 1, so the masks take the sparsity of the
        # state the weights are now in.
        if self.magnitude is not None and self.magnitude.updates_at(step + 1):
            update_magnitude_masks(model, self.magnitude.sparsity_at(step + 1))

    def epoch_metrics(self, model: nn.Module) -> dict[str, float]:
        metrics = {"sparsity/bn_small_share": bn_scale_share_below(model)} if batchnorm_layers(model) else {}
        if self.magnitude is not None:
            metrics["sparsity/weight_sparsity"] = weight_sparsity(model)
        return metrics


def update_magnitude_masks(model: nn.Module, sparsity: float) -> None:
    """Recompute every straight-through mask of ``model`` to zero a ``sparsity`` share of its dense weight."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, parametrization in masked_layers(model).items():
            if not parametrization.straight_through:
                continue
            dense = modules[name].parametrizations["weight"].original
            parametrization.mask.copy_(magnitude_mask(dense, sparsity))


def train_sparse(
    model: nn.Module,
    train_data: Dataset,
    config: TrainingConfig,
    *,
    bn_penalty: BNPenaltySchedule | None = None,
    magnitude: CubicSparsitySchedule | None = None,
    mask_layers: Sequence[str] | None = None,
    test_batches: Iterable[Batch] | None = None,
    state_path: str | Path | None = None,
    resume: bool = False,
    tracker: MetricsTracker | None = None,
    export_model: ModelExporter | None = None,
    settings: Mapping[str, Any] | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> TrainingResult:
    """Train ``model`` in place with cross-entropy plus the batch-norm L1 penalty and/or magnitude masks.

    With ``magnitude``, masks are attached to ``mask_layers`` (default:
    :func:`default_mask_layers`) at the schedule's initial sparsity and written into
    the weights when training ends, so the returned model and ``best_state_dict`` have
    plain weights with zeros. Without either, this is plain fine-tuning. Raises
    DataError when ``train_data`` has a ``classes`` list whose length differs from the
    model's outputs. ``settings`` and the other keyword arguments go to
    :func:`rl_pruner.training.loop.train`, which handles resumption, Ctrl-C and MLflow logging.
    """
    run_settings: dict[str, Any] = dict(settings or {})
    masks: dict[str, Tensor] = {}
    if bn_penalty is not None:
        run_settings.update(bn_penalty.to_dict())
    if magnitude is not None:
        names = list(mask_layers) if mask_layers is not None else default_mask_layers(model)
        modules = dict(model.named_modules())
        missing = [name for name in names if name not in modules]
        if missing:
            raise InputError(f"layers to mask {missing[:3]} are not in the model; name convolutions or linear layers")
        masks = {name: magnitude_mask(modules[name].weight, magnitude.initial_sparsity) for name in names}
        run_settings.update(magnitude.to_dict())
        run_settings["magnitude.layers"] = ",".join(names)

    return train_with_masks(
        model, masks, train_data, config, straight_through=True,
        hooks=SparsityHooks(bn_penalty, magnitude), test_batches=test_batches, state_path=state_path,
        resume=resume, tracker=tracker, export_model=export_model, settings=run_settings, device=device,
        progress=progress, description="sparsity training",
    )


def train_with_masks(
    model: nn.Module,
    masks: Mapping[str, Tensor],
    train_data: Dataset,
    config: TrainingConfig,
    *,
    straight_through: bool,
    export_model: ModelExporter | None = None,
    **train_arguments: Any,
) -> TrainingResult:
    """Attach ``masks`` to ``model``, train it with :func:`rl_pruner.training.loop.train`, and write the masks in.

    When training ends, or stops on Ctrl-C or an error in a step, the masked weights are
    written into the layers and the masks removed, so the model and ``best_state_dict``
    have plain weights. The models given to ``export_model`` have no masks either. An
    RLPrunerError from ``train`` (bad data, a resume state that does not fit) restores
    the weights the model had before. ``train_arguments`` go to ``train``.
    """
    original = {name: value.detach().clone() for name, value in model.state_dict().items()}
    attach_weight_masks(model, masks, straight_through=straight_through)
    try:
        # The models are logged here, once the masks are written in, not by train().
        result = train(model, train_data, config, **train_arguments)
    except RLPrunerError:
        remove_weight_masks(model)
        model.load_state_dict(original)
        raise
    finally:
        remove_weight_masks(model)
    result.best_state_dict = state_dict_without_masks(result.best_state_dict)
    tracker = train_arguments.get("tracker")
    if tracker is not None and export_model is not None:
        log_models(tracker, export_model, model, result.best_state_dict)
    return result


def state_dict_without_masks(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Return a state dict saved with :class:`MaskedWeight` parametrizations as one with plain, masked weights.

    ``<layer>.parametrizations.weight.original`` times ``<layer>.parametrizations.weight.0.mask``
    becomes ``<layer>.weight``, so the result loads into the model without masks.
    """
    original_suffix = ".parametrizations.weight.original"
    plain: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if key.endswith(original_suffix):
            layer = key[: -len(original_suffix)]
            plain[f"{layer}.weight"] = value * state_dict[f"{layer}.parametrizations.weight.0.mask"]
        elif ".parametrizations.weight." not in key:
            plain[key] = value
    return plain
