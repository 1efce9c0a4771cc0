"""Mixed channel and ELAN-depth pruning of YOLOv7: which tails exist, what dropping one
does, and random mixed policies on both reference configurations.

Policies are drawn at random until 20 of them per configuration keep between 0.3 and
0.7 of the dense MACs (3 for yolov7.yaml in the default suite, 20 with ``-m slow``). Each pruned model must run, give outputs of the dense shape,
match the estimator within 0.5 % and survive a save and a ``weights_only`` load with
bit-identical outputs.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from rl_pruner.engine.apply import channels_to_prune
from rl_pruner.engine.estimate import pruned_counts
from rl_pruner.engine.macs import count_macs
from rl_pruner.engine.pruner import Pruner
from rl_pruner.engine.serialization import load_pruned_model, pruned_model_record, save_pruned_model
from rl_pruner.models.registry import load_model
from rl_pruner.models.yolov7 import YOLOv7

IMAGE_SIZE = 128
N_POLICIES = 20
MACS_RANGE = (0.3, 0.7)
EXPECTED_TAILS = {
    # The backbone ELANs end in a pair of 3x3 convolutions; the head ELANs concatenate
    # every chain output, so their tail is one convolution.
    "yolov7": ["model.8-9", "model.21-22", "model.34-35", "model.47-48",
               "model.61", "model.73", "model.86", "model.99"],
    "yolov7-tiny": ["model.5", "model.12", "model.19", "model.26",
                    "model.45", "model.55", "model.63", "model.71"],
}


pytestmark = pytest.mark.usefixtures("two_torch_threads")

@pytest.fixture(scope="module")
def images(yolov7_images: Callable[[int], torch.Tensor]) -> torch.Tensor:
    """The reference photographs at the test input size."""
    return yolov7_images(IMAGE_SIZE)

class _Pruners(dict):
    def __init__(self, yolov7_dir: Path) -> None:
        super().__init__()
        self.yolov7_dir = yolov7_dir

    def __missing__(self, name: str) -> Pruner:
        torch.manual_seed(0)
        loaded = load_model(f"yolov7:{self.yolov7_dir / name}.yaml", input_size=IMAGE_SIZE)
        _randomise_batchnorm(loaded.model)
        self[name] = Pruner(loaded)
        return self[name]


@pytest.fixture(scope="module")
def pruners(yolov7_dir: Path) -> dict[str, Pruner]:
    return _Pruners(yolov7_dir)


def _randomise_batchnorm(model: torch.nn.Module) -> None:
    """Give every batch norm non-trivial statistics and affine terms, so that a wrong
    channel anywhere changes the outputs."""
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            size = module.num_features
            module.running_mean.copy_(torch.randn(size, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(size, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(size, generator=generator) + 0.5)
            module.bias.data.copy_(torch.randn(size, generator=generator) * 0.1)


def _outputs(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(images)


@pytest.mark.parametrize("name", sorted(EXPECTED_TAILS))
def test_elan_tails_are_removable_blocks(pruners: dict[str, Pruner], name: str) -> None:
    structure = pruners[name].structure
    model = pruners[name].model
    assert isinstance(model, YOLOv7)

    assert [tail.name for tail in model.elan_tails()] == EXPECTED_TAILS[name]
    assert structure.block_names == EXPECTED_TAILS[name]
    for block in structure.blocks:
        last = block.name.split("-")[-1].removeprefix("model.")
        assert block.exit_layer == f"model.{last}.conv"
        assert structure.layer(block.exit_layer).block == block.name
        assert block.first_layer == f"{block.modules[0]}.conv"


@pytest.mark.parametrize(("name", "block"), [("yolov7-tiny", "model.12"), ("yolov7", "model.21-22")])
def test_dropping_a_tail_equals_zeroing_its_concat_input(
    pruners: dict[str, Pruner], images: torch.Tensor, name: str, block: str
) -> None:
    """Without channel pruning, a dropped tail is the dense model whose consumer ignores the tail's channels."""
    pruner = pruners[name]
    dense = pruner.model
    tail = next(t for t in dense.elan_tails() if t.name == block)
    pruned = pruner.apply(pruner.make_policy({}, [block]))

    concat_sources = dense.sources[tail.concat]
    widths = {s: dense.model[s].conv.out_channels for s in concat_sources}
    start = sum(widths[s] for s in concat_sources[:concat_sources.index(tail.layers[-1])])
    consumer = dense.model[tail.concat + 1].conv
    masked = load_model(f"yolov7:{pruner.loaded.architecture.removeprefix('yolov7:')}", input_size=IMAGE_SIZE).model
    masked.load_state_dict(dense.state_dict())
    with torch.no_grad():
        masked.model[tail.concat + 1].conv.weight[:, start:start + widths[tail.layers[-1]]] = 0

    assert pruned.model[tail.concat + 1].conv.in_channels == consumer.in_channels - widths[tail.layers[-1]]
    assert tail.layers[0] in pruned.dropped_layers
    assert torch.allclose(_outputs(pruned, images), _outputs(masked, images), rtol=1e-4, atol=1e-4)


