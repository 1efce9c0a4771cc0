"""What can be pruned in a model: layers, their dependency groups, removable blocks.

:func:`analyze_model` traces the dense model once with Torch-Pruning's
``DependencyGraph`` and records, for every prunable layer, which modules must lose the
same channels and at which indices. A *layer* here is one dependency group, named by
its first convolution or linear module in ``model.named_modules()`` order. In a ResNet
the convolutions that write into one residual stream form a single layer. A policy
gives one pruning ratio (fraction of channels removed) per layer.

A model may also declare *depth blocks* in the attribute ``rl_pruner_depth_blocks``:
groups of layers that can be removed together although no single module contains them,
such as the last step of a YOLOv7 ELAN chain. Each entry is a mapping with ``name``,
``modules`` (the names of the modules removed) and ``exit`` (the root of the layer
whose output the rest of the network reads: its channels vanish from every consumer
when the block is dropped). The model then removes them itself in its method
``rl_pruner_drop_blocks(names)``; see :func:`drop_blocks`.

A model with several outputs (a detector's per-level output convolutions) names them
in the attribute ``rl_pruner_output_modules`` (a sequence of module names); otherwise
the output module is the leaf module whose output is the model's output. Output
modules never lose output channels.

The record is plain data (module names, index maps, per-module cost terms), so later
policies are applied and costed without tracing the model again.
"""

from __future__ import annotations

import hashlib
import json
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch_pruning as tp
from torch import nn
from torchvision.models.resnet import BasicBlock as TorchvisionBasicBlock
from torchvision.models.resnet import Bottleneck as TorchvisionBottleneck

from rl_pruner.engine.cost import CostTerm, term_cost
from rl_pruner.engine.shortcut_pruner import CUSTOMIZED_PRUNERS
from rl_pruner.errors import InputError
from rl_pruner.models.cifar_resnet import BasicBlock as CifarBasicBlock


@dataclass(frozen=True)
class MemberPruning:
    """One module's share of a layer: which of its channels go with each root channel."""

    module_name: str
    handler: Callable[[nn.Module, Sequence[int]], nn.Module]
    dimension: str  # "out" for output channels (and depthwise layers), "in" for input channels
    index_map: tuple[tuple[int, ...], ...]  # index_map[root_channel] = this module's channels


@dataclass(frozen=True)
class PrunableLayer:
    """One dependency group, described by its root module (the policy's key)."""

    index: int
    name: str
    kind: str  # "conv" or "linear"
    channels: int
    in_channels: int
    out_channels: int
    kernel_size: int
    stride: int
    macs: int  # dense MACs of the root module for one input sample
    params: int  # dense parameters of the root module
    block: str | None  # removable block that contains every module of this layer
    members: tuple[MemberPruning, ...] = field(repr=False)


@dataclass(frozen=True)
class RemovableBlock:
    """A part of the network that a policy may remove.

    A residual block (``modules`` is its own name alone and ``exit_layer`` is None)
    becomes the identity. A depth block declared by the model is removed by the model,
    and the channels of ``exit_layer`` disappear from every layer that reads them.
    """

    name: str
    first_layer: str | None  # first prunable layer inside the block, in network order
    macs: int  # of the modules inside; a depth block also saves part of its consumers' MACs
    params: int
    modules: tuple[str, ...] = ()
    exit_layer: str | None = None


@dataclass
class ModelStructure:
    """The prunable structure of one dense model, computed once by :func:`analyze_model`."""

    architecture: str
    input_shape: tuple[int, ...]
    layers: list[PrunableLayer]
    blocks: list[RemovableBlock]
    cost_terms: list[CostTerm]
    output_module: str  # the first of ``output_modules``: a classifier's only output module
    dense_macs: int
    dense_params: int
    output_modules: tuple[str, ...] = ()  # every module whose output channels are model outputs

    @property
    def fingerprint(self) -> str:
        """Hash of the layer names, channel counts, blocks and input shape."""
        record = {
            "input_shape": list(self.input_shape),
            "layers": [[layer.name, layer.channels] for layer in self.layers],
            "blocks": [block.name for block in self.blocks],
        }
        digest = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()
        return f"sha256:{digest[:16]}"

    def layer(self, name: str) -> PrunableLayer:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)

    @property
    def layer_names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    @property
    def block_names(self) -> list[str]:
        return [block.name for block in self.blocks]


def is_removable_block(module: nn.Module) -> bool:
    """Return whether ``module`` is a residual block that may be replaced by ``nn.Identity``.

    Known blocks: CIFAR basic blocks with an identity shortcut, and torchvision
    ``BasicBlock``/``Bottleneck`` without a downsample. A user module opts in by
    setting the attribute ``rl_pruner_removable = True``; it must then map its input
    to an output of the same shape.
    """
    if getattr(module, "rl_pruner_removable", False):
        return True
    if isinstance(module, CifarBasicBlock):
        return module.has_identity_shortcut
    if isinstance(module, (TorchvisionBasicBlock, TorchvisionBottleneck)):
        return module.downsample is None
    return False


