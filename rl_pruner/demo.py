"""The built-in demo: scikit-learn's handwritten digits and a small ResNet-style CNN for them.

The digits are real data that scikit-learn ships, so the demo runs without a download:
1,797 grey-scale 8x8 images of the digits 0 to 9, about 180 per class, with pixel
values from 0 to 16. :func:`load_digits_splits` returns them as two data sets that
behave like torchvision's ImageFolder for this package (indexing gives ``(image,
label)``, and ``classes`` lists the class names). :class:`DigitsNet` is small enough
that :func:`train_digits_model` trains it on CPU in well under a minute, and it has
residual blocks with identity shortcuts, so a search can both prune channels and
drop blocks. The search configuration names this data set ``builtin:digits`` and the
model ``digits_cnn``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import TensorDataset
from tqdm import tqdm

from rl_pruner.config import BUILTIN_DATASETS
from rl_pruner.data import Normalization
from rl_pruner.errors import ConfigError, InputError

logger = logging.getLogger(__name__)

DIGITS_DATASET = "builtin:digits"
DIGITS_INPUT_SHAPE: tuple[int, int, int] = (1, 8, 8)
DIGITS_CLASSES = [str(digit) for digit in range(10)]
DIGITS_TEST_SIZE = 500
TRAIN_BATCH_SIZE = 128
TRAIN_LEARNING_RATE = 5e-3

# Mean and standard deviation of all 1,797 x 64 pixels after scaling 0..16 to [0, 1],
# computed once with scikit-learn 1.9.1 (0.30526 and 0.37605) and rounded.
DIGITS_NORMALIZATION = Normalization(mean=(0.3053,), std=(0.3760,))

DIGITS_SPLITS = ("train", "test")

# Settings of the demo search. experiments/demo.yaml contains the same values, and
# tests/test_demo.py checks that they stay equal. Reward, batch-norm and calibration
# images are disjoint subsets of the 1,297 training digits.
DEMO_SETTINGS: dict[str, Any] = {
    "model": "digits_cnn",
    "data": DIGITS_DATASET,
    "test_data": DIGITS_DATASET,
    "macs_target": 0.5,
    "criterion": "l1",
    "round_to": 8,
    "reward_images": 500,
    "bn_images": 300,
    "calibration_images": 200,
    "batch_size": 500,
    "episodes": 40,
    "seed": 0,
    "ppo": {"episodes_per_update": 4},
}


class DigitsDataset(TensorDataset):
    """Digit images of shape (1, 8, 8) with integer labels, indexed like an ImageFolder.

    ``classes[i]`` is the name of label ``i`` (``"0"`` to ``"9"``), and ``targets`` lists
    the label of every image in order.
    """

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        super().__init__(images, labels)
        self.classes: list[str] = list(DIGITS_CLASSES)
        self.targets: list[int] = [int(label) for label in labels]

    def __getitem__(self, index: int) -> tuple[Tensor, int]:  # type: ignore[override]
        image, label = super().__getitem__(index)
        return image, int(label)


def load_digits_splits(seed: int = 0) -> tuple[DigitsDataset, DigitsDataset]:
    """Load the digits as normalised tensors, split into 1,297 training and 500 test images.

    Pixels are scaled from 0..16 to [0, 1] and normalised with
    :data:`DIGITS_NORMALIZATION`. The split is stratified by class and depends only on
    ``seed``, so the test set has about 50 images of each digit.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    pixels = digits.images.astype(np.float32) / 16.0
    mean, std = DIGITS_NORMALIZATION.mean[0], DIGITS_NORMALIZATION.std[0]
    images = torch.from_numpy((pixels - mean) / std).unsqueeze(1)
    labels = torch.from_numpy(digits.target.astype(np.int64))

    train_index, test_index = train_test_split(
        np.arange(len(labels)), test_size=DIGITS_TEST_SIZE, stratify=digits.target, random_state=seed
    )
    train_index, test_index = np.sort(train_index), np.sort(test_index)
    train = DigitsDataset(images[train_index], labels[train_index])
    test = DigitsDataset(images[test_index], labels[test_index])
    return train, test


def load_builtin_dataset(name: str, split: str, seed: int = 0) -> DigitsDataset:
    """Return the ``split`` ("train" or "test") of the built-in data set ``name``.

    The only built-in data set is ``builtin:digits``. Raises ConfigError for an unknown
    name or split.
    """
    if name not in BUILTIN_DATASETS:
        raise ConfigError(
            f"built-in data set {name!r} is unknown; use one of {', '.join(BUILTIN_DATASETS)} "
            "or the path of an image folder or archive"
        )
    if split not in DIGITS_SPLITS:
        raise ConfigError(f"split {split!r} of {name} is unknown; use one of {', '.join(DIGITS_SPLITS)}")

    train, test = load_digits_splits(seed)
    return train if split == "train" else test


