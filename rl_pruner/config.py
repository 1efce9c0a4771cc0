"""Search configuration: dataclasses, saved and read as YAML.

A search is described by one YAML file whose keys are the fields of
:class:`SearchConfig`, with the sections ``ppo:`` (:class:`PPOConfig`) and
``tracking:`` (:class:`TrackingConfig`)::

    model: cifar_resnet56
    checkpoint: ../shared/data/checkpoints/cifar10-resnet56.th
    data: ../shared/data/cifar10-jpeg/train.tar.gz
    macs_target: 0.5
    ppo:
      learning_rate: 3e-4

:func:`load_config` reads such a file, applies ``--set key=value`` overrides and
validates every key, so a typo or an out-of-range value fails before any model is
built. Relative paths in ``checkpoint``, ``data`` and ``test_data`` are resolved
against the current working directory of the process, not against the directory of
the YAML file, so the files in ``experiments/`` are written for commands run from the
repository root. The model name itself is checked later, when the model is built.
"""

from __future__ import annotations

import copy
import difflib
import logging
import math
import re
import types
import typing
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml

from rl_pruner.errors import ConfigError
from rl_pruner.pipeline import PipelineConfig
from rl_pruner.policy import CRITERIA, DATA_CRITERIA

logger = logging.getLogger(__name__)

BASELINES = ("uniform", "global_l1", "global_lamp")
BUILTIN_PREFIX = "builtin:"
BUILTIN_DATASETS = ("builtin:digits",)


@dataclass
class PPOConfig:
    """Hyper-parameters of stable-baselines3's PPO, under SB3's names where SB3 has one.

    :param learning_rate: Adam step size, > 0.
    :param episodes_per_update: Episodes collected per rollout, >= 1. SB3's ``n_steps``
        is this times the episode length in steps.
    :param batch_size: Minibatch size in steps, >= 1.
    :param n_epochs: Passes over each rollout per update, >= 1.
    :param gamma: Discount factor, in [0, 1].
    :param gae_lambda: Bias-variance trade-off of generalised advantage estimation, in [0, 1].
    :param clip_range: Clipping parameter of the surrogate objective, > 0.
    :param ent_coef: Entropy coefficient of the loss, >= 0.
    :param vf_coef: Value-function coefficient of the loss, >= 0.
    :param max_grad_norm: Maximum gradient norm for clipping, > 0.
    :param log_std_init: Initial log standard deviation of the Gaussian action distribution.
    :param net_arch: Hidden layer widths of the policy and value networks, each >= 1.
    """

    learning_rate: float = 3e-4
    episodes_per_update: int = 8
    batch_size: int = 64
    n_epochs: int = 10
    gamma: float = 1.0
    gae_lambda: float = 0.95
    clip_range: float = 0.2
    ent_coef: float = 0.0
    vf_coef: float = 0.5
    max_grad_norm: float = 0.5
    log_std_init: float = -1.0
    net_arch: list[int] = field(default_factory=lambda: [64, 64])


REWARD_METRICS = ("top1", "map50", "map50_95", "fidelity_map50", "fidelity_map50_95")
DETECTION_METRICS = REWARD_METRICS[1:]


@dataclass
class RewardConfig:
    """What the reward of a policy measures.

    :param metric: ``top1`` for classifiers (top-1 on the reward images); for detectors
        ``map50`` or ``map50_95`` (box mAP after NMS on a YOLO-format labelled set:
        ``data`` is its data YAML) or ``fidelity_map50`` / ``fidelity_map50_95`` (the
        same mAP with the dense model's detections as ground truth, on unlabelled
        images: ``data`` is a folder of images).
    :param conf_threshold: For the fidelity metrics, the confidence a dense detection
        needs to count as ground truth, in [0, 1]; 0 keeps the best ``max_ground_truths``
        per image, which an untrained detector needs.
    :param iou_threshold: IoU above which NMS removes the lower-scoring of two boxes of
        one class, in [0, 1].
    :param max_ground_truths: For the fidelity metrics, the most dense detections kept
        per image as ground truth, >= 1.
    """

    metric: str = "top1"
    conf_threshold: float = 0.25
    iou_threshold: float = 0.65
    max_ground_truths: int = 100


