"""Knowledge-distillation fine-tuning of a pruned student from its dense teacher.

The loss of one batch, with temperature ``T`` and weight ``alpha``::

    alpha * T**2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE(student, labels)

KL is averaged over the images of the batch, and ``T**2`` keeps the gradient of the
soft term at the scale of the hard term when ``T`` changes (Hinton, Vinyals and Dean,
"Distilling the Knowledge in a Neural Network", 2015). ``alpha = 0`` is plain
fine-tuning with cross-entropy, ``alpha = 1`` learns from the teacher alone.

:func:`distill` checks that the student is a pruned form of the teacher and that the
training data has the model's classes, then runs :func:`rl_pruner.training.loop.train`
(SGD with momentum, cosine schedule, resumable state, best epoch by test top-1).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.utils.data import Dataset

from rl_pruner.errors import InputError
from rl_pruner.models.cifar_resnet import ZeroPadShortcut
from rl_pruner.models.registry import LoadedModel, output_size
from rl_pruner.training.loop import (
    Batch,
    MetricsTracker,
    ModelExporter,
    TrainingConfig,
    TrainingHooks,
    TrainingResult,
    train,
)

# Sizes a pruned module may have smaller than the teacher's module; every other
# attribute compared in _size_differences must be equal.
_PRUNABLE_SIZES = {
    nn.Conv2d: ("in_channels", "out_channels"),
    nn.Linear: ("in_features", "out_features"),
    nn.modules.batchnorm._BatchNorm: ("num_features",),
    ZeroPadShortcut: ("in_channels", "out_channels"),
}
_FIXED_ATTRIBUTES = {
    nn.Conv2d: ("kernel_size", "stride", "padding", "dilation"),
}


@dataclass(frozen=True)
class DistillationSettings:
    """Loss settings of distillation.

    :param temperature: softmax temperature ``T`` of both models' logits, > 0. Values of 2 to 8 are usual.
    :param alpha: weight of the distillation term, in [0, 1]; ``1 - alpha`` weighs the cross-entropy.
    """

    temperature: float = 4.0
    alpha: float = 0.9

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise InputError(f"distillation temperature is {self.temperature}; it must be a positive number")
        if not 0.0 <= self.alpha <= 1.0:
            raise InputError(f"distillation alpha is {self.alpha}; it must be in [0, 1]")

    def to_dict(self) -> dict[str, float]:
        return {f"distillation.{key}": value for key, value in asdict(self).items()}


def distillation_loss(
    student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, *, temperature: float, alpha: float
) -> Tensor:
    """Return the distillation loss of one batch, averaged over its images (see the module docstring).

    ``student_logits`` and ``teacher_logits`` have shape (batch, classes), ``labels`` has
    shape (batch,). The teacher's logits are treated as constants.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} "
            "must have the same shape"
        )
    teacher_log_probs = F.log_softmax(teacher_logits.detach() / temperature, dim=1)
    student_log_probs = F.log_softmax(student_logits / temperature, dim=1)
    soft = F.kl_div(student_log_probs, teacher_log_probs, reduction="batchmean", log_target=True)
    hard = F.cross_entropy(student_logits, labels)
    return alpha * temperature**2 * soft + (1.0 - alpha) * hard


class DistillationLoss:
    """The loss function of :func:`rl_pruner.training.loop.train` for distillation with fixed settings."""

    def __init__(self, settings: DistillationSettings) -> None:
        self.settings = settings

    def __call__(self, logits: Tensor, labels: Tensor, teacher_logits: Tensor | None) -> Tensor:
        if teacher_logits is None:
            raise ValueError("distillation needs the teacher's logits of every batch; pass a teacher to train()")
        return distillation_loss(
            logits, teacher_logits, labels, temperature=self.settings.temperature, alpha=self.settings.alpha
        )


def check_student_structure(student: nn.Module, teacher: nn.Module) -> None:
    """Raise InputError unless ``student`` is a pruned form of ``teacher``'s architecture.

    A pruned form has the teacher's module names and types, except that a whole
    submodule may be replaced by ``nn.Identity`` (a dropped block). Its channel and
    feature counts are at most the teacher's, other layer settings (kernel size, stride,
    padding) are equal, and it has the same number of outputs. Weight
    parametrizations, such as the masks of :mod:`rl_pruner.training.sparsity`, are ignored.
    """
    teacher_modules = _named_modules(teacher)
    student_modules = _named_modules(student)
    differences = []
    for name, module in student_modules.items():
        reference = teacher_modules.get(name)
        label = name or "the model itself"
        if reference is None:
            differences.append(f"{label} ({_type_name(module)}) is not in the teacher")
        elif isinstance(module, nn.Identity) and not isinstance(reference, nn.Identity):
            continue
        elif _module_type(module) is not _module_type(reference):
            differences.append(f"{label} is a {_type_name(module)} in the student but a {_type_name(reference)} in the teacher")
        else:
            differences += _size_differences(label, module, reference)

    dropped = [name for name, module in student_modules.items() if isinstance(module, nn.Identity)]
    for name in teacher_modules:
        if name not in student_modules and not any(name.startswith(f"{block}.") for block in dropped):
            differences.append(f"{name} of the teacher is missing from the student")

    if not differences and output_size(student) != output_size(teacher):
        differences.append(f"the student has {output_size(student)} outputs and the teacher {output_size(teacher)}")
    if differences:
        more = f" and {len(differences) - 3} more differences" if len(differences) > 3 else ""
        raise InputError(
            f"the student is not a pruned form of the teacher: {'; '.join(differences[:3])}{more}; "
            "pass the pruned model made from the teacher's architecture, and the teacher's dense checkpoint"
        )


