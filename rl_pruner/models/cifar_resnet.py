"""CIFAR ResNets (He et al. 2016, "option A" shortcuts) laid out key for key like the
published CIFAR-10 checkpoints: ``conv1``/``bn1`` stem, stages ``layer1``..``layer3``
of basic blocks with ``conv1``/``bn1``/``conv2``/``bn2``, and a ``linear`` classifier.

Depth = 6n + 2 with n basic blocks per stage: 20, 32, 44, 56 and 110 are supported.

Where a stage starts, the shortcut has no parameters: it takes every second pixel and
places the input channels into a wider, zero-filled tensor (half of the added channels
before them, half after). :class:`ZeroPadShortcut` stores that placement as two index
vectors, ``source_index`` (input channels that are copied) and ``target_index`` (the
output channels they land in). Channel pruning edits these vectors instead of assuming
a fixed offset, so the input side (the previous stage's residual channels) and the
output side (this stage's residual channels) can be pruned independently: a removed
input channel stops being copied, and a removed output channel drops its source too.
This is what keeps the shortcut consistent at every depth and pruning ratio.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

CIFAR_DEPTHS = (20, 32, 44, 56, 110)


class ZeroPadShortcut(nn.Module):
    """Parameter-free shortcut that subsamples by ``stride`` and zero-pads channels."""

    source_index: torch.Tensor
    target_index: torch.Tensor

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        if out_channels < in_channels:
            raise ValueError(f"out_channels ({out_channels}) must be >= in_channels ({in_channels})")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.stride = stride
        offset = (out_channels - in_channels) // 2
        # Non-persistent: the published checkpoints carry no tensors for the shortcut.
        # Pruned models store both vectors in their structure record instead.
        self.register_buffer("source_index", torch.arange(in_channels), persistent=False)
        self.register_buffer("target_index", torch.arange(in_channels) + offset, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        out = x.new_zeros(x.shape[0], self.out_channels, x.shape[2], x.shape[3])
        return out.index_copy(1, self.target_index, x.index_select(1, self.source_index))

    def structure(self) -> dict[str, Any]:
        """Return the channel placement as plain values, for saving a pruned model."""
        return {
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "stride": self.stride,
            "source_index": self.source_index.tolist(),
            "target_index": self.target_index.tolist(),
        }

    def load_structure(self, record: dict[str, Any]) -> None:
        """Restore a channel placement written by :meth:`structure`."""
        self.in_channels = int(record["in_channels"])
        self.out_channels = int(record["out_channels"])
        self.stride = int(record["stride"])
        self.source_index = torch.tensor(record["source_index"], dtype=torch.long)
        self.target_index = torch.tensor(record["target_index"], dtype=torch.long)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, stride={self.stride}"


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus the shortcut, then ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module
        if stride != 1 or in_planes != planes:
            self.shortcut = ZeroPadShortcut(in_planes, planes, stride)
        else:
            self.shortcut = nn.Identity()

    @property
    def has_identity_shortcut(self) -> bool:
        """True when input and output shapes match, so the block can be dropped."""
        return isinstance(self.shortcut, nn.Identity)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet for 32x32 inputs with 16, 32 and 64 channels in its three stages."""

    def __init__(self, depth: int, num_classes: int = 10) -> None:
        super().__init__()
        if depth not in CIFAR_DEPTHS:
            raise ValueError(f"CIFAR ResNet depth must be one of {CIFAR_DEPTHS}, got {depth}")
        n_blocks = (depth - 2) // 6
        self.depth = depth
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._make_stage(16, 16, n_blocks, stride=1)
        self.layer2 = self._make_stage(16, 32, n_blocks, stride=2)
        self.layer3 = self._make_stage(32, 64, n_blocks, stride=2)
        self.linear = nn.Linear(64, num_classes)
        self._init_weights()

    @staticmethod
    def _make_stage(in_planes: int, planes: int, n_blocks: int, stride: int) -> nn.Sequential:
        blocks = [BasicBlock(in_planes, planes, stride)]
        blocks += [BasicBlock(planes, planes, 1) for _ in range(n_blocks - 1)]
        return nn.Sequential(*blocks)

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


def cifar_resnet(depth: int, num_classes: int = 10) -> CifarResNet:
    """Build a CIFAR ResNet of the given depth (one of 20, 32, 44, 56, 110)."""
    return CifarResNet(depth, num_classes)