@dataclass
class TrackingConfig:
    """MLflow tracking settings of a search.

    :param uri: MLflow tracking URI. Its reachability is checked when the search starts.
    :param experiment: MLflow experiment name, non-empty.
    :param run_name: MLflow run name, or None for a generated one.
    """

    uri: str = "sqlite:///mlflow.db"
    experiment: str = "rl-pruner"
    run_name: str | None = None


@dataclass
class DistributedConfig:
    """Placement of a search's episodes: in process or on Ray workers.

    :param workers: Ray actors that run episodes, >= 0. 0 runs them in the search's own
        process, without Ray. At most ``ppo.episodes_per_update``, the episodes that
        run at once.
    :param ray_address: ``local`` (a private cluster on this machine, bound to
        127.0.0.1), ``auto`` (the cluster that ``ray start`` runs on this machine),
        ``HOST:PORT`` (a head node's GCS address) or ``ray://HOST:PORT`` (Ray Client).
    :param threads_per_worker: Torch threads, and Ray CPUs reserved, per worker, >= 1,
        or null to share this machine's cores evenly among the workers.
    :param max_worker_replacements: Workers that may die and be replaced during one
        search before it fails, >= 0.
    """

    workers: int = 0
    ray_address: str = "local"
    threads_per_worker: int | None = None
    max_worker_replacements: int = 10


@dataclass
class SweepPPOConfig:
    """PPO hyper-parameter values to sweep; an empty list keeps the search's value."""

    learning_rate: list[float] = field(default_factory=list)
    ent_coef: list[float] = field(default_factory=list)
    clip_range: list[float] = field(default_factory=list)
    gae_lambda: list[float] = field(default_factory=list)
    log_std_init: list[float] = field(default_factory=list)
    n_epochs: list[int] = field(default_factory=list)


@dataclass
class SweepConfig:
    """A Ray Tune sweep over searches (``rl-pruner sweep``); ignored by ``rl-pruner search``.

    Each trial is one search with the rest of the configuration, on one Tune worker.

    :param macs_targets: MACs targets to search, each in (0, 1); empty keeps ``macs_target``.
    :param seeds: Seeds to search, each >= 0; empty keeps ``seed``.
    :param ppo: PPO values to sweep.
    :param search_alg: ``grid`` (every combination) or ``random`` (targets x seeds as a
        grid, PPO values drawn at random, ``num_samples`` times).
    :param num_samples: Repetitions of the grid (``grid``) or random draws (``random``), >= 1.
    :param max_concurrent_trials: Trials run at once, >= 1, or null for as many as the
        cluster's CPUs allow.
    :param cpus_per_trial: Ray CPUs, and torch threads, of each trial, >= 1.
    """

    macs_targets: list[float] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    ppo: SweepPPOConfig = field(default_factory=SweepPPOConfig)
    search_alg: str = "grid"
    num_samples: int = 1
    max_concurrent_trials: int | None = None
    cpus_per_trial: int = 1


