"""Training: distillation, resumable loop, batch-norm L1 penalty, magnitude and 2:4 masks, CLI handlers.

Every test runs on the CPU on scikit-learn's digits with :class:`DigitsNet` (3.85 M
MACs), whose training steps take milliseconds, so each test stays within seconds.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from rl_pruner.demo import DigitsDataset, DigitsNet, load_digits_splits
from rl_pruner.engine.pruner import Pruner
from rl_pruner.engine.serialization import pruned_model_record, save_pruned_model
from rl_pruner.errors import CheckpointError, DataError, InputError
from rl_pruner.models.registry import LoadedModel, default_normalization, load_model
from rl_pruner.training.cli import add_training_commands, run_training_command
from rl_pruner.training.distill import (
    DistillationSettings,
    check_pruned_student,
    check_student_structure,
    distill,
    distillation_loss,
)
from rl_pruner.training.loop import TrainingConfig, TrainingHooks, epoch_order, train
from rl_pruner.training.semistructured import (
    count_two_four_violations,
    eligible_layers,
    export_semi_structured,
    fine_tune_two_four,
    is_eligible,
    two_four_mask,
)
from rl_pruner.training.sparsity import (
    BNPenaltySchedule,
    CubicSparsitySchedule,
    add_bn_l1_subgradient,
    bn_scale_share_below,
    default_mask_layers,
    magnitude_mask,
    train_sparse,
)

BATCH_SIZE = 64
# Training images per test run: 10 optimizer steps per epoch.
N_TRAIN_IMAGES = 640


class NoisyDigits(Dataset):
    """Digits plus Gaussian noise drawn from the global torch generator, as a random augmentation draws."""

    def __init__(self, base: DigitsDataset) -> None:
        self.base = base
        self.classes = base.classes

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image, label = self.base[index]
        return image + 0.1 * torch.randn_like(image), label


class StopAtStep(TrainingHooks):
    """Interrupts training after optimizer step ``step`` (from 0) with Ctrl-C or with an error."""

    def __init__(self, step: int, how: str) -> None:
        self.step = step
        self.how = how

    def after_step(self, model: nn.Module, step: int) -> None:
        if step != self.step:
            return
        if self.how == "ctrl_c":
            signal.raise_signal(signal.SIGINT)
        else:
            raise RuntimeError("simulated crash")


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Run on one intra-op thread: the layers are too small for more to help, and a loaded machine slows two."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def digits() -> tuple[DigitsDataset, DigitsDataset]:
    """The first 640 training digits and all 500 test digits."""
    train, test = load_digits_splits(seed=0)
    images, labels = train.tensors
    return DigitsDataset(images[:N_TRAIN_IMAGES], labels[:N_TRAIN_IMAGES]), test


@pytest.fixture(scope="module")
def test_batches(digits: tuple[DigitsDataset, DigitsDataset]) -> list[tuple[Tensor, Tensor]]:
    return [digits[1].tensors]


@pytest.fixture(scope="module")
def teacher_and_student() -> tuple[LoadedModel, nn.Module]:
    """An untrained dense DigitsNet and a copy pruned uniformly to half its MACs."""
    torch.manual_seed(0)
    loaded = LoadedModel(
        architecture="digits_cnn", model=DigitsNet().eval(), input_shape=(1, 8, 8),
        normalization=default_normalization("digits_cnn"), num_classes=10,
    )
    pruner = Pruner(loaded)
    student = pruner.apply(pruner.uniform_policy(macs_target=0.5, round_to=1))
    return loaded, student


@pytest.fixture
def deterministic() -> Iterator[None]:
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


def _assert_same_state(expected: dict[str, Tensor], actual: dict[str, Tensor]) -> None:
    assert expected.keys() == actual.keys()
    different = [key for key in expected if not torch.equal(expected[key], actual[key])]
    assert different == []


# Distillation loss


@pytest.mark.parametrize(("temperature", "alpha"), [(4.0, 0.9), (1.0, 1.0), (2.0, 0.0), (0.5, 0.3)])
def test_distillation_loss_by_hand(temperature: float, alpha: float) -> None:
    student = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]], dtype=torch.float64)
    teacher = torch.tensor([[2.0, 1.0, 0.0], [0.5, 0.5, 2.5]], dtype=torch.float64)
    labels = torch.tensor([1, 2])

    expected = 0.0
    for row in range(2):
        teacher_probs = [math.exp(v / temperature) for v in teacher[row].tolist()]
        student_probs = [math.exp(v / temperature) for v in student[row].tolist()]
        teacher_probs = [p / sum(teacher_probs) for p in teacher_probs]
        student_probs = [p / sum(student_probs) for p in student_probs]
        kl = sum(p * math.log(p / q) for p, q in zip(teacher_probs, student_probs, strict=True))
        exp_logits = [math.exp(v) for v in student[row].tolist()]
        cross_entropy = -math.log(exp_logits[labels[row]] / sum(exp_logits))
        expected += (alpha * temperature**2 * kl + (1 - alpha) * cross_entropy) / 2

    loss = distillation_loss(student, teacher, labels, temperature=temperature, alpha=alpha)
    assert loss.item() == pytest.approx(expected, rel=1e-12)


def test_distillation_loss_zero_for_same_logits() -> None:
    logits = torch.randn(5, 10)
    loss = distillation_loss(logits, logits.clone(), torch.zeros(5, dtype=torch.long), temperature=3.0, alpha=1.0)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)


def test_distillation_loss_rejects_shape_mismatch() -> None:
    with pytest.raises(ValueError, match="same shape"):
        distillation_loss(torch.zeros(2, 10), torch.zeros(2, 5), torch.zeros(2, dtype=torch.long),
                          temperature=1.0, alpha=0.5)


# Resumable loop


# Epochs have 10 steps and the state is saved every 4 steps and at each epoch's end, so
# Ctrl-C after step 6 resumes from step 7, and a crash after step 14 from step 12.
@pytest.mark.parametrize(("how", "stop_step"), [("ctrl_c", 6), ("crash", 14)])
def test_resume_gives_identical_weights(
    tmp_path: Path,
    digits: tuple[DigitsDataset, DigitsDataset],
    test_batches: list[tuple[Tensor, Tensor]],
    teacher_and_student: tuple[LoadedModel, nn.Module],
    deterministic: None,
    how: str,
    stop_step: int,
) -> None:
    teacher, pruned = teacher_and_student
    data = NoisyDigits(digits[0])
    config = TrainingConfig(epochs=2, batch_size=BATCH_SIZE, learning_rate=0.05, checkpoint_every=4, seed=3)

    uninterrupted = copy.deepcopy(pruned)
    expected = distill(uninterrupted, teacher.model, data, config, test_batches=test_batches,
                       state_path=tmp_path / "uninterrupted.pt", progress=False)

    state = tmp_path / "interrupted.pt"
    raised = KeyboardInterrupt if how == "ctrl_c" else RuntimeError
    with pytest.raises(raised):
        distill(copy.deepcopy(pruned), teacher.model, data, config, hooks=StopAtStep(stop_step, how),
                test_batches=test_batches, state_path=state, progress=False)
    torch.manual_seed(12345)  # a new process starts with other generator states
    resumed_model = copy.deepcopy(pruned)
    resumed = distill(resumed_model, teacher.model, data, config, test_batches=test_batches,
                      state_path=state, resume=True, progress=False)

    _assert_same_state(uninterrupted.state_dict(), resumed_model.state_dict())
    _assert_same_state(expected.best_state_dict, resumed.best_state_dict)
    assert resumed.history == expected.history
    assert resumed.steps == expected.steps == 2 * (len(data) // BATCH_SIZE)


def test_ctrl_c_saves_state_at_stop_step(
    tmp_path: Path, digits: tuple[DigitsDataset, DigitsDataset], teacher_and_student: tuple[LoadedModel, nn.Module]
) -> None:
    teacher, pruned = teacher_and_student
    config = TrainingConfig(epochs=1, batch_size=BATCH_SIZE, checkpoint_every=100)
    state = tmp_path / "state.pt"
    # A shell that starts the tests in the background leaves SIGINT ignored, so the
    # handler to restore is whatever was there before, not always Python's default.
    handler_before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        distill(copy.deepcopy(pruned), teacher.model, digits[0], config, hooks=StopAtStep(4, "ctrl_c"),
                state_path=state, progress=False)
    saved = torch.load(state, weights_only=True)
    assert saved["step"] == 5
    assert saved["step_in_epoch"] == 5
    assert torch.equal(saved["order"], epoch_order(len(digits[0]), config.seed, 0))
    assert signal.getsignal(signal.SIGINT) is handler_before


class CtrlCInEvaluation(TrainingHooks):
    """Presses Ctrl-C while the metrics of every epoch are computed."""

    def epoch_metrics(self, model: nn.Module) -> dict[str, float]:
        signal.raise_signal(signal.SIGINT)
        return {}


def test_ctrl_c_in_evaluation_stops_before_next_epoch(
    tmp_path: Path, digits: tuple[DigitsDataset, DigitsDataset]
) -> None:
    torch.manual_seed(0)
    config = TrainingConfig(epochs=2, batch_size=BATCH_SIZE)
    state = tmp_path / "state.pt"
    with pytest.raises(KeyboardInterrupt):
        train(DigitsNet(), digits[0], config, hooks=CtrlCInEvaluation(), state_path=state, progress=False)
    saved = torch.load(state, weights_only=True)
    assert saved["step"] == len(digits[0]) // BATCH_SIZE
    assert saved["epoch"] == 1

    # In the last epoch the run is complete, so it ends normally.
    last = train(DigitsNet(), digits[0], TrainingConfig(epochs=1, batch_size=BATCH_SIZE),
                 hooks=CtrlCInEvaluation(), progress=False)
    assert last.steps == len(digits[0]) // BATCH_SIZE


def test_best_epoch_kept(
    digits: tuple[DigitsDataset, DigitsDataset], test_batches: list[tuple[Tensor, Tensor]]
) -> None:
    torch.manual_seed(0)
    model = DigitsNet()
    result = train(model, digits[0], TrainingConfig(epochs=3, batch_size=BATCH_SIZE, learning_rate=0.05),
                   test_batches=test_batches, progress=False)
    top1 = [entry["eval/top1"] for entry in result.history]
    assert result.best_top1 == max(top1)
    assert result.best_epoch == top1.index(max(top1)) + 1
    assert [entry["epoch"] for entry in result.history] == [1.0, 2.0, 3.0]
    assert result.history[-1]["train/lr"] == pytest.approx(0.0, abs=1e-12)


def test_metrics_and_model_logged_to_mlflow(
    tmp_path: Path, digits: tuple[DigitsDataset, DigitsDataset], test_batches: list[tuple[Tensor, Tensor]],
    teacher_and_student: tuple[LoadedModel, nn.Module],
) -> None:
    from rl_pruner.tracking import SearchTracker

    teacher, pruned = teacher_and_student
    config = TrainingConfig(epochs=2, batch_size=BATCH_SIZE)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with SearchTracker(uri, "training-test") as tracker:
        distill(copy.deepcopy(pruned), teacher.model, digits[0], config, test_batches=test_batches,
                tracker=tracker, export_model=lambda model, path: torch.save(model.state_dict(), path),
                progress=False)
    client = tracker.client
    run = client.get_run(tracker.run_id)
    for name in ("train/loss", "train/lr", "eval/top1"):
        history = client.get_metric_history(tracker.run_id, name)
        assert [metric.step for metric in history] == [1, 2]
    assert run.data.params["distillation.temperature"] == "4.0"
    assert run.data.params["epochs"] == "2"
    artifacts = {item.path for item in client.list_artifacts(tracker.run_id, "model")}
    assert artifacts == {"model/final.pt", "model/best.pt"}


# Bad input


@pytest.mark.parametrize(("settings", "message"), [
    ({"epochs": 0}, "epochs is 0; train for at least 1 epoch"),
    ({"epochs": 1, "batch_size": 0}, "batch size is 0"),
    ({"epochs": 1, "learning_rate": -0.1}, "learning rate is -0.1"),
    ({"epochs": 1, "momentum": 1.0}, r"momentum is 1.0; it must be in \[0, 1\)"),
    ({"epochs": 1, "precision": "float16"}, "precision is 'float16'; use one of auto, float32, bfloat16"),
    ({"epochs": 1, "checkpoint_every": 0}, "checkpoint interval is 0"),
])
def test_training_config_rejects(settings: dict, message: str) -> None:
    with pytest.raises(InputError, match=message):
        TrainingConfig(**settings)


@pytest.mark.parametrize(("settings", "message"), [
    ({"temperature": 0.0}, "temperature is 0.0"),
    ({"alpha": 1.5}, r"alpha is 1.5; it must be in \[0, 1\]"),
])
def test_distillation_settings_reject(settings: dict, message: str) -> None:
    with pytest.raises(InputError, match=message):
        DistillationSettings(**settings)


def test_student_wider_than_teacher_rejected(teacher_and_student: tuple[LoadedModel, nn.Module]) -> None:
    teacher, pruned = teacher_and_student
    with pytest.raises(InputError, match=r"not a pruned form of the teacher: .*more than the teacher's"):
        check_student_structure(teacher.model, pruned)


def test_student_of_other_architecture_rejected(teacher_and_student: tuple[LoadedModel, nn.Module]) -> None:
    teacher, _ = teacher_and_student
    other = load_model("cifar_resnet20")
    with pytest.raises(InputError, match="the model itself is a CifarResNet in the student but a DigitsNet"):
        check_student_structure(other.model, teacher.model)
    with pytest.raises(InputError, match="pruned from 'cifar_resnet20' but the teacher is 'digits_cnn'"):
        check_pruned_student(other, teacher)


def test_student_with_other_kernel_rejected(teacher_and_student: tuple[LoadedModel, nn.Module]) -> None:
    teacher, pruned = teacher_and_student
    student = copy.deepcopy(pruned)
    student.conv1 = nn.Conv2d(1, student.conv1.out_channels, kernel_size=5, padding=2, bias=False)
    with pytest.raises(InputError, match="conv1 has kernel_size=.5, 5., the teacher .3, 3."):
        check_student_structure(student, teacher.model)


def test_pruned_teacher_rejected(teacher_and_student: tuple[LoadedModel, nn.Module]) -> None:
    teacher, pruned = teacher_and_student
    pruned_teacher = LoadedModel(**{**teacher.__dict__, "model": pruned, "pruned": {"architecture": "digits_cnn"}})
    with pytest.raises(InputError, match="the teacher is a pruned model"):
        check_pruned_student(teacher, pruned_teacher)


def test_dropped_block_accepted(teacher_and_student: tuple[LoadedModel, nn.Module]) -> None:
    teacher, pruned = teacher_and_student
    student = copy.deepcopy(pruned)
    student.layer1[1] = nn.Identity()
    check_student_structure(student, teacher.model)


def test_data_with_other_classes_rejected(
    digits: tuple[DigitsDataset, DigitsDataset], teacher_and_student: tuple[LoadedModel, nn.Module]
) -> None:
    teacher, pruned = teacher_and_student
    three_classes = copy.copy(digits[0])
    three_classes.classes = ["0", "1", "2"]
    with pytest.raises(DataError, match="has 3 classes but the model outputs 10"):
        distill(copy.deepcopy(pruned), teacher.model, three_classes, TrainingConfig(epochs=1), progress=False)


def test_fewer_images_than_a_batch_rejected(
    digits: tuple[DigitsDataset, DigitsDataset], teacher_and_student: tuple[LoadedModel, nn.Module]
) -> None:
    teacher, pruned = teacher_and_student
    with pytest.raises(InputError, match="640 images, fewer than one batch of 5000"):
        distill(copy.deepcopy(pruned), teacher.model, digits[0], TrainingConfig(epochs=1, batch_size=5000),
                progress=False)


def test_existing_state_not_overwritten(
    tmp_path: Path, digits: tuple[DigitsDataset, DigitsDataset], teacher_and_student: tuple[LoadedModel, nn.Module]
) -> None:
    teacher, pruned = teacher_and_student
    state = tmp_path / "state.pt"
    state.write_bytes(b"earlier run")
    with pytest.raises(InputError, match="state.pt already exists; resume that run"):
        distill(copy.deepcopy(pruned), teacher.model, digits[0], TrainingConfig(epochs=1), state_path=state,
                progress=False)
    assert state.read_bytes() == b"earlier run"


def test_resume_rejects_changed_settings(
    tmp_path: Path, digits: tuple[DigitsDataset, DigitsDataset], teacher_and_student: tuple[LoadedModel, nn.Module]
) -> None:
    teacher, pruned = teacher_and_student
    state = tmp_path / "state.pt"
    config = TrainingConfig(epochs=1, batch_size=BATCH_SIZE)
    distill(copy.deepcopy(pruned), teacher.model, digits[0], config, state_path=state, progress=False)
    with pytest.raises(InputError, match=r"other settings \(distillation.alpha 0.9 -> 0.5\)"):
        distill(copy.deepcopy(pruned), teacher.model, digits[0], config, DistillationSettings(alpha=0.5),
                state_path=state, resume=True, progress=False)


def test_resume_rejects_missing_or_corrupt_state(
    tmp_path: Path, digits: tuple[DigitsDataset, DigitsDataset], teacher_and_student: tuple[LoadedModel, nn.Module]
) -> None:
    teacher, pruned = teacher_and_student
    config = TrainingConfig(epochs=1, batch_size=BATCH_SIZE)
    with pytest.raises(InputError, match="missing.pt not found; start a new run"):
        distill(copy.deepcopy(pruned), teacher.model, digits[0], config, state_path=tmp_path / "missing.pt",
                resume=True, progress=False)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        distill(copy.deepcopy(pruned), teacher.model, digits[0], config, state_path=corrupt, resume=True,
                progress=False)


# Batch-norm L1 penalty and magnitude masks


def test_bn_l1_subgradient_matches_autograd() -> None:
    torch.manual_seed(0)
    model = DigitsNet()
    norms = [module for module in model.modules() if isinstance(module, nn.BatchNorm2d)]
    for norm in norms:
        nn.init.uniform_(norm.weight, -1.0, 1.0)
    strength = 0.3
    penalty = strength * sum(norm.weight.abs().sum() for norm in norms)
    expected = torch.autograd.grad(penalty, [norm.weight for norm in norms])

    add_bn_l1_subgradient(model, strength)
    for norm, gradient in zip(norms, expected, strict=True):
        assert torch.allclose(norm.weight.grad, gradient)


def test_bn_penalty_grows_small_scale_share(digits: tuple[DigitsDataset, DigitsDataset]) -> None:
    shares = {}
    for strength in (0.0, 0.2):
        torch.manual_seed(0)
        model = DigitsNet()
        generator = torch.Generator().manual_seed(1)
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                with torch.no_grad():
                    module.weight.uniform_(0.0, 0.2, generator=generator)
        shares[f"before {strength}"] = bn_scale_share_below(model)
        train_sparse(model, digits[0], TrainingConfig(epochs=2, batch_size=BATCH_SIZE, learning_rate=0.05),
                     bn_penalty=BNPenaltySchedule(strength), progress=False)
        shares[strength] = bn_scale_share_below(model)
    assert shares["before 0.0"] == shares["before 0.2"] < 0.1
    assert shares[0.2] > 0.4
    assert shares[0.2] > shares[0.0] + 0.3


def test_bn_penalty_warmup_schedule() -> None:
    schedule = BNPenaltySchedule(1e-3, kind="linear_warmup", warmup_steps=10)
    assert [schedule.strength_at(step) for step in (0, 5, 10, 50)] == pytest.approx([0.0, 5e-4, 1e-3, 1e-3])
    assert BNPenaltySchedule(1e-3).strength_at(0) == 1e-3
    with pytest.raises(InputError, match="a linear warm-up needs at least 1 step"):
        BNPenaltySchedule(1e-3, kind="linear_warmup")
    with pytest.raises(InputError, match="use one of constant, linear_warmup"):
        BNPenaltySchedule(1e-3, kind="cosine")


def test_cubic_sparsity_schedule() -> None:
    schedule = CubicSparsitySchedule(final_sparsity=0.8, begin_step=10, end_step=20, update_every=5)
    assert schedule.sparsity_at(0) == 0.0
    assert schedule.sparsity_at(15) == pytest.approx(0.8 - 0.8 * 0.5**3)
    assert schedule.sparsity_at(20) == pytest.approx(0.8)
    assert schedule.sparsity_at(99) == pytest.approx(0.8)
    assert [step for step in range(30) if schedule.updates_at(step)] == [10, 15, 20]


def test_magnitude_mask_zeroes_smallest() -> None:
    weight = torch.tensor([[0.5, -0.1, 0.3], [-0.9, 0.05, 0.2]])
    mask = magnitude_mask(weight, 0.5)
    assert mask.tolist() == [[True, False, True], [True, False, False]]


def test_magnitude_masks_reach_target_sparsity(digits: tuple[DigitsDataset, DigitsDataset]) -> None:
    torch.manual_seed(0)
    model = DigitsNet()
    config = TrainingConfig(epochs=1, batch_size=BATCH_SIZE, learning_rate=0.02)
    steps = len(digits[0]) // BATCH_SIZE
    schedule = CubicSparsitySchedule(final_sparsity=0.6, begin_step=0, end_step=steps - 4, update_every=4)
    result = train_sparse(model, digits[0], config, magnitude=schedule, progress=False)

    modules = dict(model.named_modules())
    for name in default_mask_layers(model):
        weight = modules[name].weight
        assert float((weight == 0).float().mean()) == pytest.approx(0.6, abs=1 / weight.numel())
        assert torch.equal(result.best_state_dict[f"{name}.weight"], weight.detach())
    assert not any("parametrizations" in key for key in model.state_dict())
    assert result.history[-1]["sparsity/weight_sparsity"] == pytest.approx(0.6, abs=1e-3)


# 2:4 masks


@pytest.mark.parametrize(("module", "eligible"), [
    (nn.Linear(8, 3), True),
    (nn.Linear(6, 3), False),
    (nn.Conv2d(3, 8, 3), False),
    (nn.Conv2d(4, 8, 3), True),
    (nn.Conv2d(6, 8, 1), False),
    (nn.Conv2d(8, 8, 1, groups=2), True),
    (nn.BatchNorm2d(8), False),
])
def test_two_four_eligibility(module: nn.Module, eligible: bool) -> None:
    assert is_eligible(module) is eligible


@pytest.mark.parametrize("shape", [(6, 16), (5, 4, 3, 3), (2, 8, 1, 1)])
def test_two_four_mask_keeps_two_largest(shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    weight = torch.randn(shape)
    mask = two_four_mask(weight)
    groups = weight.reshape(-1, 4).abs()
    kept = mask.reshape(-1, 4)
    assert (kept.sum(dim=1) == 2).all()
    assert (groups[kept].reshape(-1, 2).min(dim=1).values >= groups[~kept].reshape(-1, 2).max(dim=1).values).all()


def test_two_four_mask_rejects_bad_rows() -> None:
    with pytest.raises(ValueError, match="rows of length 27"):
        two_four_mask(torch.randn(4, 3, 3, 3))


def test_two_four_fine_tuning_keeps_pattern(
    digits: tuple[DigitsDataset, DigitsDataset], test_batches: list[tuple[Tensor, Tensor]]
) -> None:
    torch.manual_seed(0)
    model = DigitsNet()
    teacher = copy.deepcopy(model)
    layers = eligible_layers(model)
    assert "conv1" not in layers
    assert "fc" in layers
    result = fine_tune_two_four(model, digits[0], TrainingConfig(epochs=1, batch_size=BATCH_SIZE),
                                teacher=teacher, test_batches=test_batches, progress=False)

    modules = dict(model.named_modules())
    for name in layers:
        groups = modules[name].weight.detach().reshape(-1, 4)
        assert ((groups != 0).sum(dim=1) == 2).all(), name
        assert count_two_four_violations(result.best_state_dict[f"{name}.weight"]) == 0
    assert (modules["conv1"].weight != 0).all()


@pytest.mark.parametrize("method", ["two_four", "magnitude"])
def test_masked_training_rejection_keeps_weights(method: str, digits: tuple[DigitsDataset, DigitsDataset]) -> None:
    torch.manual_seed(0)
    model = DigitsNet()
    before = copy.deepcopy(model.state_dict())
    three_classes = copy.copy(digits[0])
    three_classes.classes = ["0", "1", "2"]
    config = TrainingConfig(epochs=1, batch_size=BATCH_SIZE)

    with pytest.raises(DataError, match="has 3 classes"):
        if method == "two_four":
            fine_tune_two_four(model, three_classes, config, progress=False)
        else:
            schedule = CubicSparsitySchedule(final_sparsity=0.6, initial_sparsity=0.3, begin_step=0, end_step=8)
            train_sparse(model, three_classes, config, magnitude=schedule, progress=False)

    after = model.state_dict()
    assert set(after) == set(before)
    for name, value in before.items():
        assert torch.equal(after[name], value), name


def test_masked_training_logs_plain_models(tmp_path: Path, digits: tuple[DigitsDataset, DigitsDataset]) -> None:
    from rl_pruner.tracking import SearchTracker

    torch.manual_seed(0)
    model = DigitsNet()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with SearchTracker(uri, "training-test") as tracker:
        fine_tune_two_four(model, digits[0], TrainingConfig(epochs=1, batch_size=BATCH_SIZE), tracker=tracker,
                           export_model=lambda model, path: torch.save(model.state_dict(), path), progress=False)

    local = Path(tracker.client.download_artifacts(tracker.run_id, "model", str(tmp_path)))
    for name in ("final.pt", "best.pt"):
        state = torch.load(local / name, weights_only=True)
        assert set(state) == set(model.state_dict()), name
        for layer in eligible_layers(DigitsNet()):
            assert count_two_four_violations(state[f"{layer}.weight"]) == 0, (name, layer)


def test_two_four_rejects_ineligible_layer(digits: tuple[DigitsDataset, DigitsDataset]) -> None:
    with pytest.raises(InputError, match=r"layers \['conv1'\] cannot take a 2:4 mask"):
        fine_tune_two_four(DigitsNet(), digits[0], TrainingConfig(epochs=1), layers=["conv1"], progress=False)


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0),
                    reason="a GPU that runs 2:4 kernels exports instead")
def test_export_without_gpu_returns_dense_model() -> None:
    model = DigitsNet()
    export = export_semi_structured(model)
    assert export.model is model
    assert export.exported_layers == []
    assert export.reason is not None


# CLI handlers


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="rl-pruner")
    add_training_commands(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(list(argv))


def test_finetune_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], teacher_and_student: tuple[LoadedModel, nn.Module]
) -> None:
    teacher, pruned = teacher_and_student
    teacher_path = tmp_path / "teacher.pt"
    torch.save(teacher.model.state_dict(), teacher_path)
    pruned_path = tmp_path / "pruned.pt"
    save_pruned_model(pruned_path, pruned_model_record(
        pruned, architecture="digits_cnn", input_shape=(1, 8, 8), num_classes=10,
        normalization=teacher.normalization, dropped_blocks=[], policy={},
    ))
    out = tmp_path / "finetuned.pt"
    args = _parse("finetune", "--model", f"pruned:{pruned_path}", "--teacher", str(teacher_path),
                  "--data", "builtin:digits", "--test-data", "builtin:digits", "--epochs", "1",
                  "--limit", str(N_TRAIN_IMAGES), "--batch-size", str(BATCH_SIZE), "--device", "cpu", "--out", str(out), "--json")

    assert run_training_command(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == N_TRAIN_IMAGES // BATCH_SIZE
    assert summary["best_epoch"] == 1
    reloaded = load_model(f"pruned:{out}")
    check_student_structure(reloaded.model, teacher.model)
    assert Path(summary["state"]).is_file()

    assert run_training_command(args) == 2
    assert "already exists; pass --force" in capsys.readouterr().err
    args.force = True
    assert run_training_command(args) == 0
    assert json.loads(capsys.readouterr().out)["steps"] == summary["steps"]


def test_finetune_command_rejects_zero_epochs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = _parse("finetune", "--model", "pruned:missing.pt", "--teacher", "t.pt", "--data", "builtin:digits",
                  "--epochs", "0", "--out", str(tmp_path / "out.pt"))
    assert run_training_command(args) == 2
    assert capsys.readouterr().err == "rl-pruner: error: epochs is 0; train for at least 1 epoch\n"


def test_finetune_command_rejects_dense_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = _parse("finetune", "--model", "digits_cnn", "--teacher", "t.pt", "--data", "builtin:digits",
                  "--epochs", "1", "--out", str(tmp_path / "out.pt"))
    assert run_training_command(args) == 2
    assert "finetune needs a pruned model as pruned:PATH" in capsys.readouterr().err


def test_sparsify_command_rejects_other_image_shape(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], cifar_test_archive: Path
) -> None:
    checkpoint = tmp_path / "dense.pt"
    torch.save(DigitsNet().state_dict(), checkpoint)
    args = _parse("sparsify", "--model", "digits_cnn", "--checkpoint", str(checkpoint),
                  "--data", str(cifar_test_archive), "--epochs", "1", "--out", str(tmp_path / "out.pt"))
    assert run_training_command(args) == 2
    assert "has images of shape (3, 32, 32) (channels, height, width), but the model takes (1, 8, 8)" in (
        capsys.readouterr().err
    )


def test_sparsify_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    checkpoint = tmp_path / "dense.pt"
    torch.save(DigitsNet().state_dict(), checkpoint)
    out = tmp_path / "sparse.pt"
    args = _parse("sparsify", "--model", "digits_cnn", "--checkpoint", str(checkpoint), "--data", "builtin:digits",
                  "--epochs", "1", "--limit", str(N_TRAIN_IMAGES), "--batch-size", str(BATCH_SIZE), "--bn-l1", "0.01", "--target-sparsity", "0.5",
                  "--mask-update-every", "5", "--device", "cpu", "--out", str(out), "--json")

    assert run_training_command(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["bn_small_share_after"] >= summary["bn_small_share_before"]
    sparse = load_model("digits_cnn", out)
    assert float((sparse.model.layer1[0].conv1.weight == 0).float().mean()) == pytest.approx(0.5, abs=1e-3)


def test_sparsify_command_refuses_existing_out(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sparse.pt"
    out.write_bytes(b"kept")
    args = _parse("sparsify", "--model", "digits_cnn", "--checkpoint", "c.pt", "--data", "builtin:digits",
                  "--epochs", "1", "--out", str(out))
    assert run_training_command(args) == 2
    assert "already exists; pass --force" in capsys.readouterr().err
    assert out.read_bytes() == b"kept"
