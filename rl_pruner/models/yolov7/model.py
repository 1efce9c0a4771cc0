"""The YOLOv7 model assembled from a configuration, and its fusion for inference.

:func:`build_yolov7` turns a configuration (see :mod:`rl_pruner.models.yolov7.config`)
into a :class:`YOLOv7` whose ``model`` attribute is an ``nn.Sequential`` of the layers,
so parameter names are ``model.<layer index>.<submodule>...`` as in the official
release (``model.0.conv.weight``, ``model.105.ia.0.implicit``).

Output in training mode: the list of raw per-level maps, each
``(batch, anchors, height, width, classes + 5)``. Output in eval mode: one tensor
``(batch, n_predictions, classes + 5)`` of decoded boxes (centre x, centre y, width,
height in input pixels), objectness and class probabilities, with the levels
concatenated in order. The official eval output is the tuple (that tensor, the raw maps). Here eval
returns the tensor alone, and :meth:`YOLOv7.level_maps` returns the raw maps in any
mode.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rl_pruner.errors import ConfigError
from rl_pruner.models.yolov7.config import LayerSpec, YOLOv7Config, load_yolov7_config
from rl_pruner.models.yolov7.modules import (
    MP,
    SP,
    SPPCSPC,
    Concat,
    Conv,
    Detect,
    IDetect,
    RepConv,
)

logger = logging.getLogger(__name__)

# Module names a configuration may use, and what each is built from.
MODULES: dict[str, Callable[..., nn.Module]] = {
    "Conv": Conv,
    "RepConv": RepConv,
    "SPPCSPC": SPPCSPC,
    "Concat": Concat,
    "MP": MP,
    "SP": SP,
    "nn.Upsample": nn.Upsample,
    "Detect": Detect,
    "IDetect": IDetect,
}

# Modules whose first argument is the output width (scaled by width_multiple).
_WIDTH_MODULES = frozenset({"Conv", "RepConv", "SPPCSPC"})
# Modules that take the repeat count as their third argument instead of being repeated.
_REPEAT_ARGUMENT_MODULES = frozenset({"SPPCSPC"})
_HEAD_MODULES = frozenset({"Detect", "IDetect"})

# Input side in pixels of the dummy forward pass that measures the head strides. It
# must be a multiple of the largest stride (32 for these configurations).
_STRIDE_PROBE_SIZE = 256


def make_divisible(value: float, divisor: int) -> int:
    """Smallest multiple of ``divisor`` that is at least ``value``."""
    return math.ceil(value / divisor) * divisor


class DroppedLayer(nn.Module):
    """Holds the place of a layer removed by depth pruning, so later layers keep their index.

    It has no weights and is never run: :class:`YOLOv7` skips it, and no remaining
    layer reads its output.
    """

    def forward(self, x: Any) -> Any:
        raise RuntimeError("a layer removed by depth pruning was run; the model's sources are inconsistent")


@dataclass(frozen=True)
class ElanTail:
    """The last step of an ELAN chain, which depth pruning may remove.

    An ELAN block runs a chain of convolutions (each reading the previous one) and
    concatenates some of their outputs. Its tail is the convolutions after the
    second-to-last concatenated output: removing them and their Concat input leaves
    a valid, shorter ELAN. In yolov7.yaml's backbone the tail is the last pair of 3x3
    convolutions. Where every chain output is concatenated (yolov7-tiny, the yolov7
    head), it is the last convolution.
    """

    layers: tuple[int, ...]  # indices of the removed Conv layers, in order
    concat: int  # index of the Concat layer that reads the last of them

    @property
    def name(self) -> str:
        """``model.5-6`` for a two-layer tail, ``model.45`` for one layer."""
        first, last = self.layers[0], self.layers[-1]
        return f"model.{first}" if first == last else f"model.{first}-{last}"


class YOLOv7(nn.Module):
    """A YOLOv7 detector: layers run in order, each reading the outputs it names.

    ``sources[i]`` lists the layers whose outputs layer ``i`` reads (-1 is the model
    input). A layer whose ``from`` field was a list receives its inputs as a list.
    ``dropped_layers`` lists layers removed by depth pruning (:meth:`rl_pruner_drop_blocks`);
    they stay in ``model`` as :class:`DroppedLayer` and are skipped.
    """

    def __init__(self, layers: Sequence[nn.Module], specs: Sequence[LayerSpec], input_channels: int) -> None:
        super().__init__()
        self.model = nn.Sequential(*layers)
        self.sources = [spec.sources for spec in specs]
        self.takes_list = [spec.takes_list for spec in specs]
        self.input_channels = input_channels
        # Outputs that some layer reads are kept during forward; the others are released
        # as soon as the next layer has run.
        self.kept_outputs = frozenset(source for spec in specs for source in spec.sources)
        self.dropped_layers: tuple[int, ...] = ()

    @property
    def head(self) -> Detect:
        """The detection head (the last layer)."""
        head = self.model[-1]
        if not isinstance(head, Detect):
            raise TypeError(f"the last layer is {type(head).__name__}, not a detection head")
        return head

    @property
    def rl_pruner_output_modules(self) -> list[str]:
        """Names of the head's per-level output convolutions, which pruning must leave whole.

        :func:`rl_pruner.engine.structure.analyze_model` reads this attribute: their
        output channels are the detections (anchors x (classes + 5) per level).
        """
        head_name = f"model.{len(self.model) - 1}"
        return [f"{head_name}.m.{index}" for index in range(len(self.head.m))]

    def elan_tails(self) -> list[ElanTail]:
        """The ELAN tails that depth pruning may remove from this model, in layer order.

        A Concat layer has a removable tail when the latest layer it reads is the layer
        just before it. That layer and the ones back to the previous concatenated output
        must be plain :class:`Conv` layers, each reading the one before and read by
        nothing else. The Concat must keep at least two inputs.
        """
        readers: dict[int, list[int]] = {}
        for index, sources in enumerate(self.sources):
            if index in self.dropped_layers:
                continue
            for source in sources:
                readers.setdefault(source, []).append(index)
        tails = []
        for index, layer in enumerate(self.model):
            sources = self.sources[index]
            if not isinstance(layer, Concat) or index in self.dropped_layers or len(sources) < 3:
                continue
            ordered = sorted(sources)
            exit_layer, previous = ordered[-1], ordered[-2]
            if exit_layer != index - 1 or sources.count(exit_layer) > 1:
                continue
            chain = list(range(previous + 1, exit_layer + 1))
            if all(
                type(self.model[member]) is Conv
                and self.sources[member] == (member - 1,)
                and readers.get(member) == ([member + 1] if member < exit_layer else [index])
                for member in chain
            ):
                tails.append(ElanTail(layers=tuple(chain), concat=index))
        return tails

    @property
    def rl_pruner_depth_blocks(self) -> list[dict[str, Any]]:
        """The ELAN tails as depth blocks for :func:`rl_pruner.engine.structure.analyze_model`."""
        return [
            {"name": tail.name, "modules": [f"model.{i}" for i in tail.layers], "exit": f"model.{tail.layers[-1]}.conv"}
            for tail in self.elan_tails()
        ]

    def rl_pruner_drop_blocks(self, names: Sequence[str]) -> None:
        """Remove the named ELAN tails: their layers become :class:`DroppedLayer` and
        their Concat stops reading them.

        The Concat's consumer still expects the removed channels; the engine prunes
        them from it (:func:`rl_pruner.engine.apply.apply_policy`), and a saved
        pruned model records the consumer's new width.
        """
        tails = {tail.name: tail for tail in self.elan_tails()}
        unknown = [name for name in names if name not in tails]
        if unknown:
            raise ValueError(f"not removable ELAN tails of this model: {unknown!r}; known: {sorted(tails)!r}")
        for name in names:
            tail = tails[name]
            for index in tail.layers:
                self.model[index] = DroppedLayer()
            self.sources[tail.concat] = tuple(s for s in self.sources[tail.concat] if s != tail.layers[-1])
            self.dropped_layers = tuple(sorted({*self.dropped_layers, *tail.layers}))
        self.kept_outputs = frozenset(
            source for index, sources in enumerate(self.sources) if index not in self.dropped_layers
            for source in sources
        )

    @property
    def num_classes(self) -> int:
        """Number of object classes the head predicts."""
        return self.head.nc

    @property
    def stride(self) -> torch.Tensor:
        """Stride in pixels of each detection level."""
        return self.head.stride

    def forward(self, x: torch.Tensor) -> list[torch.Tensor] | torch.Tensor:
        _, last = self._run_layers(x, len(self.model))
        return last

    def head_inputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Feature maps that the detection head (the last layer) receives for input ``x``."""
        outputs, _ = self._run_layers(x, len(self.model) - 1)
        return [outputs[source] for source in self.sources[-1]]

    def level_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Raw per-level head outputs for input ``x``, as training mode returns them, in any mode."""
        return self.head.level_maps(self.head_inputs(x))

    def rl_pruner_calibration_loss(self, images: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """Compute a label-free detection loss on ``images`` for the ``taylor`` criterion to differentiate.

        Calibration batches carry no boxes, so ``targets`` is ignored. The model's own
        decisions serve as labels instead. Every objectness and class logit of the raw
        level maps is scored by binary cross-entropy, the loss YOLOv7 trains these outputs
        with. Its target is 1 where the logit is positive (sigmoid above 0.5), else 0, and
        carries no gradient. The loss is the mean over all anchors, cells, levels and
        images.

        The targets are hard because soft ones (the model's own probabilities) make the
        gradient exactly zero. With hard targets the gradient of each logit is
        proportional to ``sigmoid - target``, largest for uncertain predictions, as the
        gradient of a labelled loss is largest on mistakes and uncertain predictions.

        Limits: box coordinates are left out, because matching predicted boxes to targets
        needs labels. So channels are ranked by their effect on objectness and class
        confidence only. An untrained model has almost every target at 0 (its bias priors
        make every sigmoid small), so its scores rank channels by their first-order effect
        on the model's overall confidence. Where labelled images exist, a real detection
        loss ranks channels more faithfully.
        """
        logits = torch.cat([level[..., 4:].flatten() for level in self.level_maps(images)])
        pseudo_labels = (logits.detach() > 0).to(logits.dtype)
        return nn.functional.binary_cross_entropy_with_logits(logits, pseudo_labels)

    def _run_layers(self, x: torch.Tensor, n_layers: int) -> tuple[dict[int, Any], Any]:
        """Run the first ``n_layers`` layers; return the kept outputs and the last output."""
        outputs: dict[int, Any] = {-1: x}
        previous: Any = x
        for index, layer in enumerate(self.model[:n_layers]):
            if index in self.dropped_layers:
                continue
            sources = self.sources[index]
            if self.takes_list[index]:
                inputs: Any = [outputs[source] for source in sources]
            else:
                inputs = outputs[sources[0]] if sources[0] != index - 1 else previous
            previous = layer(inputs)
            if index in self.kept_outputs:
                outputs[index] = previous
        return outputs, previous

    def fuse(self) -> YOLOv7:
        """Fuse this model in place for inference; see :func:`fuse_yolov7`."""
        return fuse_yolov7(self)


def fuse_yolov7(model: nn.Module) -> nn.Module:
    """Fuse ``model`` in place for inference and return it.

    Folds each :class:`Conv`'s batch norm into its convolution, merges each
    :class:`RepConv`'s branches into one 3x3 convolution, and folds the implicit
    layers of an :class:`IDetect` head into its output convolutions, then removes
    them. The official ``Model.fuse`` does the same except that it keeps the unused
    implicit parameters. Running statistics are used, so the fused model reproduces
    the unfused one in eval mode only.
    """
    fusable = [module for module in model.modules() if isinstance(module, (Conv, RepConv, Detect))]
    for module in fusable:
        module.fuse()
    logger.info("fused %d modules: %d parameters", len(fusable), sum(p.numel() for p in model.parameters()))
    return model


def build_yolov7(
    yaml_path: str | Path, num_classes: int | None = None, input_channels: int = 3, text: str | None = None
) -> YOLOv7:
    """Build a randomly initialised YOLOv7 from a model YAML.

    Args:
        yaml_path: an official-style model configuration (``yolov7.yaml``,
            ``yolov7-tiny.yaml``); read safely, see :func:`load_yolov7_config`.
        num_classes: replaces the configuration's ``nc`` when given.
        input_channels: channels of the input images.
        text: the YAML text to build from; ``yaml_path`` then only names it in messages.

    Raises:
        ConfigError: the configuration is invalid, or a layer's arguments do not fit
            its module.
    """
    config = load_yolov7_config(yaml_path, num_classes=num_classes, module_names=list(MODULES), text=text)
    layers, channels = [], []
    for spec in config.layers:
        layer, out_channels = _build_layer(spec, config, channels, input_channels)
        layers.append(layer)
        channels.append(out_channels)

    head = layers[-1]
    if not isinstance(head, Detect):
        raise ConfigError(f"{config.source}: the last layer is {config.layers[-1].module}, but it must "
                          f"be a detection head ({', '.join(sorted(_HEAD_MODULES))})")
    model = YOLOv7(layers, config.layers, input_channels)
    _setup_head(model, head)
    logger.info("built %s: %d layers, %d parameters", config.source, len(layers),
                sum(p.numel() for p in model.parameters()))
    return model


def _build_layer(
    spec: LayerSpec, config: YOLOv7Config, channels: Sequence[int], input_channels: int
) -> tuple[nn.Module, int]:
    """Build the module of one layer and return it with its number of output channels."""
    def channels_of(source: int) -> int:
        return input_channels if source == -1 else channels[source]

    where = f"{config.source}: layer {spec.index} ({spec.module})"
    args = list(spec.args)
    repeats = max(round(spec.repeats * config.depth_multiple), 1) if spec.repeats > 1 else spec.repeats
    in_channels = channels_of(spec.sources[0])

    if spec.module in _WIDTH_MODULES:
        if not args or isinstance(args[0], bool) or not isinstance(args[0], int):
            raise ConfigError(f"{where}: the first argument must be the output channels, got {args!r}")
        out_channels = args[0]
        # As in the official parser, a width equal to the head's output size is not scaled.
        n_anchors = len(config.anchors[0]) // 2
        if out_channels != n_anchors * (config.num_classes + 5):
            out_channels = make_divisible(out_channels * config.width_multiple, 8)
        args = [in_channels, out_channels, *args[1:]]
        if spec.module in _REPEAT_ARGUMENT_MODULES:
            args.insert(2, repeats)
            repeats = 1
    elif spec.module == "Concat":
        out_channels = sum(channels_of(source) for source in spec.sources)
    elif spec.module in _HEAD_MODULES:
        args.append([channels_of(source) for source in spec.sources])
        out_channels = 0
    else:
        out_channels = in_channels

    constructor = MODULES[spec.module]
    try:
        modules = [constructor(*copy.deepcopy(args)) for _ in range(repeats)]
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where}: arguments {args!r} do not fit the module: {err}") from err
    layer = modules[0] if repeats == 1 else nn.Sequential(*modules)
    return layer, out_channels


@torch.no_grad()
def _setup_head(model: YOLOv7, head: Detect) -> None:
    """Measure each level's stride, express anchors in grid cells, set bias priors."""
    was_training = model.training
    model.eval()
    try:
        probe = torch.zeros(1, model.input_channels, _STRIDE_PROBE_SIZE, _STRIDE_PROBE_SIZE)
        features = model.head_inputs(probe)
    finally:
        model.train(was_training)
    strides = [_STRIDE_PROBE_SIZE / feature.shape[-2] for feature in features]
    head.set_strides(strides)

    # Anchors are listed from the finest level to the coarsest; a reversed list would
    # pair large anchors with fine grids.
    areas = head.anchors.prod(-1).mean(-1).tolist()
    if (areas[-1] - areas[0]) * (strides[-1] - strides[0]) < 0:
        raise ConfigError(
            "anchors are ordered from the coarsest level to the finest; list them from "
            "the smallest stride (finest level) to the largest"
        )
    head.initialize_biases()