def test_mixed_policy_removes_the_scored_channels(pruners: dict[str, Pruner], images: torch.Tensor) -> None:
    """A pruned model equals the dense model whose removed channels output zero.

    Each removed channel's Conv output (after its activation, which maps 0 to 0) is
    zeroed by a hook in a dense copy, and every channel of a dropped tail's exit. Layers
    that feed the head are left whole: the head adds a learned offset to its inputs, so
    a zero output there is not a removed channel.
    """
    pruner = pruners["yolov7-tiny"]
    structure = pruner.structure
    head = f"model.{len(pruner.model.model) - 1}."
    feeds_head = {layer.name for layer in structure.layers
                  if any(member.module_name.startswith(head) for member in layer.members)}
    rng = random.Random(5)
    for _ in range(3):
        ratios = {layer.name: 0.0 if layer.name in feeds_head else rng.choice([0.0, 0.25, 0.5, 0.75])
                  for layer in structure.layers}
        dropped = [block.name for block in structure.blocks if rng.random() < 0.5]
        policy = pruner.make_policy(ratios, dropped, round_to=8)
        pruned = pruner.apply(policy)

        masked = copy.deepcopy(pruner.model)
        modules = dict(masked.named_modules())
        exits = {block.exit_layer for block in structure.blocks if block.name in dropped}
        counts = pruned_counts(structure, policy.pruning_ratios, 8)
        scores = pruner.scores(policy.criterion)
        for layer, n_pruned in zip(structure.layers, counts, strict=True):
            if layer.name in exits:
                channels = list(range(layer.channels))
            elif layer.block in dropped or n_pruned == 0:
                continue
            else:
                channels = channels_to_prune(scores[layer.name], n_pruned)
            conv_module = modules[layer.name.removesuffix(".conv")]
            conv_module.register_forward_hook(lambda _m, _i, out, channels=channels: _zeroed(out, channels))

        expected = _outputs(masked, images)
        assert torch.allclose(_outputs(pruned, images), expected, rtol=1e-4, atol=1e-3 * float(expected.abs().max()))


def _zeroed(output: torch.Tensor, channels: list[int]) -> torch.Tensor:
    output = output.clone()
    output[:, channels] = 0
    return output


def _random_mixed_policies(pruner: Pruner, seed: int) -> Iterator:
    """Random ratios and random tails to drop, kept when the MACs fall in MACS_RANGE."""
    rng = random.Random(seed)
    structure = pruner.structure
    found = 0
    for _ in range(50 * N_POLICIES):
        limit = rng.uniform(0.3, 0.8)
        ratios = {layer.name: rng.uniform(0.0, limit) for layer in structure.layers}
        dropped = rng.sample(structure.block_names, rng.randint(0, len(structure.blocks)))
        policy = pruner.make_policy(ratios, dropped, round_to=8)
        if MACS_RANGE[0] <= policy.metadata["macs_ratio"] <= MACS_RANGE[1]:
            found += 1
            yield policy
            if found == N_POLICIES:
                return
    raise AssertionError(f"only {found} random policies fell between {MACS_RANGE} of the dense MACs")


@pytest.mark.parametrize(("name", "n_policies"), [
    ("yolov7-tiny", N_POLICIES),
    # Reloading a yolov7 rebuilds the dense model first (seconds each), so the default
    # suite checks the first 3 policies and the slow suite all 20.
    ("yolov7", 3),
    pytest.param("yolov7", N_POLICIES, marks=pytest.mark.slow),
])
def test_random_mixed_policies(
    pruners: dict[str, Pruner], images: torch.Tensor, tmp_path: Path, name: str, n_policies: int
) -> None:
    pruner = pruners[name]
    loaded = pruner.loaded
    dense_shape = _outputs(pruner.model, images).shape
    n_dropped = 0
    policies = _random_mixed_policies(pruner, seed=index_seed(name))
    for index, policy in zip(range(n_policies), policies, strict=False):
        pruned = pruner.apply(policy)
        outputs = _outputs(pruned, images)
        exact = count_macs(pruned, loaded.input_shape)

        assert outputs.shape == dense_shape
        assert abs(policy.metadata["estimated_macs"] - exact) <= 0.005 * exact
        assert MACS_RANGE[0] - 0.01 <= exact / pruner.structure.dense_macs <= MACS_RANGE[1] + 0.01

        path = tmp_path / f"{name}-{index}.pt"
        save_pruned_model(path, pruned_model_record(
            pruned, architecture=loaded.architecture, input_shape=loaded.input_shape,
            num_classes=loaded.num_classes, normalization=loaded.normalization,
            dropped_blocks=policy.dropped_blocks, policy=policy.to_dict(),
        ))
        reloaded = load_pruned_model(path)
        assert torch.equal(_outputs(reloaded.model, images), outputs)
        n_dropped += len(policy.dropped_blocks)
    assert n_dropped > 0


def index_seed(name: str) -> int:
    return sorted(EXPECTED_TAILS).index(name)