@dataclass
class SearchConfig:
    """One policy search: the model, its data, the target, and the agent's settings.

    Image counts are numbers of images carved from the training data ``data``, in
    disjoint subsets: the reward split, the batch-norm split and the calibration split.

    :param model: Registry name of the model, e.g. ``cifar_resnet56`` or ``resnet50``. Required.
    :param data: Training images: an ImageFolder directory, a ``.tar``/``.tar.gz``/``.tgz``
        archive of one, or a built-in data set (``builtin:digits``). Required.
    :param checkpoint: Weights of the dense model, or None to use the model as built.
    :param trust_pickle: Allow checkpoints that need full pickle loading, which can run
        code from the file.
    :param test_data: Held-out images for the final evaluation of the best policy, in the
        same forms as ``data``, or None to skip that evaluation.
    :param macs_target: Fraction of the dense model's MACs that a policy keeps, in (0, 1).
    :param criterion: Channel importance criterion, one of :data:`rl_pruner.policy.CRITERIA`.
    :param round_to: Kept channel counts are rounded to a multiple of this, >= 1.
    :param max_ratio: Largest pruning ratio (fraction of channels removed) of one layer, in (0, 1).
    :param allow_block_drop: Let the agent replace removable residual blocks by the identity.
    :param reward_images: Training images that score each policy, >= 1. The test split
        is never used for rewards.
    :param bn_images: Training images for re-estimating batch-norm statistics after
        pruning, >= 0 (0 skips the re-estimation).
    :param calibration_images: Training images for the data-dependent criteria ``apoz``
        and ``taylor``, >= 0, and >= 1 when one of them is the criterion.
    :param batch_size: Images per forward pass when scoring, >= 1.
    :param input_size: Side in pixels of the square model input, or None for the
        model's own (32 for CIFAR ResNets, 224 for torchvision models, 640 for YOLOv7;
        YOLOv7 sizes must be multiples of 32). Detector images are letterboxed to it.
    :param episodes: Episodes of the search, >= 1. One episode builds one policy. Episodes
        run in batches of ``ppo.episodes_per_update``, so a multiple of it evaluates no
        episode that is not logged.
    :param seed: Seed of the data splits, the agent and the environment, >= 0.
    :param baselines: Policies to compare against, any of ``uniform``, ``global_l1`` and
        ``global_lamp``, each at most once.
    :param output_dir: Directory for policies, logs and the saved configuration.
    :param reward: What the reward measures (top-1, or an mAP for detectors).
    :param ppo: PPO hyper-parameters.
    :param tracking: MLflow settings.
    :param distributed: Where episodes run (in process or on Ray workers).
    :param sweep: Values swept by ``rl-pruner sweep``.
    :param pipeline: Stages run by ``rl-pruner pipeline`` (see :mod:`rl_pruner.pipeline`);
        ``rl-pruner search`` and ``rl-pruner sweep`` ignore it.
    """

    model: str
    data: str
    checkpoint: str | None = None
    trust_pickle: bool = False
    test_data: str | None = None
    macs_target: float = 0.5
    criterion: str = "l1"
    round_to: int = 8
    max_ratio: float = 0.8
    allow_block_drop: bool = True
    reward_images: int = 5000
    bn_images: int = 1000
    calibration_images: int = 512
    batch_size: int = 500
    input_size: int | None = None
    episodes: int = 304
    seed: int = 0
    baselines: list[str] = field(default_factory=lambda: list(BASELINES))
    output_dir: str = "runs"
    reward: RewardConfig = field(default_factory=RewardConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)


# Public functions


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> SearchConfig:
    """Read a YAML search configuration, apply ``key=value`` overrides and validate it.

    Each override sets one key, dotted for sections (``ppo.learning_rate=1e-3``), and its
    value is parsed as YAML, so ``episodes=10`` gives an integer and
    ``tracking.run_name=null`` gives None. Raises ConfigError when the file is missing
    or is not a YAML mapping, when an override is malformed or names an unknown key, and
    for every check of :func:`config_from_dict`.
    """
    path = Path(path)
    source = f"config {path}"
    if not path.is_file():
        problem = "is a directory, not a file" if path.is_dir() else "not found"
        raise ConfigError(f"{source} {problem}; pass the path of a YAML search configuration such as experiments/demo.yaml")

    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{source} cannot be read ({_one_line(err)}); check the file and its permissions") from err
    raw = _parse_yaml(text, source)
    if raw is None:
        raise ConfigError(f"{source} is empty; write at least the keys model: and data:")
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{source} contains {_type_name(raw)} at the top level; it must be a mapping of keys such as model: and data:"
        )

    origin = _Origin(source=source, file=str(path))
    raw = copy.deepcopy(raw)
    for override in overrides:
        key, value = _parse_override(override)
        _set_dotted(raw, key, value, override, origin)
        origin.overrides.pop(key, None)  # so that the latest override of a key comes last
        origin.overrides[key] = override

    config = _build_config(raw, origin)
    logger.info("loaded %s with %d override(s)", source, len(overrides))
    return config


