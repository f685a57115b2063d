"""The eight DARTS primitives, in the DARTS order so genotypes compare with published ones.

Every op maps (N, C, H, W) -> (N, C, ceil(H/s), ceil(W/s)) for stride s in {1, 2}, odd sizes included.
Differences from the DARTS reference code, each on purpose:
- `FactorizedReduce` pads odd inputs before its shifted branch (DARTS crashes on odd sizes);
- `none` allocates zeros of the output shape instead of computing `x[:, :, ::s, ::s] * 0`; the mixed op
  never runs it at all (its output, and so its weight's gradient, is exactly zero).
Search-time BatchNorms are non-affine as in DARTS (`affine=False`); the derived network uses affine ones.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

PRIMITIVES = ("none", "max_pool_3x3", "avg_pool_3x3", "skip_connect",
              "sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5")
# Ops with no learned transform of their own, as DARTS papers count them when they report the collapse to
# parameter-free cells: pooling and skip_connect (the identity at stride 1; at stride 2 a FactorizedReduce,
# which the literature still counts as a skip).
PARAMETER_FREE = ("none", "max_pool_3x3", "avg_pool_3x3", "skip_connect")


def channels_last(ref: torch.Tensor) -> bool:
    """Whether `ref` is laid out channels_last (and not also contiguous, as a 1x1 or single-channel map is)."""
    return ref.dim() == 4 and not ref.is_contiguous() and ref.is_contiguous(memory_format=torch.channels_last)


def _zeros(like: torch.Tensor, shape, cl: bool) -> torch.Tensor:
    """Zeros of `shape` with `like`'s dtype and device, channels_last if `cl`: allocated in that layout at once."""
    fmt = torch.channels_last if cl else torch.contiguous_format
    return torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=fmt).zero_()


def _pixels(x: torch.Tensor, offset: int) -> torch.Tensor:
    """x[:, :, o::2, o::2], dense in x's layout (a strided view reads as neither layout)."""
    out = x[:, :, offset::2, offset::2]
    return out.contiguous(memory_format=torch.channels_last) if channels_last(x) else out.contiguous()


class _Subsample(torch.autograd.Function):
    """x[:, :, o::2, o::2] in x's layout, whose gradient is in x's layout too: a slice's own backward writes
    into contiguous zeros, and a contiguous gradient meeting channels_last features makes every elementwise
    backward downstream take the slow strided path (ReLU's backward: 4.9 ms against 0.37 ms at 128x64x14x14)."""

    @staticmethod
    def forward(ctx, x, offset):
        ctx.shape, ctx.offset, ctx.cl = x.shape, offset, channels_last(x)
        return _pixels(x, offset)

    @staticmethod
    def backward(ctx, grad):
        o = ctx.offset
        out = _zeros(grad, ctx.shape, ctx.cl)
        out[:, :, o::2, o::2] = grad
        return out, None


class _GradInLayout(torch.autograd.Function):
    """The identity, whose gradient is made channels_last when its input was."""

    @staticmethod
    def forward(ctx, x):
        ctx.cl = channels_last(x)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous(memory_format=torch.channels_last) if ctx.cl else grad


def _recording(x: torch.Tensor) -> bool:
    """Whether autograd records x's graph and no tracer is looking: TorchScript cannot export a Python
    autograd.Function (`aso-se export`), and without a backward the plain ops compute the same values."""
    return x.requires_grad and torch.is_grad_enabled() and not torch.jit.is_tracing() and not torch.jit.is_scripting()


def grad_in_layout(x: torch.Tensor) -> torch.Tensor:
    """x, with its gradient in x's layout. Global average pooling's backward hands back a contiguous gradient:
    met by channels_last features, every backward of the last cell then takes a slow mixed-layout path."""
    return _GradInLayout.apply(x) if _recording(x) else x


