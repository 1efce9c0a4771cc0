"""Building blocks of YOLOv7 and YOLOv7-tiny, named like the official release.

Attribute names follow the official ``models/common.py`` and ``models/yolo.py`` of
YOLOv7 (``conv``/``bn``/``act`` in :class:`Conv`, ``rbr_dense``/``rbr_1x1``/
``rbr_identity`` in :class:`RepConv`, ``m``/``ia``/``im``/``anchors``/``anchor_grid``
in :class:`IDetect`), so an official state_dict loads key for key.

Every batch norm uses eps 1e-3 and momentum 0.03. The official code sets these values
on all its batch norms after building a model, so trained checkpoints depend on them.

Fusion (``fuse()`` on :class:`Conv`, :class:`RepConv` and :class:`IDetect`) folds
batch norms, parallel branches and implicit layers into single convolutions. It uses
the running statistics, so a fused module matches the unfused one in eval mode only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from rl_pruner.models.yolov7.config import ActivationSpec

BATCHNORM_EPS = 1e-3
BATCHNORM_MOMENTUM = 0.03


def batch_norm(channels: int) -> nn.BatchNorm2d:
    """Return a batch norm with the official YOLOv7 eps and momentum."""
    return nn.BatchNorm2d(channels, eps=BATCHNORM_EPS, momentum=BATCHNORM_MOMENTUM)


def same_padding(kernel_size: int, padding: int | None) -> int:
    """Return ``padding`` if given, else the padding that keeps the size at stride 1 (odd kernels)."""
    return kernel_size // 2 if padding is None else padding


def make_activation(act: bool | nn.Module | ActivationSpec) -> nn.Module:
    """Return SiLU for True, identity for False, else the given activation."""
    if isinstance(act, ActivationSpec):
        return act.build()
    if isinstance(act, nn.Module):
        return act
    return nn.SiLU() if act else nn.Identity()


def _fused_conv(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """Return a copy of ``conv`` with ``bn`` (running statistics) folded into its weight and bias."""
    fused = nn.Conv2d(
        conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
        conv.padding, conv.dilation, conv.groups, bias=True,
    ).to(device=conv.weight.device, dtype=conv.weight.dtype)
    weight, bias = fuse_conv_bn_weights(
        conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias
    )
    fused.weight = nn.Parameter(weight.detach().clone())
    fused.bias = nn.Parameter(bias.detach().clone())
    return fused


class Conv(nn.Module):
    """Convolution (no bias), batch norm, activation: the basic YOLOv7 layer.

    Args:
        c1: input channels.
        c2: output channels.
        k: kernel size in pixels.
        s: stride in pixels.
        p: padding in pixels; None pads by ``k // 2``.
        g: convolution groups.
        act: True for SiLU, False for none, or an activation module or spec.
    """

    def __init__(
        self,
        c1: int,
        c2: int,
        k: int = 1,
        s: int = 1,
        p: int | None = None,
        g: int = 1,
        act: bool | nn.Module | ActivationSpec = True,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, same_padding(k, p), groups=g, bias=False)
        self.bn: nn.BatchNorm2d | None = batch_norm(c2)
        self.act = make_activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x)
        return self.act(x)

    @torch.no_grad()
    def fuse(self) -> None:
        """Fold the batch norm into the convolution, which gains a bias."""
        if self.bn is None:
            return
        self.conv = _fused_conv(self.conv, self.bn)
        self.bn = None


class Concat(nn.Module):
    """Concatenation of a list of tensors along ``dimension`` (1: channels)."""

    def __init__(self, dimension: int = 1) -> None:
        super().__init__()
        self.d = dimension

    def forward(self, x: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.cat(list(x), self.d)


class MP(nn.Module):
    """Max pooling with a ``k`` x ``k`` window and stride ``k`` (halves the size for k=2)."""

    def __init__(self, k: int = 2) -> None:
        super().__init__()
        self.m = nn.MaxPool2d(kernel_size=k, stride=k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.m(x)


class SP(nn.Module):
    """Max pooling with a ``k`` x ``k`` window, stride ``s`` and padding ``k // 2``."""

    def __init__(self, k: int = 3, s: int = 1) -> None:
        super().__init__()
        self.m = nn.MaxPool2d(kernel_size=k, stride=s, padding=k // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.m(x)


class SPPCSPC(nn.Module):
    """Spatial pyramid pooling in a cross-stage-partial block.

    One branch runs 1x1, 3x3 and 1x1 convolutions, concatenates the result with its
    max pools (window sizes ``k``, stride 1), and applies 1x1 and 3x3 convolutions.
    The other branch is a single 1x1 convolution. A 1x1 convolution merges both.
    The hidden width is ``int(2 * c2 * e)``. ``n``, ``shortcut`` and ``g`` are accepted
    for the official argument order and have no effect, as in the official block.
    """

    def __init__(
        self,
        c1: int,
        c2: int,
        n: int = 1,
        shortcut: bool = False,
        g: int = 1,
        e: float = 0.5,
        k: Sequence[int] = (5, 9, 13),
    ) -> None:
        super().__init__()
        hidden = int(2 * c2 * e)
        self.cv1 = Conv(c1, hidden, 1, 1)
        self.cv2 = Conv(c1, hidden, 1, 1)
        self.cv3 = Conv(hidden, hidden, 3, 1)
        self.cv4 = Conv(hidden, hidden, 1, 1)
        self.m = nn.ModuleList(nn.MaxPool2d(kernel_size=size, stride=1, padding=size // 2) for size in k)
        self.cv5 = Conv((len(k) + 1) * hidden, hidden, 1, 1)
        self.cv6 = Conv(hidden, hidden, 3, 1)
        self.cv7 = Conv(2 * hidden, c2, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.cv4(self.cv3(self.cv1(x)))
        pyramid = torch.cat([pooled] + [pool(pooled) for pool in self.m], 1)
        spatial = self.cv6(self.cv5(pyramid))
        return self.cv7(torch.cat((spatial, self.cv2(x)), 1))


class RepConv(nn.Module):
    """Re-parameterisable 3x3 convolution (RepVGG style).

    During training the output is ``act(BN(conv3x3(x)) + BN(conv1x1(x)) + BN(x))``;
    the identity branch exists only when ``c1 == c2`` and ``s == 1``. :meth:`fuse`
    replaces the branches by one 3x3 convolution with bias, ``rbr_reparam``.

    Args:
        c1: input channels.
        c2: output channels.
        k: kernel size in pixels; only 3 is supported.
        s: stride in pixels.
        p: padding in pixels; only None or 1 is supported.
        g: convolution groups.
        act: True for SiLU, False for none, or an activation module or spec.
    """

    def __init__(
        self,
        c1: int,
        c2: int,
        k: int = 3,
        s: int = 1,
        p: int | None = None,
        g: int = 1,
        act: bool | nn.Module | ActivationSpec = True,
    ) -> None:
        super().__init__()
        if k != 3 or same_padding(k, p) != 1:
            raise ValueError(f"RepConv supports a 3x3 kernel with padding 1, got k={k}, p={p}")
        self.in_channels = c1
        self.out_channels = c2
        self.groups = g
        self.act = make_activation(act)
        self.rbr_identity: nn.BatchNorm2d | None = batch_norm(c1) if c1 == c2 and s == 1 else None
        self.rbr_dense: nn.Sequential | None = nn.Sequential(
            nn.Conv2d(c1, c2, k, s, 1, groups=g, bias=False), batch_norm(c2)
        )
        self.rbr_1x1: nn.Sequential | None = nn.Sequential(
            nn.Conv2d(c1, c2, 1, s, 0, groups=g, bias=False), batch_norm(c2)
        )
        self.rbr_reparam: nn.Conv2d | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rbr_reparam is not None:
            return self.act(self.rbr_reparam(x))
        assert self.rbr_dense is not None and self.rbr_1x1 is not None
        out = self.rbr_dense(x) + self.rbr_1x1(x)
        if self.rbr_identity is not None:
            out = out + self.rbr_identity(x)
        return self.act(out)

    @torch.no_grad()
    def fuse(self) -> None:
        """Merge the three branches into ``rbr_reparam`` and drop them."""
        if self.rbr_reparam is not None:
            return
        assert self.rbr_dense is not None and self.rbr_1x1 is not None
        dense = _fused_conv(self.rbr_dense[0], self.rbr_dense[1])
        pointwise = _fused_conv(self.rbr_1x1[0], self.rbr_1x1[1])
        weight = dense.weight + F.pad(pointwise.weight, [1, 1, 1, 1])
        bias = dense.bias + pointwise.bias
        if self.rbr_identity is not None:
            identity_weight, identity_bias = self._identity_kernel(dense.weight)
            weight = weight + identity_weight
            bias = bias + identity_bias
        dense.weight = nn.Parameter(weight)
        dense.bias = nn.Parameter(bias)
        self.rbr_reparam = dense
        self.rbr_dense = None
        self.rbr_1x1 = None
        self.rbr_identity = None

    def _identity_kernel(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the identity branch as a 3x3 kernel (a centred 1 per channel) and bias, scaled by its BN."""
        assert self.rbr_identity is not None
        channels_per_group = self.in_channels // self.groups
        kernel = torch.zeros_like(like)
        for channel in range(self.in_channels):
            kernel[channel, channel % channels_per_group, 1, 1] = 1.0
        bn = self.rbr_identity
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        return kernel * scale.reshape(-1, 1, 1, 1), bn.bias - bn.running_mean * scale


class ImplicitA(nn.Module):
    """Learned per-channel offset added to the input (implicit knowledge, additive)."""

    def __init__(self, channel: int, std: float = 0.02) -> None:
        super().__init__()
        self.channel = channel
        self.implicit = nn.Parameter(torch.zeros(1, channel, 1, 1))
        nn.init.normal_(self.implicit, mean=0.0, std=std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.implicit + x


class ImplicitM(nn.Module):
    """Learned per-channel factor multiplied with the input (implicit knowledge, multiplicative)."""

    def __init__(self, channel: int, std: float = 0.02) -> None:
        super().__init__()
        self.channel = channel
        self.implicit = nn.Parameter(torch.ones(1, channel, 1, 1))
        nn.init.normal_(self.implicit, mean=1.0, std=std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.implicit * x


class Detect(nn.Module):
    """Anchor-based detection head: one 1x1 output convolution per feature level.

    Each level ``i`` maps its feature map to ``na * (nc + 5)`` channels: per anchor,
    box centre x and y, width, height, objectness and ``nc`` class scores (logits).

    In training mode the output is the list of raw maps, one per level, of shape
    ``(batch, na, height, width, nc + 5)``. In eval mode it is one tensor of shape
    ``(batch, n_predictions, nc + 5)``, with all levels concatenated in order and
    sigmoid applied. Boxes are decoded to input pixels as centre x, centre y, width,
    height: ``xy = (2 * sigmoid - 0.5 + cell) * stride`` and
    ``wh = (2 * sigmoid) ** 2 * anchor``.

    Args:
        nc: number of classes.
        anchors: per level, anchor widths and heights in pixels (w1, h1, w2, h2, ...).
        ch: input channels per level.
    """

    stride: torch.Tensor
    anchors: torch.Tensor
    anchor_grid: torch.Tensor

    def __init__(self, nc: int, anchors: Sequence[Sequence[float]], ch: Sequence[int]) -> None:
        super().__init__()
        if len(anchors) != len(ch):
            raise ValueError(f"{len(anchors)} anchor levels for {len(ch)} input feature maps")
        self.nc = nc
        self.no = nc + 5
        self.nl = len(anchors)
        self.na = len(anchors[0]) // 2
        sizes = torch.tensor([list(level) for level in anchors], dtype=torch.float32).view(self.nl, -1, 2)
        # anchors is in grid cells once set_strides has run, anchor_grid in pixels.
        self.register_buffer("anchors", sizes)
        self.register_buffer("anchor_grid", sizes.clone().view(self.nl, 1, -1, 1, 1, 2))
        # Strides are measured when the model is built, and the official code keeps
        # them out of the state_dict as well.
        self.register_buffer("stride", torch.ones(self.nl), persistent=False)
        self.m = nn.ModuleList(nn.Conv2d(channels, self.no * self.na, 1) for channels in ch)

    def set_strides(self, strides: Sequence[float]) -> None:
        """Record each level's stride in pixels and express ``anchors`` in grid cells."""
        stride = torch.tensor(list(strides), dtype=self.anchors.dtype, device=self.anchors.device)
        self.stride.copy_(stride)
        self.anchors.div_(stride.view(-1, 1, 1))

    @torch.no_grad()
    def initialize_biases(self) -> None:
        """Set output biases to priors: about 8 objects per 640x640 image, uniform classes."""
        for conv, stride in zip(self.m, self.stride.tolist(), strict=True):
            bias = conv.bias.view(self.na, -1)
            bias[:, 4] += math.log(8 / (640 / stride) ** 2)
            bias[:, 5:] += math.log(0.6 / (self.nc - 0.99))

    def _level_maps(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [conv(x) for conv, x in zip(self.m, features, strict=True)]

    def forward(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor] | torch.Tensor:
        maps = self.level_maps(features)
        if self.training:
            return maps
        return torch.cat([self._decode(level, x) for level, x in enumerate(maps)], 1)

    def level_maps(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Raw (undecoded) output per level, ``(batch, na, height, width, nc + 5)``, in any mode."""
        if len(features) != self.nl:
            raise ValueError(f"expected {self.nl} feature maps, got {len(features)}")
        return [self._to_anchor_layout(x) for x in self._level_maps(features)]

    def _to_anchor_layout(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, na * no, h, w) to (batch, na, h, w, no)."""
        batch, _, height, width = x.shape
        return x.view(batch, self.na, self.no, height, width).permute(0, 1, 3, 4, 2).contiguous()

    def _decode(self, level: int, x: torch.Tensor) -> torch.Tensor:
        batch, _, height, width, _ = x.shape
        rows = torch.arange(height, device=x.device, dtype=x.dtype)
        columns = torch.arange(width, device=x.device, dtype=x.dtype)
        grid_y, grid_x = torch.meshgrid(rows, columns, indexing="ij")
        cells = torch.stack((grid_x, grid_y), 2).view(1, 1, height, width, 2)
        y = x.sigmoid()
        xy = (y[..., 0:2] * 2.0 - 0.5 + cells) * self.stride[level]
        wh = (y[..., 2:4] * 2.0) ** 2 * self.anchor_grid[level]
        return torch.cat((xy, wh, y[..., 4:]), -1).view(batch, -1, self.no)

    def fuse(self) -> None:
        """Do nothing, because the plain head has no implicit layers to fold."""


class IDetect(Detect):
    """Detection head with implicit knowledge around each output convolution.

    Level ``i`` computes ``im[i] * m[i](ia[i] + x)``: ImplicitA adds a learned offset
    to each input channel, ImplicitM scales each output channel.

    :meth:`fuse` folds both into ``m[i]``: with weight ``W``, bias ``b``, offset ``a``
    and factor ``f``, the fused weight is ``f * W`` (per output channel) and the fused
    bias is ``f * (b + W a)``. Then it removes ``ia`` and ``im``, so the fused head
    has the parameters of the official fused model (36,905,341 in all for YOLOv7 with
    80 classes) and its state_dict lacks their keys.
    """

    def __init__(self, nc: int, anchors: Sequence[Sequence[float]], ch: Sequence[int]) -> None:
        super().__init__(nc, anchors, ch)
        self.ia: nn.ModuleList | None = nn.ModuleList(ImplicitA(channels) for channels in ch)
        self.im: nn.ModuleList | None = nn.ModuleList(ImplicitM(self.no * self.na) for _ in ch)

    def _level_maps(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if self.ia is None or self.im is None:
            return super()._level_maps(features)
        return [
            multiply(conv(add(x)))
            for conv, add, multiply, x in zip(self.m, self.ia, self.im, features, strict=True)
        ]

    @torch.no_grad()
    def fuse(self) -> None:
        """Fold ``ia`` and ``im`` into the output convolutions and remove them."""
        if self.ia is None or self.im is None:
            return
        for conv, add, multiply in zip(self.m, self.ia, self.im, strict=True):
            weight = conv.weight.flatten(1)
            offset = add.implicit.flatten()
            factor = multiply.implicit.flatten()
            conv.bias.copy_(factor * (conv.bias + weight @ offset))
            conv.weight.mul_(factor.view(-1, 1, 1, 1))
        self.ia = None
        self.im = None
