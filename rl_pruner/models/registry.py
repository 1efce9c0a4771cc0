"""Model names the CLI accepts, and how each is built.

- torchvision classification models by name (``resnet50``, ``resnet18``, ...), built
  without downloading weights; load weights with a checkpoint.
- CIFAR ResNets: ``cifar_resnet20``, ``cifar_resnet32``, ``cifar_resnet44``,
  ``cifar_resnet56``, ``cifar_resnet110`` (32x32 inputs).
- Any user model as ``package.module:factory``: a callable that takes no arguments
  and returns an ``nn.Module``; its input size comes from ``input_size``.
- ``pruned:PATH``: a model saved by ``rl-pruner apply`` (see
  :mod:`rl_pruner.engine.serialization`).
- ``digits_cnn``: the demo CNN for 1x8x8 digit images (:mod:`rl_pruner.demo`).
- ``yolov7:PATH``: a YOLOv7 detector built from the model YAML at PATH (the official
  ``yolov7.yaml``, ``yolov7-tiny.yaml`` or a file written by rl-pruner's export); 640x640
  inputs in [0, 1], no normalization. Official state_dicts load key for key.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torchvision
from torch import nn

from rl_pruner.data import IMAGENET_NORMALIZATION, Normalization
from rl_pruner.errors import InputError
from rl_pruner.models.checkpoint import load_weights
from rl_pruner.models.cifar_resnet import CIFAR_DEPTHS, cifar_resnet
from rl_pruner.models.yolov7.model import YOLOv7

CIFAR_NAMES = {f"cifar_resnet{depth}": depth for depth in CIFAR_DEPTHS}
PRUNED_PREFIX = "pruned:"
YOLOV7_PREFIX = "yolov7:"
YOLOV7_INPUT_SIZE = 640
# YOLOv7 reads RGB images scaled to [0, 1] and applies no further normalization.
IDENTITY_NORMALIZATION = Normalization((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))

# The built-in demo model. rl_pruner.demo is imported only when this name is used.
DEMO_NAME = "digits_cnn"


def _build_demo_model(num_classes: int | None) -> tuple[nn.Module, tuple[int, int, int]]:
    from rl_pruner.demo import DIGITS_INPUT_SHAPE, DigitsNet

    return DigitsNet(num_classes or 10), DIGITS_INPUT_SHAPE


def is_detector(architecture: str) -> bool:
    """Return whether ``architecture`` names a detector, whose reward is an mAP instead of top-1."""
    return architecture.startswith(YOLOV7_PREFIX)


def default_normalization(architecture: str) -> Normalization:
    """Return the input normalization of ``architecture``: the digits' own statistics for the
    demo model, none for YOLOv7, else ImageNet's."""
    if is_detector(architecture):
        return IDENTITY_NORMALIZATION
    if architecture == DEMO_NAME:
        from rl_pruner.demo import DIGITS_NORMALIZATION

        return DIGITS_NORMALIZATION
    return IMAGENET_NORMALIZATION


@dataclass
class LoadedModel:
    """A model ready to prune or evaluate, with what is needed to feed it."""

    architecture: str  # the name that rebuilds the dense model, e.g. "cifar_resnet56"
    model: nn.Module
    input_shape: tuple[int, int, int]  # one sample: channels, height, width
    normalization: Normalization
    num_classes: int
    # Evaluation image size in pixels (resize and center-crop), or None to feed images
    # at their native size, as for 32x32 CIFAR.
    image_size: int | None = None
    pruned: dict[str, Any] | None = field(default=None)  # record of a saved pruned model


def torchvision_names() -> list[str]:
    return sorted(torchvision.models.list_models(module=torchvision.models))


