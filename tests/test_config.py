"""Search configuration: the experiment files, YAML round trips, overrides and every rejected input."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from rl_pruner.config import (
    PPOConfig,
    SearchConfig,
    TrackingConfig,
    config_from_dict,
    config_to_dict,
    flatten_config,
    load_config,
    save_config,
)
from rl_pruner.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = REPO_ROOT / "experiments"
EXPERIMENT_FILES = sorted(EXPERIMENTS.glob("*.yaml"))

MINIMAL = "model: digits_cnn\ndata: builtin:digits\n"


def write_config(directory: Path, text: str, name: str = "search.yaml") -> Path:
    path = directory / name
    path.write_text(text)
    return path


def load_text(directory: Path, text: str, overrides: tuple[str, ...] = ()) -> SearchConfig:
    return load_config(write_config(directory, text), overrides)


# Experiment files


def test_experiment_files_present() -> None:
    names = {path.name for path in EXPERIMENT_FILES}
    assert {"demo.yaml", "resnet56-cifar10.yaml", "resnet50-imagenet.yaml"} <= names


@pytest.mark.parametrize("path", EXPERIMENT_FILES, ids=lambda path: path.name)
def test_experiment_header_says_how_to_run(path: Path) -> None:
    text = path.read_text()
    if "\nsweep:" in text:
        command = "sweep"
    elif "\npipeline:" in text:
        command = "pipeline"
    else:
        command = "search"
    assert text.startswith("#")
    assert f"rl-pruner {command} experiments/{path.name}" in text


def test_demo_experiment_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO_ROOT)
    config = load_config("experiments/demo.yaml")
    assert config.model == "digits_cnn"
    assert config.data == "builtin:digits"
    assert config.test_data == "builtin:digits"
    assert config.checkpoint is None
    assert config.episodes == 40
    assert config.ppo.episodes_per_update == 4
    assert (config.reward_images, config.bn_images, config.calibration_images) == (500, 300, 200)


def test_resnet56_experiment_loads(shared_data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO_ROOT)
    overrides: tuple[str, ...] = ()
    if not (REPO_ROOT.parent / "shared" / "data").is_dir():
        # The file's paths expect the reference data beside the checkout, so point them at shared_data.
        overrides = (
            f"checkpoint={shared_data / 'checkpoints' / 'cifar10-resnet56.th'}",
            f"data={shared_data / 'cifar10-jpeg' / 'train.tar.gz'}",
            f"test_data={shared_data / 'cifar10-jpeg' / 'test.tar.gz'}",
        )
    config = load_config("experiments/resnet56-cifar10.yaml", overrides)
    assert config.model == "cifar_resnet56"
    assert config.round_to == 1
    assert config.episodes == 400
    assert config.macs_target == 0.5


def test_resnet50_placeholder_paths_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO_ROOT)
    with pytest.raises(ConfigError, match=r"checkpoint /path/to/resnet50\.pth not found") as caught:
        load_config("experiments/resnet50-imagenet.yaml")
    assert "--set checkpoint=PATH" in str(caught.value)


def test_yolov7_tiny_experiment_loads(shared_data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO_ROOT)
    overrides: tuple[str, ...] = ()
    if not (REPO_ROOT.parent / "shared" / "data").is_dir():
        overrides = (f"model=yolov7:{shared_data / 'yolov7' / 'yolov7-tiny.yaml'}", f"data={shared_data / 'yolov7'}")
    config = load_config("experiments/yolov7-tiny-fidelity.yaml", overrides)
    assert config.model.startswith("yolov7:")
    assert config.reward.metric == "fidelity_map50"
    assert config.reward.conf_threshold == 0.0
    assert (config.reward_images, config.bn_images, config.input_size) == (2, 0, 320)


def test_yolov7_placeholder_paths_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO_ROOT)
    with pytest.raises(ConfigError, match=r"checkpoint /path/to/yolov7-weights\.pt not found"):
        load_config("experiments/yolov7-coco.yaml")


@pytest.mark.parametrize(("model", "metric", "expected"), [
    ("digits_cnn", "map50", "classifier"),
    ("yolov7:model.yaml", "top1", "detector"),
    ("digits_cnn", "accuracy", "choose one of top1"),
])
def test_reward_metric_must_fit_the_model(tmp_path: Path, model: str, metric: str, expected: str) -> None:
    text = f"model: {model}\ndata: builtin:digits\nreward:\n  metric: {metric}\n"
    with pytest.raises(ConfigError, match="reward.metric") as caught:
        load_text(tmp_path, text)
    assert expected in str(caught.value)


@pytest.mark.parametrize(("text", "expected"), [
    ("model: yolov7:model.yaml\ndata: builtin:digits\ninput_size: 100\nreward:\n  metric: map50\n",
     "multiple of 32 pixels; fix 'input_size'"),
    ("model: cifar_resnet20\ndata: builtin:digits\ninput_size: 64\n", "native size; remove input_size"),
    ("model: pruned:model.pt\ndata: builtin:digits\n", "already pruned"),
])
def test_input_size_and_model_checked(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_text(tmp_path, text)
    assert expected in str(caught.value)


# Round trips and flattening


def test_yaml_round_trip(tmp_path: Path) -> None:
    config = SearchConfig(
        model="digits_cnn",
        data="builtin:digits",
        macs_target=0.3,
        criterion="taylor",
        baselines=["uniform"],
        ppo=PPOConfig(learning_rate=1e-5, net_arch=[32]),
        tracking=TrackingConfig(run_name="round-trip"),
    )
    path = write_config(tmp_path, yaml.safe_dump(config_to_dict(config)))
    assert load_config(path) == config


def test_demo_round_trip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO_ROOT)
    config = load_config("experiments/demo.yaml")
    path = tmp_path / "saved" / "config.yaml"
    save_config(config, path)
    assert load_config(path) == config


def test_config_from_dict_defaults() -> None:
    config = config_from_dict({"model": "digits_cnn", "data": "builtin:digits"})
    assert config == SearchConfig(model="digits_cnn", data="builtin:digits")


def test_flatten_uses_dotted_keys() -> None:
    flat = flatten_config(SearchConfig(model="digits_cnn", data="builtin:digits"))
    assert flat["ppo.learning_rate"] == 3e-4
    assert flat["tracking.uri"] == "sqlite:///mlflow.db"
    assert flat["baselines"] == ["uniform", "global_l1", "global_lamp"]
    assert "ppo" not in flat
    assert not any(isinstance(value, dict) for value in flat.values())


# Accepted forms


def test_int_accepted_for_float(tmp_path: Path) -> None:
    config = load_text(tmp_path, MINIMAL + "ppo:\n  gamma: 1\n")
    assert config.ppo.gamma == 1.0
    assert isinstance(config.ppo.gamma, float)


@pytest.mark.parametrize("text", ["1e-3", "1.0e-3", "1E-3", "+1e-3"])
def test_scientific_notation_is_float(tmp_path: Path, text: str) -> None:
    config = load_text(tmp_path, MINIMAL + f"ppo:\n  learning_rate: {text}\n")
    assert config.ppo.learning_rate == pytest.approx(1e-3)


def test_relative_paths_use_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "images" / "cat").mkdir(parents=True)
    path = write_config(tmp_path, "model: resnet18\ndata: images\n")

    monkeypatch.chdir(tmp_path)
    assert load_config(path).data == "images"

    monkeypatch.chdir(REPO_ROOT)
    with pytest.raises(ConfigError, match=r"data images not found \(resolved to "):
        load_config(path)


# Overrides


def test_overrides_parse_types(tmp_path: Path) -> None:
    config = load_text(
        tmp_path,
        MINIMAL,
        (
            "episodes=10",
            "ppo.learning_rate=1e-3",
            "ppo.net_arch=[32, 32]",
            "tracking.uri=sqlite:///other.db",
            "tracking.run_name=null",
            "allow_block_drop=false",
        ),
    )
    assert config.episodes == 10
    assert isinstance(config.episodes, int)
    assert config.ppo.learning_rate == pytest.approx(1e-3)
    assert config.ppo.net_arch == [32, 32]
    assert config.tracking.uri == "sqlite:///other.db"
    assert config.tracking.run_name is None
    assert config.allow_block_drop is False


def test_override_creates_section(tmp_path: Path) -> None:
    config = load_text(tmp_path, MINIMAL, ("tracking.experiment=demo",))
    assert config.tracking.experiment == "demo"
    assert config.tracking.uri == "sqlite:///mlflow.db"


def test_later_override_wins(tmp_path: Path) -> None:
    assert load_text(tmp_path, MINIMAL, ("seed=1", "seed=2")).seed == 2


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("ppo.learnin_rate=1e-3", r"unknown key 'ppo\.learnin_rate' \(did you mean 'ppo\.learning_rate'\?\)"),
        ("episods=10", r"unknown key 'episods' \(did you mean 'episodes'\?\)"),
        ("episodes.n=1", r"'episodes' is a single value, not a section"),
        ("episodes", r"not of the form KEY=VALUE"),
        ("=10", r"not of the form KEY=VALUE"),
        ("episodes=ten", r"--set episodes=ten: 'episodes' is 'ten' \(a string\); expected an integer"),
        ("ppo.net_arch=[64,", r"--set ppo\.net_arch=\[64, is not valid YAML"),
    ],
    ids=["unknown-nested", "unknown-top", "into-value", "no-equals", "no-key", "wrong-type", "bad-yaml"],
)
def test_bad_override_rejected(tmp_path: Path, override: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected) as caught:
        load_text(tmp_path, MINIMAL, (override,))
    assert "\n" not in str(caught.value)


# Rejected configuration files: (YAML text, key the message names, further text it contains)

BAD_CONFIGS = {
    "unknown-key": (MINIMAL + "episods: 10\n", "'episods'", "did you mean 'episodes'?"),
    "unknown-nested-key": (MINIMAL + "ppo:\n  n_epoch: 3\n", "'ppo.n_epoch'", "did you mean 'ppo.n_epochs'?"),
    "top-level-ppo-key": (MINIMAL + "learning_rate: 0.001\n", "'learning_rate'", "did you mean 'ppo.learning_rate'?"),
    "string-for-int": (MINIMAL + "episodes: ten\n", "'episodes'", "expected an integer"),
    "quoted-yes-for-bool": (MINIMAL + 'allow_block_drop: "yes"\n', "'allow_block_drop'", "expected true or false"),
    "bool-for-int": (MINIMAL + "episodes: true\n", "'episodes'", "is true (a boolean)"),
    "null-for-required-type": (MINIMAL + "seed: null\n", "'seed'", "is null"),
    "string-in-int-list": (MINIMAL + "ppo:\n  net_arch: [64, wide]\n", "'ppo.net_arch'", "a list of integers"),
    "section-not-mapping": (MINIMAL + "ppo: 3\n", "'ppo'", "expected a mapping"),
    "missing-checkpoint": (MINIMAL + "checkpoint: missing/model.pth\n", "checkpoint", "missing/model.pth not found"),
    "macs-target-zero": (MINIMAL + "macs_target: 0\n", "'macs_target'", "fraction of dense MACs kept"),
    "macs-target-above-one": (MINIMAL + "macs_target: 1.5\n", "'macs_target'", "fraction of dense MACs kept"),
    "macs-target-nan": (MINIMAL + "macs_target: .nan\n", "'macs_target'", "a finite number"),
    "max-ratio-one": (MINIMAL + "max_ratio: 1.0\n", "'max_ratio'", "strictly between 0 and 1"),
    "round-to-zero": (MINIMAL + "round_to: 0\n", "'round_to'", ">= 1"),
    "episodes-zero": (MINIMAL + "episodes: 0\n", "'episodes'", ">= 1"),
    "batch-size-zero": (MINIMAL + "batch_size: 0\n", "'batch_size'", ">= 1"),
    "negative-count": (MINIMAL + "bn_images: -1\n", "'bn_images'", ">= 0"),
    "gamma-above-one": (MINIMAL + "ppo:\n  gamma: 1.5\n", "'ppo.gamma'", "[0, 1]"),
    "malformed-yaml-tab": (MINIMAL + "ppo:\n\tgamma: 0.9\n", "line 4", "spaces, not tabs"),
    "malformed-yaml-indent": (MINIMAL + "ppo:\n    gamma: 0.9\n  n_epochs: 3\n", "line 5", "not valid YAML"),
    "duplicate-key": (MINIMAL + "seed: 1\nseed: 2\n", "'seed'", "duplicate key"),
    "top-level-list": ("- model: digits_cnn\n- data: builtin:digits\n", "a list", "must be a mapping"),
    "empty-file": ("", "is empty", "model:"),
    "unknown-criterion": (MINIMAL + "criterion: l3\n", "'criterion'", "choose one of l1, l2"),
    "data-criterion-without-images": (MINIMAL + "criterion: apoz\ncalibration_images: 0\n", "'calibration_images'", "'apoz'"),
    "unknown-baseline": (MINIMAL + "baselines: [uniform, global_l3]\n", "'baselines'", "did you mean 'global_l1'?"),
    "duplicate-baseline": (MINIMAL + "baselines: [uniform, uniform]\n", "'baselines'", "twice"),
    "missing-model": ("data: builtin:digits\n", "'model'", "is missing"),
    "missing-data": ("model: digits_cnn\n", "'data'", "is missing"),
    "empty-model": ("model: ''\ndata: builtin:digits\n", "'model'", "must not be empty"),
    "missing-data-path": ("model: digits_cnn\ndata: missing/train\n", "data", "missing/train not found"),
    "missing-test-data-path": (MINIMAL + "test_data: missing/test.tar.gz\n", "test_data", "not found"),
    "unknown-builtin": ("model: digits_cnn\ndata: builtin:mnist\n", "'data'", "builtin:digits"),
}


@pytest.mark.parametrize(("text", "key", "detail"), BAD_CONFIGS.values(), ids=BAD_CONFIGS.keys())
def test_bad_config_rejected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str, key: str, detail: str) -> None:
    monkeypatch.chdir(tmp_path)
    path = write_config(tmp_path, text)

    with pytest.raises(ConfigError) as caught:
        load_config(path)

    message = str(caught.value)
    assert "\n" not in message
    assert str(path) in message
    assert key in message
    assert detail in message


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"config .*absent\.yaml not found"):
        load_config(tmp_path / "absent.yaml")


def test_config_from_dict_rejects_list() -> None:
    with pytest.raises(ConfigError, match="must be a mapping"):
        config_from_dict([1, 2])  # type: ignore[arg-type]


def test_fix_names_override_or_file(tmp_path: Path) -> None:
    path = write_config(tmp_path, MINIMAL + "episodes: 0\n")
    with pytest.raises(ConfigError, match=rf"fix 'episodes' in {path} or pass --set episodes=304"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"^--set episodes=-5: .*pass e\.g\. --set episodes=304$"):
        load_config(write_config(tmp_path, MINIMAL), ["episodes=-5"])