def demo_config(workdir: str | Path, checkpoint: str | Path) -> dict[str, Any]:
    """Return the demo search as a mapping for :func:`rl_pruner.config.config_from_dict`.

    The settings are those of ``experiments/demo.yaml``, with the weights from
    ``checkpoint`` (a state dict of :class:`DigitsNet`). Run outputs and the MLflow
    store (``workdir/mlflow.db``) go into ``workdir``.
    """
    workdir = Path(workdir).absolute()
    record = {key: dict(value) if isinstance(value, dict) else value for key, value in DEMO_SETTINGS.items()}
    record["checkpoint"] = str(checkpoint)
    record["output_dir"] = str(workdir)
    record["tracking"] = {"uri": f"sqlite:///{workdir / 'mlflow.db'}"}
    return record


class DigitsBlock(nn.Module):
    """Basic residual block: conv3x3-BN-ReLU-conv3x3-BN, plus the input, then ReLU.

    The shortcut is the identity, so the pruning engine may replace the whole block
    with ``nn.Identity`` (``rl_pruner_removable``).
    """

    rl_pruner_removable = True

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, kernel_size=3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + x)


class DigitsNet(nn.Module):
    """Small ResNet for 1x8x8 digit images: 3.85 M MACs and 0.13 M parameters.

    Layout: a 3x3 stem convolution to 32 channels, then two residual blocks at 32
    channels and 8x8 pixels. A stride-2 3x3 convolution goes to 64 channels, followed
    by one residual block at 64 channels and 4x4 pixels. Global average pooling feeds
    the classifier ``fc`` (64 to ``num_classes``). Every convolution is followed by
    batch norm and ReLU.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        self.layer1 = nn.Sequential(DigitsBlock(32), DigitsBlock(32))
        self.down = nn.Conv2d(32, 64, kernel_size=3, stride=2, padding=1, bias=False)
        self.down_bn = nn.BatchNorm2d(64)
        self.layer2 = nn.Sequential(DigitsBlock(64))
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer1(x)
        x = F.relu(self.down_bn(self.down(x)))
        x = self.layer2(x)
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(x)


def train_digits_model(
    epochs: int = 15,
    seed: int = 0,
    *,
    progress: bool = True,
) -> tuple[DigitsNet, float]:
    """Train :class:`DigitsNet` on the training split and measure it on the test split.

    Adam with a cosine learning-rate schedule and cross-entropy loss, in minibatches of
    128, on the split of :func:`load_digits_splits` with the same ``seed``.
    ``torch.manual_seed(seed)`` fixes the initial weights and a generator seeded with
    ``seed`` fixes the batch order, so one seed gives the same model on one machine and
    PyTorch build. Returns the model in eval mode and its test top-1 accuracy in
    percent. ``progress`` shows a tqdm bar over epochs.

    Training runs on one intra-op thread, and the previous thread count is restored
    afterwards. The layers are too small for more threads to help: on a shared, loaded
    2-core machine, 15 epochs took 7 to 9 s of CPU time on one thread and 31 to 40 s on two.
    With the defaults, seeds 0 to 4 reached 99.0 % to 100 % test top-1.
    """
    if epochs < 1:
        raise InputError(f"epochs is {epochs}; train the digits model for at least 1 epoch")

    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(epochs, seed, progress)
    finally:
        torch.set_num_threads(n_threads)


def _train(epochs: int, seed: int, progress: bool) -> tuple[DigitsNet, float]:
    train, test = load_digits_splits(seed)
    images, labels = train.tensors
    torch.manual_seed(seed)
    model = DigitsNet()
    optimizer = torch.optim.Adam(model.parameters(), lr=TRAIN_LEARNING_RATE)
    n_batches = -(-len(labels) // TRAIN_BATCH_SIZE)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * n_batches)
    generator = torch.Generator().manual_seed(seed)

    started = time.perf_counter()
    model.train()
    bar = tqdm(range(epochs), desc="training digits model", unit="epoch", disable=not progress)
    for _ in bar:
        order = torch.randperm(len(labels), generator=generator)
        for batch in order.split(TRAIN_BATCH_SIZE):
            loss = F.cross_entropy(model(images[batch]), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")

    model.eval()
    top1 = digits_top1(model, test)
    logger.info("trained the digits model in %.1f s: eval/top1 = %.2f %%", time.perf_counter() - started, top1)
    return model, top1


def digits_top1(model: nn.Module, dataset: DigitsDataset) -> float:
    """Top-1 accuracy in percent of ``model`` on every image of ``dataset``, in one batch."""
    images, labels = dataset.tensors
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        predictions = model(images).argmax(dim=1)
    model.train(was_training)
    return 100.0 * float((predictions == labels).float().mean())