def check_pruned_student(student: LoadedModel, teacher: LoadedModel) -> None:
    """Raise InputError unless ``student`` was pruned from ``teacher``'s architecture and fits its input.

    The student's architecture is the one named in its pruned-model record (see
    :mod:`rl_pruner.engine.serialization`). The teacher must be dense. Then the modules
    are compared by :func:`check_student_structure`.
    """
    if teacher.pruned is not None:
        raise InputError(
            "the teacher is a pruned model; pass the dense checkpoint the student was pruned from as the teacher"
        )
    architecture = student.pruned["architecture"] if student.pruned is not None else student.architecture
    if architecture != teacher.architecture:
        raise InputError(
            f"the student was pruned from {architecture!r} but the teacher is {teacher.architecture!r}; "
            f"pass a {architecture} checkpoint as the teacher"
        )
    if tuple(student.input_shape) != tuple(teacher.input_shape):
        raise InputError(
            f"the student takes inputs of shape {tuple(student.input_shape)} but the teacher "
            f"{tuple(teacher.input_shape)}; use the teacher's input size"
        )
    check_student_structure(student.model, teacher.model)


def distill(
    student: nn.Module,
    teacher: nn.Module,
    train_data: Dataset,
    config: TrainingConfig,
    distillation: DistillationSettings | None = None,
    *,
    hooks: TrainingHooks | None = None,
    test_batches: Iterable[Batch] | None = None,
    state_path: str | Path | None = None,
    resume: bool = False,
    tracker: MetricsTracker | None = None,
    export_model: ModelExporter | None = None,
    settings: Mapping[str, Any] | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> TrainingResult:
    """Fine-tune ``student`` in place by distillation from ``teacher``; return the history and best weights.

    Raises InputError when the student is not a pruned form of the teacher (see
    :func:`check_student_structure`), and DataError when ``train_data`` has a
    ``classes`` list whose length differs from the model's outputs. Everything else
    (resumption, precision, Ctrl-C, MLflow logging) is as in
    :func:`rl_pruner.training.loop.train`, which receives ``hooks``, ``settings`` and the other keyword arguments.
    The teacher is put in eval mode and runs without gradients, and its weights are not changed.
    """
    distillation = distillation or DistillationSettings()
    check_student_structure(student, teacher)

    return train(
        student, train_data, config, loss_fn=DistillationLoss(distillation), teacher=teacher, hooks=hooks, test_batches=test_batches,
        state_path=state_path, resume=resume, tracker=tracker, export_model=export_model,
        settings={**distillation.to_dict(), **(settings or {})}, device=device, progress=progress,
        description="distillation",
    )


def _named_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Modules by name, without the containers that weight parametrizations add."""
    return {
        name: module
        for name, module in model.named_modules()
        if ".parametrizations" not in f".{name}" and not isinstance(module, parametrize.ParametrizationList)
    }


def _module_type(module: nn.Module) -> type:
    return parametrize.type_before_parametrizations(module)


def _type_name(module: nn.Module) -> str:
    return _module_type(module).__name__


def _size_differences(name: str, student: nn.Module, teacher: nn.Module) -> list[str]:
    differences = []
    for module_type, attributes in _PRUNABLE_SIZES.items():
        if not isinstance(teacher, module_type):
            continue
        for attribute in attributes:
            student_size, teacher_size = getattr(student, attribute), getattr(teacher, attribute)
            if student_size > teacher_size:
                differences.append(f"{name} has {attribute}={student_size}, more than the teacher's {teacher_size}")
    for module_type, attributes in _FIXED_ATTRIBUTES.items():
        if not isinstance(teacher, module_type):
            continue
        for attribute in attributes:
            if getattr(student, attribute) != getattr(teacher, attribute):
                differences.append(
                    f"{name} has {attribute}={getattr(student, attribute)}, the teacher {getattr(teacher, attribute)}"
                )
    return differences