OUTPUT_MODULES_ATTRIBUTE = "rl_pruner_output_modules"
DEPTH_BLOCKS_ATTRIBUTE = "rl_pruner_depth_blocks"
DROP_BLOCKS_METHOD = "rl_pruner_drop_blocks"


def _declared_depth_blocks(model: nn.Module) -> list[tuple[str, tuple[str, ...], str]]:
    """(name, module names, exit root) of each depth block the model declares."""
    declared = getattr(model, DEPTH_BLOCKS_ATTRIBUTE, None)
    if not declared:
        return []
    if not callable(getattr(model, DROP_BLOCKS_METHOD, None)):
        raise InputError(
            f"{type(model).__name__} declares {DEPTH_BLOCKS_ATTRIBUTE} but has no method "
            f"{DROP_BLOCKS_METHOD}(names) to remove them"
        )
    modules = dict(model.named_modules())
    blocks = []
    seen: set[str] = set()
    for entry in declared:
        name, members, exit_root = str(entry["name"]), tuple(entry["modules"]), str(entry["exit"])
        if name in seen or (name in modules and is_removable_block(modules[name])):
            raise InputError(f"depth block name {name!r} of {type(model).__name__} is used twice; give each block its own name")
        seen.add(name)
        unknown = [m for m in (*members, exit_root) if m not in modules]
        if unknown:
            raise InputError(f"depth block {name!r} of {type(model).__name__} names unknown modules {unknown!r}")
        blocks.append((name, members, exit_root))
    return blocks


def drop_blocks(model: nn.Module, names: Sequence[str]) -> None:
    """Remove the named blocks from ``model`` in place.

    Depth blocks that the model declares are removed by the model's
    ``rl_pruner_drop_blocks``; any other name is a residual block, replaced by
    ``nn.Identity``. Channel pruning of the consumers is not done here (see
    :func:`~rl_pruner.engine.apply.apply_policy`).
    """
    declared = {name for name, _, _ in _declared_depth_blocks(model)}
    depth = [name for name in names if name in declared]
    if depth:
        getattr(model, DROP_BLOCKS_METHOD)(depth)
    for name in names:
        if name not in declared:
            model.set_submodule(name, nn.Identity())


def _find_output_modules(model: nn.Module, example_input: torch.Tensor) -> list[str]:
    """Names of the modules whose outputs are the model's outputs; never pruned.

    A model that sets ``rl_pruner_output_modules`` names them itself; otherwise the one
    leaf module whose output the forward pass returns (the classifier) is found.
    """
    declared = getattr(model, OUTPUT_MODULES_ATTRIBUTE, None)
    if declared is None:
        return [_find_output_module(model, example_input)]
    names = [str(name) for name in declared]
    modules = dict(model.named_modules())
    unknown = [name for name in names if name not in modules]
    if not names or unknown:
        raise InputError(
            f"{type(model).__name__}.{OUTPUT_MODULES_ATTRIBUTE} is {names!r}; it must name one or "
            f"more modules of the model (unknown: {unknown!r})"
        )
    return names


def _find_output_module(model: nn.Module, example_input: torch.Tensor) -> str:
    """Name of the leaf module whose output is the model's output (the classifier)."""
    # A freed output's id may be reused by a later tensor, so each id keeps a weak
    # reference, which shows whether the recorded output is the returned object.
    outputs: dict[int, tuple[str, weakref.ref[torch.Tensor]]] = {}
    hooks = []

    def record(name: str, output: object) -> None:
        if isinstance(output, torch.Tensor):
            outputs[id(output)] = (name, weakref.ref(output))

    for name, module in model.named_modules():
        if len(list(module.children())) == 0:
            hooks.append(module.register_forward_hook(
                lambda _m, _i, out, name=name: record(name, out)))
    try:
        with torch.no_grad():
            result = model(example_input)
    finally:
        for hook in hooks:
            hook.remove()
    name, reference = outputs.get(id(result), ("", None))
    if reference is None or reference() is not result:
        raise InputError(
            "the model's output is not produced by a module, so its classifier cannot be found; "
            "end the model's forward with the classifier module's output, or name the output "
            f"modules in the model attribute {OUTPUT_MODULES_ATTRIBUTE!r}"
        )
    return name


