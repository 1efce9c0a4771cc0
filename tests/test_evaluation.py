from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from rl_pruner.data import build_image_folder, load_batches, resolve_image_folder, subset_indices
from rl_pruner.errors import DataError, InputError
from rl_pruner.evaluation import check_num_classes, evaluate_top1, measure_latency


class LogitsPassthrough(nn.Module):
    """Model whose inputs are its logits, so a test chooses every prediction."""

    def forward(self, x: Tensor) -> Tensor:
        return x


class ConstantClassifier(nn.Module):
    """Model that predicts ``label`` for every image."""

    def __init__(self, label: int, n_classes: int = 10) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(n_classes))
        with torch.no_grad():
            self.logits[label] = 1.0

    def forward(self, x: Tensor) -> Tensor:
        return self.logits.expand(len(x), -1)


def one_hot_logits(predictions: list[int], n_classes: int = 3) -> Tensor:
    return nn.functional.one_hot(torch.tensor(predictions), n_classes).float()


def test_top1_counts_each_image_once() -> None:
    # 2 of 3 right in the first batch and 0 of 1 in the second: 50 %, where the mean
    # of the per-batch accuracies would be 33.3 %.
    batches = [
        (one_hot_logits([0, 1, 2]), torch.tensor([0, 1, 0])),
        (one_hot_logits([1]), torch.tensor([2])),
    ]

    assert evaluate_top1(LogitsPassthrough(), batches, disable_progress=True) == 50.0


def test_top1_with_data_loader() -> None:
    dataset = TensorDataset(one_hot_logits([0, 1, 2, 2, 1]), torch.tensor([0, 1, 2, 0, 0]))
    loader = DataLoader(dataset, batch_size=2)

    assert evaluate_top1(LogitsPassthrough(), loader, disable_progress=True) == 60.0


def test_top1_restores_training_mode() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Dropout(p=0.5))
    model.train()
    batches = [(one_hot_logits([0, 1]), torch.tensor([0, 1]))]

    evaluate_top1(model, batches, disable_progress=True)

    assert model.training


def test_top1_runs_in_eval_mode() -> None:
    # Dropout with p=1 zeroes every logit in train mode, which would make argmax pick
    # class 0 for every image and score 50 % here.
    model = nn.Dropout(p=1.0)
    batches = [(one_hot_logits([1, 2]), torch.tensor([1, 2]))]

    assert evaluate_top1(model, batches, disable_progress=True) == 100.0


def test_top1_empty_batches_raise() -> None:
    with pytest.raises(DataError, match="no images"):
        evaluate_top1(LogitsPassthrough(), [], disable_progress=True)


def test_top1_rejects_non_classifier_output() -> None:
    batches = [(torch.zeros(2, 3, 4, 4), torch.tensor([0, 1]))]

    with pytest.raises(ValueError, match=r"\(2, 3, 4, 4\)"):
        evaluate_top1(LogitsPassthrough(), batches, disable_progress=True)


def test_top1_constant_model_on_cifar(cifar_test_archive: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    root = resolve_image_folder(cifar_test_archive, cache_dir=tmp_path_factory.getbasetemp() / "cifar-eval-cache")
    dataset = build_image_folder(root, image_size=None)
    indices = subset_indices(len(dataset), 200, seed=0)
    batches = load_batches(dataset, indices, batch_size=64, disable_progress=True)
    labels = torch.cat([labels for _, labels in batches])

    accuracy = evaluate_top1(ConstantClassifier(label=3), batches, disable_progress=True)

    assert accuracy == pytest.approx(100.0 * int((labels == 3).sum()) / 200)


def test_latency_returns_positive_numbers() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))

    stats = measure_latency(model, (3, 8, 8), batch_size=2, warmup=1, repeats=3)

    assert stats["median_ms"] > 0
    assert stats["mean_ms"] > 0
    assert stats["images_per_s"] == pytest.approx(2 * 1000.0 / stats["median_ms"])
    assert stats["num_threads"] == torch.get_num_threads()
    assert model.training


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"batch_size": 0, "warmup": 0, "repeats": 1}, "batch size"),
        ({"batch_size": 1, "warmup": -1, "repeats": 1}, "warm-up"),
        ({"batch_size": 1, "warmup": 0, "repeats": 0}, "repeats"),
    ],
)
def test_latency_rejects_invalid_options(options: dict[str, int], expected: str) -> None:
    with pytest.raises(InputError, match=expected):
        measure_latency(nn.Identity(), (3, 4, 4), **options)


def test_num_classes_mismatch_raises() -> None:
    classes = ["a", "b", "c", "d", "e", "f", "g"]

    with pytest.raises(DataError) as raised:
        check_num_classes(10, classes, "/data/pets")

    assert str(raised.value) == (
        "--data /data/pets has 7 classes but the model outputs 10; "
        "point --data at a data set with the model's 10 classes"
    )


def test_num_classes_match_passes() -> None:
    assert check_num_classes(3, ["a", "b", "c"], "/data/abc") is None