def subsample(x: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """Every second pixel from `offset` (0: the even ones, 1: the odd ones; the output has ceil(H/2) rows, a
    missing last odd row or column is zeros, as a conv's padding reads it), in x's memory format."""
    out = _Subsample.apply(x, offset) if _recording(x) else _pixels(x, offset)
    h, w = x.shape[-2:]
    extra_h, extra_w = (h + 1) // 2 - out.shape[-2], (w + 1) // 2 - out.shape[-1]
    return F.pad(out, (0, extra_w, 0, extra_h)) if extra_h or extra_w else out


def zeros_like_layout(ref: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Zeros of `shape` in `ref`'s memory format: a contiguous zero tensor added to channels_last features
    would switch the sum's layout (extra copies, and a second compiled graph for every op downstream)."""
    return _zeros(ref, shape, channels_last(ref))


class Zero(nn.Module):
    def __init__(self, stride: int):
        super().__init__()
        self.stride = stride

    def forward(self, x):
        n, c, h, w = x.shape
        s = self.stride
        return zeros_like_layout(x, (n, c, (h + s - 1) // s, (w + s - 1) // s))


class Identity(nn.Module):
    def forward(self, x):
        return x


class ReLUConvBN(nn.Sequential):
    """ReLU -> conv -> BN; the cells' 1x1 preprocessing and the building block of the stem."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, padding: int, affine: bool = True):
        super().__init__(nn.ReLU(inplace=False),
                         nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding, bias=False),
                         nn.BatchNorm2d(c_out, affine=affine))


class Depthwise(nn.Conv2d):
    """A depthwise conv (groups = channels). With stride 2, dilation 2 and an even padding p (the dilated convs
    of the reduction cells) it runs as the undilated stride-1 conv of the even-indexed pixels with padding p/2:
    output i reads input 2i + 2k - p = 2(i + k - p/2), so the products and the outputs are the same, for odd
    sizes too. oneDNN has no fast kernel for the dilated strided depthwise conv on channels_last input: its
    forward and backward took 10-18 ms against 1.2-4.6 ms this way (batch 128, 7x7 and 14x14; torch 2.14.1 CPU),
    and they were 16% of the main job's optimize step. The weight gradient's sums may round in another order.
    `even_pixels = False` runs nn.Conv2d's own dilated conv (the eager DARTS baseline, engine/baseline.py)."""

    even_pixels = True

    def forward(self, x):
        pad = self.padding  # nn.Conv2d keeps a pair, or a string ("same"), which this rewrite leaves alone
        if self.even_pixels and self.stride == (2, 2) and self.dilation == (2, 2) and isinstance(pad, tuple) \
                and pad[0] % 2 == 0 and pad[1] % 2 == 0:
            return F.conv2d(subsample(x), self.weight, self.bias, 1, (pad[0] // 2, pad[1] // 2), 1, self.groups)
        return super().forward(x)


class DilConv(nn.Sequential):
    """ReLU -> depthwise dilated conv -> pointwise conv -> BN."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, padding: int, dilation: int,
                 affine: bool = True):
        super().__init__(nn.ReLU(inplace=False),
                         Depthwise(c_in, c_in, kernel, stride, padding, dilation=dilation, groups=c_in, bias=False),
                         nn.Conv2d(c_in, c_out, 1, bias=False),
                         nn.BatchNorm2d(c_out, affine=affine))


class SepConv(nn.Sequential):
    """Two stacked DilConv blocks with dilation 1; only the first strides (DARTS)."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, padding: int, affine: bool = True):
        super().__init__(DilConv(c_in, c_in, kernel, stride, padding, 1, affine),
                         DilConv(c_in, c_out, kernel, 1, padding, 1, affine))


class FactorizedReduce(nn.Module):
    """Stride-2 skip path: two 1x1 convs at stride 2, the second shifted by one pixel, concatenated.
    Output (N, c_out, ceil(H/2), ceil(W/2)); odd inputs are padded on the right/bottom for the shifted branch.

    The stride is taken by subsampling before stride-1 convs (the same arithmetic for a 1x1 kernel):
    oneDNN's weight gradient of a strided 1x1 conv on channels_last input corrupts the heap for odd batch
    sizes at even feature-map sizes (e.g. N=5, 12x12; torch 2.14.1 CPU; see tests/test_ops.py)."""

    def __init__(self, c_in: int, c_out: int, affine: bool = True):
        super().__init__()
        if c_out % 2:
            raise ValueError(f"FactorizedReduce needs an even number of output channels, got {c_out}")
        self.relu = nn.ReLU(inplace=False)
        self.conv_1 = nn.Conv2d(c_in, c_out // 2, 1, bias=False)
        self.conv_2 = nn.Conv2d(c_in, c_out // 2, 1, bias=False)
        self.bn = nn.BatchNorm2d(c_out, affine=affine)

    def forward(self, x):
        x = self.relu(x)
        return self.bn(torch.cat([self.conv_1(subsample(x)), self.conv_2(subsample(x, 1))], dim=1))


class PoolBN(nn.Sequential):
    """Pooling followed by a BatchNorm, as DARTS does inside the mixed op (non-affine during search)."""

    def __init__(self, kind: str, c: int, stride: int, affine: bool = False):
        pool = nn.MaxPool2d(3, stride=stride, padding=1) if kind == "max" else \
            nn.AvgPool2d(3, stride=stride, padding=1, count_include_pad=False)
        super().__init__(pool, nn.BatchNorm2d(c, affine=affine))


def final_batchnorm(op: nn.Module) -> nn.BatchNorm2d | None:
    """The BatchNorm that produces the op's output (None for ops without one)."""
    last = None
    for m in op.modules():
        if isinstance(m, nn.BatchNorm2d):
            last = m
    return last


def gate_output(op: nn.Module) -> nn.Module:
    """Make the op's final BatchNorm affine with its scale at zero: the op outputs exactly zeros until it
    learns (its scale gets gradient at once). The supernet does this for every op that warmup does not
    train, so an untrained op sampled when search begins acts like a dropped edge instead of adding
    normalized noise to the features warmup learned (the collapse at the switch)."""
    old = final_batchnorm(op)
    if old is None:
        return op
    new = nn.BatchNorm2d(old.num_features, eps=old.eps, momentum=old.momentum, affine=True)
    nn.init.zeros_(new.weight)
    for parent in op.modules():
        for name, child in parent.named_children():
            if child is old:
                setattr(parent, name, new)
    return op


def make_op(name: str, c: int, stride: int, affine: bool) -> nn.Module:
    """One primitive with `c` input and output channels. `affine` controls the BatchNorms."""
    if name == "none":
        return Zero(stride)
    if name == "max_pool_3x3":
        return PoolBN("max", c, stride, affine)
    if name == "avg_pool_3x3":
        return PoolBN("avg", c, stride, affine)
    if name == "skip_connect":
        return Identity() if stride == 1 else FactorizedReduce(c, c, affine)
    if name == "sep_conv_3x3":
        return SepConv(c, c, 3, stride, 1, affine)
    if name == "sep_conv_5x5":
        return SepConv(c, c, 5, stride, 2, affine)
    if name == "dil_conv_3x3":
        return DilConv(c, c, 3, stride, 2, 2, affine)
    if name == "dil_conv_5x5":
        return DilConv(c, c, 5, stride, 4, 2, affine)
    raise ValueError(f"unknown primitive {name!r}; choose one of {', '.join(PRIMITIVES)}")