def _positions_per_sample(model: nn.Module, example_input: torch.Tensor) -> dict[str, int]:
    """Output positions per sample of each conv (H x W) and rows of each linear."""
    positions: dict[str, int] = {}
    hooks = []
    batch = example_input.shape[0]

    def record(name: str, module: nn.Module, output: torch.Tensor) -> None:
        if isinstance(module, nn.Conv2d):
            positions[name] = output.shape[-1] * output.shape[-2]
        else:
            positions[name] = output.numel() // (batch * module.out_features)

    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            hooks.append(module.register_forward_hook(
                lambda m, _i, out, name=name: record(name, m, out)))
    try:
        with torch.no_grad():
            model(example_input)
    finally:
        for hook in hooks:
            hook.remove()
    return positions


def _containing_block(module_name: str, block_modules: dict[str, tuple[str, ...]]) -> str | None:
    for block, members in block_modules.items():
        if any(module_name == member or module_name.startswith(member + ".") for member in members):
            return block
    return None


def _module_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters(recurse=False))


def analyze_model(
    model: nn.Module,
    input_shape: Sequence[int],
    *,
    architecture: str,
    ignored_layers: Sequence[str] = (),
) -> ModelStructure:
    """Trace ``model`` once and record its prunable layers, blocks and cost terms.

    ``input_shape`` is one sample's shape (C, H, W). The modules that produce the
    model's outputs (the classifier, or those named by the model attribute
    ``rl_pruner_output_modules``) and any module named in ``ignored_layers`` are left
    out of every layer's root, so their output channels are never pruned.
    """
    model = model.eval()
    example_input = torch.zeros(1, *input_shape)
    modules = dict(model.named_modules())
    order = {name: position for position, name in enumerate(modules)}
    name_of = {module: name for name, module in modules.items()}

    output_modules = _find_output_modules(model, example_input)
    ignored = [modules[name] for name in [*output_modules, *ignored_layers]]
    positions = _positions_per_sample(model, example_input)
    block_modules = {name: (name,) for name, module in modules.items() if name and is_removable_block(module)}
    depth_blocks = _declared_depth_blocks(model)
    block_modules.update({name: members for name, members, _ in depth_blocks})
    exits = {exit_root: name for name, _, exit_root in depth_blocks}

    graph = tp.DependencyGraph().build_dependency(
        model, example_input, customized_pruners=dict(CUSTOMIZED_PRUNERS), verbose=False
    )
    root_types = [nn.Conv2d, nn.Linear]
    raw_groups = []
    for group in graph.get_all_groups(ignored_layers=ignored, root_module_types=root_types):
        out_members = [
            name_of[item.dep.target.module]
            for item in group
            if isinstance(item.dep.target.module, (nn.Conv2d, nn.Linear))
            and graph.is_out_channel_pruning_fn(item.dep.handler)
            and item.dep.target.module in name_of
        ]
        if not out_members:
            continue
        root_name = min(out_members, key=order.__getitem__)
        raw_groups.append(root_name)
    raw_groups.sort(key=order.__getitem__)

    layers: list[PrunableLayer] = []
    # (module name, "in"/"out") -> [(layer index, member channels per root channel)]
    sources: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for index, root_name in enumerate(raw_groups):
        root = modules[root_name]
        handler = graph.get_pruner_of_module(root).prune_out_channels
        n_channels = int(graph.get_out_channels(root))
        group = graph.get_pruning_group(root, handler, idxs=list(range(n_channels)))
        members = _members_of(group, graph, name_of, n_channels)
        for member in members:
            dimension = member.dimension
            factor = sum(len(m) for m in member.index_map) / n_channels
            sources.setdefault((member.module_name, dimension), []).append((index, factor))
        member_blocks = {_containing_block(m.module_name, block_modules) for m in members}
        block = member_blocks.pop() if len(member_blocks) == 1 else exits.get(root_name)
        is_conv = isinstance(root, nn.Conv2d)
        layers.append(PrunableLayer(
            index=index,
            name=root_name,
            kind="conv" if is_conv else "linear",
            channels=n_channels,
            in_channels=root.in_channels if is_conv else root.in_features,
            out_channels=n_channels,
            kernel_size=root.kernel_size[0] if is_conv else 1,
            stride=root.stride[0] if is_conv else 1,
            macs=0,
            params=_module_params(root),
            block=block,
            members=tuple(members),
        ))

    cost_terms = _cost_terms(modules, sources, positions, block_modules)
    dense_macs = sum(term_cost(term, None)[0] for term in cost_terms)
    dense_params = sum(p.numel() for p in model.parameters())
    macs_by_module = {term.module_name: term_cost(term, None)[0] for term in cost_terms}
    layers = [_with_macs(layer, macs_by_module.get(layer.name, 0)) for layer in layers]
    missing_exits = set(exits) - {layer.name for layer in layers}
    if missing_exits:
        raise InputError(f"depth block exits {sorted(missing_exits)!r} are not prunable layers of the model")
    blocks = _removable_blocks(block_modules, exits, layers, cost_terms)
    return ModelStructure(
        architecture=architecture,
        input_shape=tuple(int(s) for s in input_shape),
        layers=layers,
        blocks=blocks,
        cost_terms=cost_terms,
        output_module=output_modules[0],
        dense_macs=dense_macs,
        dense_params=dense_params,
        output_modules=tuple(output_modules),
    )