def config_from_dict(mapping: Mapping[str, Any], source: str = "search configuration") -> SearchConfig:
    """Validate a parsed configuration and build a :class:`SearchConfig` from it.

    ``source`` names the input in error messages. Raises ConfigError for an unknown key
    (with the closest known key), a missing required key, a value out of range, an
    unknown criterion or baseline, and a ``checkpoint``, ``data`` or ``test_data`` path
    that does not exist. It also raises for a value of the wrong type: a boolean is not
    an integer, an integer is accepted where a float is expected, and None (YAML null)
    only where a field is optional.
    """
    if not isinstance(mapping, Mapping):
        raise ConfigError(f"{source} is {_type_name(mapping)}; it must be a mapping of keys such as model: and data:")
    return _build_config(mapping, _Origin(source=source))


def config_to_dict(config: SearchConfig) -> dict[str, Any]:
    """Return the configuration as nested plain dicts and lists, ready for ``yaml.safe_dump``."""
    return asdict(config)


def flatten_config(config: SearchConfig) -> dict[str, Any]:
    """Return every setting under its dotted key (``ppo.learning_rate``), e.g. for MLflow parameters."""
    flat: dict[str, Any] = {}
    _flatten_into(flat, config_to_dict(config), prefix="")
    return flat


def save_config(config: SearchConfig, path: str | Path) -> None:
    """Write the configuration as YAML that :func:`load_config` reads back, creating parent directories."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False), encoding="utf-8")


# YAML parsing


class _ConfigLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys and reads ``1e-3`` as a float.

    PyYAML implements YAML 1.1, whose float syntax needs a dot and a signed exponent,
    so it reads ``1e-3`` and ``1.0e3`` as strings. YAML 1.2 reads them as floats, and
    learning rates are usually written that way.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        self.flatten_mapping(node)  # resolves "<<" merge keys, as SafeLoader does
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
            if isinstance(key, Hashable) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+.0123456789"),
)


def _parse_yaml(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_ConfigLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = _one_line(err.problem or err.context or "syntax error")
        if "\\t" in problem:
            hint = "indent with spaces, not tabs"
        elif problem.startswith("duplicate key"):
            hint = "keep one of them"
        else:
            hint = "fix the YAML syntax there"
        raise ConfigError(f"{source} is not valid YAML: {problem}{where}; {hint}") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"{source} is not valid YAML: {_one_line(err)}; fix the YAML syntax") from err


# Overrides


def _parse_override(override: str) -> tuple[str, Any]:
    key, separator, text = override.partition("=")
    key = key.strip()
    if not separator or not key:
        raise ConfigError(f"--set {override!r} is not of the form KEY=VALUE; write e.g. --set episodes=10")
    return key, _parse_yaml(text, f"--set {override}")


def _set_dotted(raw: dict[str, Any], key: str, value: Any, override: str, origin: _Origin) -> None:
    """Set ``raw[a][b] = value`` for the dotted ``key`` "a.b", after checking the key against the schema."""
    parts = key.split(".")
    schema: type = SearchConfig
    section = raw
    for depth, part in enumerate(parts):
        hints = _field_types(schema)
        dotted = ".".join(parts[: depth + 1])
        if part not in hints:
            prefix = dotted.removesuffix(part)
            suggestion = _suggestion(dotted) or f"; known keys are {', '.join(prefix + name for name in hints)}"
            raise ConfigError(f"--set {override}: unknown key {dotted!r}{suggestion}; correct the --set key")
        if depth == len(parts) - 1:
            section[part] = value
            return

        schema = hints[part]
        if not is_dataclass(schema):
            raise ConfigError(f"--set {override}: {dotted!r} is a single value, not a section; write --set {dotted}=VALUE")
        if section.get(part) is None:
            section[part] = {}
        if not isinstance(section[part], dict):
            raise ConfigError(
                f"--set {override}: {dotted!r} in {origin.source} is {_show(section[part])}, not a mapping; "
                f"fix {dotted!r} in {origin.file}"
            )
        section = section[part]


# Validation


@dataclass
class _Origin:
    """Source of the values: the file and the --set overrides, so that each error names what to fix."""

    source: str
    file: str | None = None
    overrides: dict[str, str] = field(default_factory=dict)  # dotted key -> its "--set" text

    def where(self, key: str) -> str:
        override = self._override_of(key)
        return f"--set {override}" if override is not None else self.source

    def fix(self, key: str, example: str) -> str:
        if self._override_of(key) is not None:
            return f"pass e.g. --set {key}={example}"
        if self.file is not None:
            return f"fix {key!r} in {self.file} or pass --set {key}={example}"
        return f"fix {key!r} in {self.source}"

    def fix_section(self, key: str, example: str) -> str:
        if self._override_of(key) is not None:
            return f"set its keys one by one, e.g. --set {example}"
        return f"fix {key!r} in {self.file or self.source}"

    def _override_of(self, key: str) -> str | None:
        """Return the --set that gave ``key`` its value, for the key itself or for its section, or None."""
        for overridden, text in reversed(self.overrides.items()):
            if key == overridden or key.startswith(f"{overridden}."):
                return text
        return None


@dataclass(frozen=True)
class _Rule:
    """Range check: ``accepts(value)`` must hold, else the error message states ``requirement``."""

    accepts: Callable[[Any], bool]
    requirement: str
    example: str


def _at_least(minimum: int, example: str) -> _Rule:
    return _Rule(lambda value: value >= minimum, f"it must be >= {minimum}", example)


def _positive(example: str) -> _Rule:
    return _Rule(lambda value: value > 0, "it must be > 0", example)


def _not_empty(example: str) -> _Rule:
    return _Rule(lambda value: value is None or value.strip() != "", "it must not be empty", example)


_UNIT_INTERVAL = _Rule(lambda value: 0.0 <= value <= 1.0, "it must be in [0, 1]", "0.95")

_RULES: dict[str, _Rule] = {
    "model": _not_empty("cifar_resnet56"),
    "data": _not_empty("PATH"),
    "checkpoint": _not_empty("PATH"),
    "test_data": _not_empty("PATH"),
    "macs_target": _Rule(
        lambda value: 0.0 < value < 1.0,
        "it is the fraction of dense MACs kept, so it must be strictly between 0 and 1",
        "0.5",
    ),
    "round_to": _at_least(1, "8"),
    "max_ratio": _Rule(
        lambda value: 0.0 < value < 1.0,
        "it is the largest pruning ratio (fraction of channels removed) of one layer, so it must be strictly between 0 and 1",
        "0.8",
    ),
    "reward_images": _at_least(1, "5000"),
    "bn_images": _at_least(0, "1000"),
    "calibration_images": _at_least(0, "512"),
    "batch_size": _at_least(1, "500"),
    "input_size": _at_least(8, "640"),
    "reward.conf_threshold": _UNIT_INTERVAL,
    "reward.iou_threshold": _UNIT_INTERVAL,
    "reward.max_ground_truths": _at_least(1, "100"),
    "episodes": _at_least(1, "304"),
    "seed": _at_least(0, "0"),
    "output_dir": _not_empty("runs"),
    "ppo.learning_rate": _positive("3e-4"),
    "ppo.episodes_per_update": _at_least(1, "8"),
    "ppo.batch_size": _at_least(1, "64"),
    "ppo.n_epochs": _at_least(1, "10"),
    "ppo.gamma": _UNIT_INTERVAL,
    "ppo.gae_lambda": _UNIT_INTERVAL,
    "ppo.clip_range": _positive("0.2"),
    "ppo.ent_coef": _at_least(0, "0.0"),
    "ppo.vf_coef": _at_least(0, "0.5"),
    "ppo.max_grad_norm": _positive("0.5"),
    "ppo.net_arch": _Rule(lambda widths: all(width >= 1 for width in widths), "every width must be >= 1", "[64,64]"),
    "tracking.uri": _not_empty("sqlite:///mlflow.db"),
    "tracking.experiment": _not_empty("rl-pruner"),
    "tracking.run_name": _not_empty("NAME"),
    "distributed.workers": _at_least(0, "2"),
    "distributed.ray_address": _not_empty("local"),
    "distributed.threads_per_worker": _at_least(1, "1"),
    "distributed.max_worker_replacements": _at_least(0, "10"),
    "sweep.macs_targets": _Rule(lambda targets: all(0.0 < t < 1.0 for t in targets),
                                "every target must be strictly between 0 and 1", "[0.3,0.5,0.7]"),
    "sweep.seeds": _Rule(lambda seeds: all(seed >= 0 for seed in seeds), "every seed must be >= 0", "[0,1]"),
    "sweep.num_samples": _at_least(1, "1"),
    "sweep.max_concurrent_trials": _at_least(1, "2"),
    "sweep.cpus_per_trial": _at_least(1, "1"),
}


def _build_config(raw: Mapping[str, Any], origin: _Origin) -> SearchConfig:
    config = typing.cast(SearchConfig, _build_section(SearchConfig, raw, "", origin))

    flat = flatten_config(config)
    for key, rule in _RULES.items():
        value = flat[key]
        if value is not None and not rule.accepts(value):
            raise ConfigError(f"{origin.where(key)}: {key!r} is {_show(value)}; {rule.requirement}; {origin.fix(key, rule.example)}")

    _check_choices(config, origin)
    _check_paths(config, origin)
    return config


def _build_section(schema: type, raw: Mapping[str, Any], prefix: str, origin: _Origin) -> Any:
    """Check the keys and value types of one mapping and build the dataclass ``schema`` from it."""
    hints = _field_types(schema)
    for key in raw:
        if not isinstance(key, str) or key not in hints:
            dotted = f"{prefix}{key}"
            suggestion = _suggestion(dotted) or f"; known keys are {', '.join(prefix + name for name in hints)}"
            raise ConfigError(f"{origin.where(dotted)}: unknown key {dotted!r}{suggestion}; {_fix_unknown(dotted, origin)}")

    values: dict[str, Any] = {}
    for spec in fields(schema):
        dotted = f"{prefix}{spec.name}"
        if spec.name not in raw:
            if spec.default is MISSING and spec.default_factory is MISSING:
                raise ConfigError(f"{origin.source}: required key {dotted!r} is missing; {_REQUIRED_FIX[dotted]}")
            continue

        hint = hints[spec.name]
        value = raw[spec.name]
        if is_dataclass(hint):
            if not isinstance(value, Mapping):
                child = fields(hint)[0]
                example = f"{dotted}.{child.name}={_example(child)}"
                raise ConfigError(
                    f"{origin.where(dotted)}: {dotted!r} is {_describe_value(value)}; "
                    f"expected a mapping of {dotted}.* keys; {origin.fix_section(dotted, example)}"
                )
            values[spec.name] = _build_section(hint, value, f"{dotted}.", origin)
            continue

        matched, converted = _match_type(value, hint)
        if not matched:
            example = _RULES[dotted].example if dotted in _RULES else _example(spec)
            raise ConfigError(
                f"{origin.where(dotted)}: {dotted!r} is {_describe_value(value)}; "
                f"expected {_describe_type(hint)}; {origin.fix(dotted, example)}"
            )
        values[spec.name] = converted
    return schema(**values)


_REQUIRED_FIX = {
    "model": "add e.g. 'model: cifar_resnet56' (a model name such as cifar_resnet56, resnet50 or digits_cnn)",
    "data": "add e.g. 'data: path/to/train' (an ImageFolder directory, an archive of one, or builtin:digits)",
}


def _fix_unknown(key: str, origin: _Origin) -> str:
    if origin.where(key) != origin.source:
        return "correct the --set key"
    return f"rename or remove it in {origin.file or origin.source}"


SWEEP_ALGORITHMS = ("grid", "random")


def _check_choices(config: SearchConfig, origin: _Origin) -> None:
    if config.sweep.search_alg not in SWEEP_ALGORITHMS:
        raise ConfigError(
            f"{origin.where('sweep.search_alg')}: 'sweep.search_alg' is {config.sweep.search_alg!r}"
            f"{_closest(config.sweep.search_alg, SWEEP_ALGORITHMS)}; choose one of {', '.join(SWEEP_ALGORITHMS)}; "
            f"{origin.fix('sweep.search_alg', 'grid')}"
        )
    if config.distributed.workers > config.ppo.episodes_per_update:
        raise ConfigError(
            f"{origin.where('distributed.workers')}: 'distributed.workers' is {config.distributed.workers} but only "
            f"ppo.episodes_per_update = {config.ppo.episodes_per_update} episodes run at once; lower the workers "
            f"or raise ppo.episodes_per_update; {origin.fix('distributed.workers', str(config.ppo.episodes_per_update))}"
        )
    if config.reward.metric not in REWARD_METRICS:
        raise ConfigError(
            f"{origin.where('reward.metric')}: 'reward.metric' is {config.reward.metric!r}"
            f"{_closest(config.reward.metric, REWARD_METRICS)}; choose one of {', '.join(REWARD_METRICS)}; "
            f"{origin.fix('reward.metric', 'top1')}"
        )
    detector = config.model.startswith("yolov7:")
    if detector and config.input_size is not None and config.input_size % 32:
        nearest = max(32, 32 * round(config.input_size / 32))
        raise ConfigError(
            f"{origin.where('input_size')}: 'input_size' is {config.input_size}; a YOLOv7 input side must be a "
            f"multiple of 32 pixels; {origin.fix('input_size', str(nearest))}"
        )
    native = config.model == "digits_cnn" or config.model.startswith("cifar_resnet")
    if native and config.input_size is not None:
        raise ConfigError(
            f"{origin.where('input_size')}: 'input_size' is {config.input_size}, but {config.model} reads its images "
            f"at their native size; remove input_size"
        )
    if config.model.startswith("pruned:"):
        raise ConfigError(
            f"{origin.where('model')}: 'model' is {config.model!r}, a model that is already pruned; search the "
            f"dense model with its checkpoint; {origin.fix('model', 'cifar_resnet56')}"
        )
    if detector != (config.reward.metric in DETECTION_METRICS):
        wanted = "a detection metric (map50, map50_95, fidelity_map50 or fidelity_map50_95)" if detector else "top1"
        raise ConfigError(
            f"{origin.where('reward.metric')}: 'reward.metric' is {config.reward.metric!r} but model "
            f"{config.model!r} is a {'detector' if detector else 'classifier'}, which needs {wanted}; "
            f"{origin.fix('reward.metric', 'fidelity_map50' if detector else 'top1')}"
        )
    if config.criterion not in CRITERIA:
        raise ConfigError(
            f"{origin.where('criterion')}: 'criterion' is {config.criterion!r}{_closest(config.criterion, CRITERIA)}; "
            f"choose one of {', '.join(CRITERIA)}; {origin.fix('criterion', 'l1')}"
        )

    for baseline in config.baselines:
        if baseline not in BASELINES:
            raise ConfigError(
                f"{origin.where('baselines')}: baseline {baseline!r} in 'baselines' is unknown"
                f"{_closest(baseline, BASELINES)}; choose from {', '.join(BASELINES)}; "
                f"{origin.fix('baselines', '[uniform]')}"
            )
    if len(set(config.baselines)) != len(config.baselines):
        raise ConfigError(
            f"{origin.where('baselines')}: 'baselines' is {config.baselines!r} and names a baseline twice; "
            f"list each at most once; {origin.fix('baselines', '[uniform]')}"
        )

    if config.criterion in DATA_CRITERIA and config.calibration_images < 1:
        raise ConfigError(
            f"{origin.where('calibration_images')}: 'calibration_images' is {config.calibration_images} but criterion "
            f"{config.criterion!r} scores channels on calibration images; "
            f"{origin.fix('calibration_images', '512')}"
        )


def _check_paths(config: SearchConfig, origin: _Origin) -> None:
    if config.checkpoint is not None and not Path(config.checkpoint).expanduser().is_file():
        raise ConfigError(
            f"{origin.where('checkpoint')}: checkpoint {config.checkpoint} not found{_resolved(config.checkpoint)}; "
            f"{origin.fix('checkpoint', 'PATH')}"
        )

    for key in ("data", "test_data"):
        value = getattr(config, key)
        if value is None:
            continue
        if value.startswith(BUILTIN_PREFIX):
            if value not in BUILTIN_DATASETS:
                raise ConfigError(
                    f"{origin.where(key)}: {key!r} is {value!r}, an unknown built-in data set; "
                    f"the built-in data sets are {', '.join(BUILTIN_DATASETS)}; {origin.fix(key, BUILTIN_DATASETS[0])}"
                )
        elif not Path(value).expanduser().exists():
            raise ConfigError(
                f"{origin.where(key)}: {key} {value} not found{_resolved(value)}; {origin.fix(key, 'PATH')}"
            )


# Helpers


def _field_types(schema: type) -> dict[str, Any]:
    return typing.get_type_hints(schema)


def _match_type(value: Any, hint: Any) -> tuple[bool, Any]:
    """Return whether ``value`` fits the type ``hint``, and the value converted to it (int to float)."""
    origin = typing.get_origin(hint)
    if origin in (types.UnionType, typing.Union):
        if value is None:
            return type(None) in typing.get_args(hint), None
        for option in typing.get_args(hint):
            if option is not type(None):
                matched, converted = _match_type(value, option)
                if matched:
                    return True, converted
        return False, value

    if origin is list:
        if not isinstance(value, list):
            return False, value
        (item_hint,) = typing.get_args(hint)
        items = [_match_type(item, item_hint) for item in value]
        return all(matched for matched, _ in items), [converted for _, converted in items]

    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is float:
        is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
        return is_number and math.isfinite(value), float(value) if is_number else value
    if hint is str:
        return isinstance(value, str), value
    raise TypeError(f"configuration field type {hint!r} has no check")


def _describe_type(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (types.UnionType, typing.Union):
        options = [_describe_type(option) for option in typing.get_args(hint) if option is not type(None)]
        return " or ".join(options) + " or null"
    if origin is list:
        (item_hint,) = typing.get_args(hint)
        return f"a list of {_PLURAL_NAMES[item_hint]}"
    return _TYPE_NAMES[hint]


_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}
_PLURAL_NAMES = {int: "integers", float: "numbers", str: "strings"}


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return {int: "an integer", float: "a number", str: "a string"}.get(type(value), type(value).__name__)


def _example(spec: Any) -> str:
    if spec.default is not MISSING:
        return "null" if spec.default is None else _one_line(yaml.safe_dump(spec.default).removesuffix("\n...\n"))
    if spec.default_factory is not MISSING:
        return _one_line(yaml.safe_dump(spec.default_factory(), default_flow_style=True)).replace(" ", "")
    return "VALUE"


def _all_keys() -> list[str]:
    keys: list[str] = []
    for name, hint in _field_types(SearchConfig).items():
        keys.append(name)
        if is_dataclass(hint):
            keys.extend(f"{name}.{child}" for child in _field_types(hint))
    return keys


def _suggestion(key: str) -> str:
    """Suggest the closest known key, from the same section first, because "ppo.x" is closer to "ppo" than to "ppo.n_epochs"."""
    section, dot, _ = key.rpartition(".")
    if dot:
        siblings = [known for known in _all_keys() if known.startswith(f"{section}.")]
        suggestion = _closest(key, siblings)
        if suggestion:
            return suggestion
    return _closest(key, _all_keys())


def _closest(word: str, choices: Sequence[str]) -> str:
    matches = difflib.get_close_matches(str(word), choices, n=1)
    return f" (did you mean {matches[0]!r}?)" if matches else ""


def _resolved(path: str) -> str:
    """Say where a relative path was looked for, because it depends on the working directory."""
    candidate = Path(path).expanduser()
    return "" if candidate.is_absolute() else f" (resolved to {candidate.absolute()})"


def _describe_value(value: Any) -> str:
    return "null" if value is None else f"{_show(value)} ({_type_name(value)})"


def _show(value: Any) -> str:
    """Write ``value`` as in the YAML file where Python and YAML differ (null, true, false)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


def _one_line(value: object) -> str:
    return " ".join(str(value).split())


def _flatten_into(flat: dict[str, Any], mapping: Mapping[str, Any], prefix: str) -> None:
    for key, value in mapping.items():
        if isinstance(value, Mapping):
            _flatten_into(flat, value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
