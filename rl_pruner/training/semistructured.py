"""2:4 semi-structured sparsity: masks, fine-tuning with the masks held, and export for sparse GPU kernels.

In 2:4 sparsity, every group of 4 consecutive weights along a layer's input dimension
keeps its 2 largest-magnitude entries and zeroes the other 2. NVIDIA GPUs of compute
capability 8.0 and newer (Ampere on) multiply such matrices with sparse tensor cores.

Eligible layers (:func:`is_eligible`):

- ``nn.Linear`` whose ``in_features`` is a multiple of 4. Its weight rows, of length
  ``in_features``, are cut into groups of 4.
- ``nn.Conv2d`` whose row length ``in_channels / groups * kernel_height * kernel_width``
  is a multiple of 4. A row is the flattened ``(in_channels / groups, kh, kw)`` filter
  of one output channel in memory order, that is the reduction dimension of the
  convolution written as a matrix product (im2col). The first 3x3 convolution of an RGB
  network (3 * 3 * 3 = 27) is not eligible.

Masks are held with a :class:`rl_pruner.training.sparsity.MaskedWeight`
parametrization without the straight-through estimator, so removed weights receive no
gradient and stay 0 during fine-tuning.

Export (:func:`export_semi_structured`) needs a CUDA GPU of compute capability >= 8.0.
It converts the weights of eligible linear layers with
``torch.sparse.to_sparse_semi_structured``. In PyTorch 2.14 that tensor subclass
implements matrix products (linear, mm, addmm) but not convolution, so masked
convolutions stay dense tensors that hold zeros.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.utils.data import Dataset

from rl_pruner.errors import InputError
from rl_pruner.training.distill import DistillationLoss, DistillationSettings
from rl_pruner.training.loop import (
    Batch,
    LossFunction,
    MetricsTracker,
    ModelExporter,
    TrainingConfig,
    TrainingResult,
    cross_entropy_loss,
)
from rl_pruner.training.sparsity import attach_weight_masks, remove_weight_masks, train_with_masks

logger = logging.getLogger(__name__)

GROUP_SIZE = 4
KEPT_PER_GROUP = 2
MIN_COMPUTE_CAPABILITY = (8, 0)
EXPORT_DTYPES = (torch.float16, torch.bfloat16)


@dataclass
class SemiStructuredExport:
    """Result of :func:`export_semi_structured`."""

    model: nn.Module
    """The exported model, or the masked dense model when nothing was exported."""
    exported_layers: list[str] = field(default_factory=list)
    """Linear layers whose weight is now a sparse semi-structured tensor."""
    skipped_layers: dict[str, str] = field(default_factory=dict)
    """Masked layers left dense, with the reason for each."""
    reason: str | None = None
    """Reason that nothing was exported, or None when the export ran."""


def is_eligible(module: nn.Module) -> bool:
    """Return True when ``module`` is a layer that can take a 2:4 mask (see the module docstring)."""
    module_type = parametrize.type_before_parametrizations(module)
    if issubclass(module_type, nn.Linear):
        return module.in_features % GROUP_SIZE == 0
    if issubclass(module_type, nn.Conv2d):
        kernel_height, kernel_width = module.kernel_size
        row_length = module.in_channels // module.groups * kernel_height * kernel_width
        return row_length % GROUP_SIZE == 0
    return False


def eligible_layers(model: nn.Module, exclude: Iterable[str] = ()) -> list[str]:
    """Return the names of the eligible layers of ``model``, in module order, except those in ``exclude``."""
    excluded = set(exclude)
    return [name for name, module in model.named_modules() if name not in excluded and is_eligible(module)]


def two_four_mask(weight: Tensor) -> Tensor:
    """Return the boolean 2:4 mask of a linear or convolution weight.

    The weight, of shape (out, in) or (out, in / groups, kh, kw), is viewed as rows of
    length ``numel / out`` that are cut into consecutive groups of 4. In each group the
    2 entries of largest magnitude are kept. Among equal magnitudes, ``torch.topk``
    decides which are kept, but every group keeps exactly 2. Raises ValueError when the
    row length is not a multiple of 4.
    """
    row_length = weight[0].numel() if weight.dim() > 1 else weight.numel()
    if row_length % GROUP_SIZE:
        raise ValueError(f"weight rows of length {row_length} cannot be cut into groups of {GROUP_SIZE}")
    groups = weight.detach().abs().reshape(-1, GROUP_SIZE)
    kept = groups.topk(KEPT_PER_GROUP, dim=1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(1, kept, True)
    return mask.view_as(weight)


def two_four_masks(model: nn.Module, layers: Sequence[str] | None = None) -> dict[str, Tensor]:
    """Return the 2:4 mask of each of ``layers`` (default: every eligible layer), by layer name.

    Raises InputError for a named layer that is missing or not eligible.
    """
    modules = dict(model.named_modules())
    names = list(layers) if layers is not None else eligible_layers(model)
    not_eligible = [name for name in names if name not in modules or not is_eligible(modules[name])]
    if not_eligible:
        raise InputError(
            f"layers {not_eligible[:3]} cannot take a 2:4 mask; name linear layers with in_features, or "
            "convolutions with in_channels / groups * kernel height * kernel width, divisible by 4"
        )
    if not names:
        raise InputError("the model has no layer that can take a 2:4 mask")
    return {name: two_four_mask(modules[name].weight) for name in names}


def attach_two_four_masks(model: nn.Module, layers: Sequence[str] | None = None) -> list[str]:
    """Mask ``layers`` (default: every eligible layer) with their 2:4 masks and hold them; return the names.

    Raises InputError for a named layer that is missing or not eligible.
    """
    masks = two_four_masks(model, layers)
    attach_weight_masks(model, masks, straight_through=False)
    logger.info("attached 2:4 masks to %d layers", len(masks))
    return list(masks)


def fine_tune_two_four(
    model: nn.Module,
    train_data: Dataset,
    config: TrainingConfig,
    *,
    layers: Sequence[str] | None = None,
    teacher: nn.Module | None = None,
    distillation: DistillationSettings | None = None,
    test_batches: Iterable[Batch] | None = None,
    state_path: str | Path | None = None,
    resume: bool = False,
    tracker: MetricsTracker | None = None,
    export_model: ModelExporter | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> TrainingResult:
    """Attach 2:4 masks to ``model`` and fine-tune it in place with the masks held.

    The loss is cross-entropy, or with a ``teacher`` (for example a copy of the dense
    model) the distillation loss of :mod:`rl_pruner.training.distill`. When training
    ends, or stops, the masked weights are written into the layers, so the model and
    ``best_state_dict`` hold plain weights whose every masked group of 4 has 2 zeros.
    Raises DataError when ``train_data`` has a ``classes`` list whose length differs from
    the model's outputs. Resumption, Ctrl-C and MLflow logging are as in
    :func:`rl_pruner.training.loop.train`.
    """
    masks = two_four_masks(model, layers)
    settings: dict[str, object] = {"two_four.layers": ",".join(masks)}
    loss_fn: LossFunction = cross_entropy_loss
    if teacher is not None:
        distillation = distillation or DistillationSettings()
        settings.update(distillation.to_dict())
        loss_fn = DistillationLoss(distillation)

    logger.info("attaching 2:4 masks to %d layers", len(masks))
    return train_with_masks(
        model, masks, train_data, config, straight_through=False, loss_fn=loss_fn, teacher=teacher,
        test_batches=test_batches, state_path=state_path, resume=resume, tracker=tracker,
        export_model=export_model, settings=settings, device=device, progress=progress,
        description="2:4 fine-tuning",
    )


def count_two_four_violations(weight: Tensor) -> int:
    """Return how many groups of 4 along the rows of ``weight`` have more than 2 non-zero entries."""
    groups = weight.detach().reshape(-1, GROUP_SIZE)
    return int(((groups != 0).sum(dim=1) > KEPT_PER_GROUP).sum())


def export_semi_structured(
    model: nn.Module,
    layers: Sequence[str] | None = None,
    *,
    dtype: torch.dtype = torch.float16,
    device: str | torch.device = "cuda",
) -> SemiStructuredExport:
    """Convert the 2:4-sparse linear layers of ``model`` to sparse semi-structured weights.

    ``layers`` are the masked layers (default: every eligible layer), each of which must
    already have at most 2 non-zeros in every group of 4. Masks still attached are
    written into the weights of the copy. Without a CUDA GPU of compute
    capability >= 8.0 the function logs why and returns ``model`` unchanged, with
    ``reason`` set. Otherwise it returns a copy on ``device`` in ``dtype`` (float16 or
    bfloat16, as the sparse kernels need), in eval mode, in which every eligible linear layer
    whose weight the sparse kernels accept has a ``SparseSemiStructuredTensor`` weight.
    Convolutions and refused linear layers are listed in ``skipped_layers``. Feed the exported
    model inputs of the same dtype on the same device.
    """
    # NOTE: this function has only run on machines without CUDA, so the conversion
    # branch below is untested.
    if dtype not in EXPORT_DTYPES:
        raise InputError(f"export dtype is {dtype}; sparse semi-structured kernels take float16 or bfloat16")
    reason = _export_unavailable_reason(torch.device(device))
    if reason is not None:
        logger.warning("2:4 export skipped: %s; returning the masked dense model", reason)
        return SemiStructuredExport(model=model, reason=reason)

    from torch.sparse import to_sparse_semi_structured

    exported = copy.deepcopy(model).to(device=device, dtype=dtype).eval()
    remove_weight_masks(exported)
    names = list(layers) if layers is not None else eligible_layers(exported)
    modules = dict(exported.named_modules())
    result = SemiStructuredExport(model=exported)
    for name in names:
        module = modules[name]
        if not isinstance(module, nn.Linear):
            result.skipped_layers[name] = "torch's sparse semi-structured tensors do not implement convolution"
            continue
        if count_two_four_violations(module.weight):
            raise InputError(f"layer {name!r} is not 2:4 sparse; fine-tune it with 2:4 masks before exporting")
        try:
            module.weight = nn.Parameter(to_sparse_semi_structured(module.weight.detach().contiguous()),
                                         requires_grad=False)
        except RuntimeError as err:
            result.skipped_layers[name] = str(err).splitlines()[0]
            continue
        result.exported_layers.append(name)
    logger.info("exported %d layers as 2:4 sparse; left dense: %s", len(result.exported_layers),
                ", ".join(result.skipped_layers) or "none")
    return result


def _export_unavailable_reason(device: torch.device) -> str | None:
    if device.type != "cuda":
        return f"device {device} is not a CUDA GPU"
    if not torch.cuda.is_available():
        return "no CUDA GPU is available"
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_COMPUTE_CAPABILITY:
        return (
            f"GPU {torch.cuda.get_device_name(device)} has compute capability {capability[0]}.{capability[1]}, "
            f"below the {MIN_COMPUTE_CAPABILITY[0]}.{MIN_COMPUTE_CAPABILITY[1]} that 2:4 sparse kernels need"
        )
    return None