def _with_macs(layer: PrunableLayer, macs: int) -> PrunableLayer:
    return PrunableLayer(**{**layer.__dict__, "macs": macs})


def _members_of(
    group: tp.dependency.Group,
    graph: tp.DependencyGraph,
    name_of: dict[nn.Module, str],
    n_channels: int,
) -> list[MemberPruning]:
    """Module-level pruning steps of a full group, with root-to-member index maps."""
    members: list[MemberPruning] = []
    seen: set[tuple[str, Callable]] = set()
    for item in group:
        module = item.dep.target.module
        if not isinstance(module, nn.Module) or module not in name_of:
            continue  # Torch-Pruning's own graph operations (add, concat) hold no weights
        key = (name_of[module], item.dep.handler)
        if key in seen:
            continue
        seen.add(key)
        index_map: list[list[int]] = [[] for _ in range(n_channels)]
        for root_idx, member_idx in zip(item.root_idxs, item.idxs, strict=True):
            index_map[int(root_idx)].append(int(member_idx))
        members.append(MemberPruning(
            module_name=name_of[module],
            handler=item.dep.handler,
            dimension="out" if graph.is_out_channel_pruning_fn(item.dep.handler) else "in",
            index_map=tuple(tuple(m) for m in index_map),
        ))
    return members


def _cost_terms(
    modules: dict[str, nn.Module],
    sources: dict[tuple[str, str], list[tuple[int, float]]],
    positions: dict[str, int],
    block_modules: dict[str, tuple[str, ...]],
) -> list[CostTerm]:
    terms = []
    for name, module in modules.items():
        params = _module_params(module)
        in_sources = tuple(sources.get((name, "in"), ()))
        out_sources = tuple(sources.get((name, "out"), ()))
        block = _containing_block(name, block_modules)
        if isinstance(module, nn.Conv2d):
            kind, base_in, base_out = "conv", module.in_channels, module.out_channels
            kernel_area = module.kernel_size[0] * module.kernel_size[1]
            per_position = kernel_area * positions.get(name, 0)
            groups = module.groups
            bias = module.bias is not None
        elif isinstance(module, nn.Linear):
            kind, base_in, base_out = "linear", module.in_features, module.out_features
            kernel_area, per_position = 1, positions.get(name, 0)
            groups, bias = 1, module.bias is not None
        elif params and out_sources:
            kind, base_in, base_out = "channelwise", 0, _channelwise_size(module)
            kernel_area, per_position, groups, bias = 0, 0, 1, False
        elif params:
            kind, base_in, base_out = "fixed", 0, 0
            kernel_area, per_position, groups, bias = 0, 0, 1, False
        else:
            continue
        depthwise = kind == "conv" and groups > 1 and groups == base_in == base_out
        terms.append(CostTerm(
            module_name=name, kind=kind, base_in=base_in, base_out=base_out,
            in_sources=in_sources, out_sources=out_sources, kernel_area=kernel_area,
            macs_per_position=per_position,
            groups=groups, depthwise=depthwise, bias=bias, params=params, block=block,
        ))
    return terms


def _channelwise_size(module: nn.Module) -> int:
    """Channels of a per-channel module, counted as its Torch-Pruning handler counts them.

    A customised layer's handler reports its width (a ``(1, C, 1, 1)`` implicit parameter
    has C channels); otherwise every parameter's first dimension is the channel count.
    """
    handler = CUSTOMIZED_PRUNERS.get(type(module))
    if handler is not None:
        return int(handler.get_out_channels(module))
    sizes = {p.shape[0] for p in module.parameters(recurse=False)}
    if len(sizes) != 1:
        raise ValueError(f"module {type(module).__name__} has per-channel parameters of different sizes")
    return sizes.pop()


def _removable_blocks(
    block_modules: dict[str, tuple[str, ...]],
    exits: dict[str, str],
    layers: Sequence[PrunableLayer],
    terms: Sequence[CostTerm],
) -> list[RemovableBlock]:
    exit_of = {block: root for root, block in exits.items()}
    blocks = []
    for name, members in block_modules.items():
        inside = [layer.name for layer in layers if layer.block == name]
        macs = sum(term_cost(t, None)[0] for t in terms if t.block == name)
        params = sum(term_cost(t, None)[1] for t in terms if t.block == name)
        blocks.append(RemovableBlock(
            name=name, first_layer=inside[0] if inside else None, macs=macs, params=params,
            modules=members, exit_layer=exit_of.get(name),
        ))
    return blocks