def build_architecture(
    name: str, num_classes: int | None = None, config_text: str | None = None
) -> tuple[nn.Module, tuple[int, int, int]]:
    """Build the dense, randomly initialised model ``name`` and its input shape.

    ``config_text`` is the YAML text of a ``yolov7:PATH`` model, used instead of
    reading PATH (a pruned model file carries it).
    """
    if name.startswith(YOLOV7_PREFIX):
        from rl_pruner.models.yolov7 import build_yolov7

        path = name[len(YOLOV7_PREFIX):]
        if config_text is None and not Path(path).is_file():
            raise InputError(f"model {name!r}: no YOLOv7 model YAML at {path}; pass yolov7:PATH to an existing file")
        model = build_yolov7(path, num_classes, text=config_text)
        return model, (3, YOLOV7_INPUT_SIZE, YOLOV7_INPUT_SIZE)
    if name in CIFAR_NAMES:
        return cifar_resnet(CIFAR_NAMES[name], num_classes or 10), (3, 32, 32)
    if name == DEMO_NAME:
        return _build_demo_model(num_classes)
    if ":" in name and not name.startswith(PRUNED_PREFIX):
        return _build_user_model(name), (3, 224, 224)
    if name in torchvision_names():
        kwargs = {"num_classes": num_classes} if num_classes else {}
        return torchvision.models.get_model(name, weights=None, **kwargs), (3, 224, 224)
    raise InputError(
        f"model {name!r} is unknown; use a torchvision name (e.g. resnet50), one of "
        f"{', '.join(CIFAR_NAMES)}, {DEMO_NAME}, package.module:factory, yolov7:PATH, or pruned:PATH"
    )


def _build_user_model(spec: str) -> nn.Module:
    module_name, _, factory_name = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise InputError(f"model {spec!r}: module {module_name!r} cannot be imported ({err}); check PYTHONPATH") from err
    factory = getattr(module, factory_name, None)
    if not callable(factory):
        raise InputError(f"model {spec!r}: {module_name} has no callable {factory_name!r}")
    model = factory()
    if not isinstance(model, nn.Module):
        raise InputError(f"model {spec!r}: {factory_name}() returned {type(model).__name__}, not an nn.Module")
    return model


def output_size(model: nn.Module) -> int:
    """Number of classes: a detector's ``num_classes``, else the out_features of the last
    linear layer (or out_channels of a conv)."""
    if isinstance(model, YOLOv7):
        return model.num_classes
    last = None
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            last = module
    if isinstance(last, nn.Linear):
        return last.out_features
    if isinstance(last, nn.Conv2d):
        return last.out_channels
    raise InputError("the model has no linear or convolution layer to read its number of classes from")


def load_model(
    spec: str,
    checkpoint: str | Path | None = None,
    *,
    trust_pickle: bool = False,
    input_size: int | None = None,
    num_classes: int | None = None,
) -> LoadedModel:
    """Build the model named by ``spec`` and load ``checkpoint`` into it, if given."""
    if spec.startswith(PRUNED_PREFIX):
        from rl_pruner.engine.serialization import load_pruned_model

        if checkpoint is not None:
            raise InputError("a pruned:PATH model carries its own weights; drop --checkpoint")
        return load_pruned_model(spec[len(PRUNED_PREFIX):])
    if spec.startswith(YOLOV7_PREFIX):
        spec = YOLOV7_PREFIX + str(Path(spec[len(YOLOV7_PREFIX):]).expanduser().resolve())
        check_detector_input_size(input_size)
    model, input_shape = build_architecture(spec, num_classes)
    if input_size is not None:
        input_shape = (input_shape[0], input_size, input_size)
    if checkpoint is not None:
        load_weights(model, checkpoint, model_name=spec, trust_pickle=trust_pickle)
    model.eval()
    return LoadedModel(
        architecture=spec,
        model=model,
        input_shape=input_shape,
        normalization=default_normalization(spec),
        num_classes=output_size(model),
        image_size=default_image_size(spec, input_shape),
    )


def check_detector_input_size(input_size: int | None, key: str = "--input-size") -> None:
    """Raise InputError unless ``input_size`` suits YOLOv7: None or a positive multiple of its largest stride, 32."""
    if input_size is None or (input_size > 0 and input_size % 32 == 0):
        return
    nearest = max(32, 32 * round(input_size / 32))
    raise InputError(f"{key} is {input_size}; a YOLOv7 input side must be a multiple of 32 pixels, e.g. {nearest}")


def default_image_size(architecture: str, input_shape: tuple[int, ...]) -> int | None:
    """CIFAR and demo models read images at their native size; others resize and crop to the input."""
    return None if architecture in CIFAR_NAMES or architecture == DEMO_NAME else int(input_shape[-1])
