"""The eight primitives: shapes at both strides for 28x28, 32x32 and odd sizes; the special cases."""
from __future__ import annotations

import pytest
import torch

from engine.ops import PRIMITIVES, FactorizedReduce, Identity, Zero, make_op


def test_primitives_are_the_darts_list_in_order():
    assert PRIMITIVES == ("none", "max_pool_3x3", "avg_pool_3x3", "skip_connect", "sep_conv_3x3", "sep_conv_5x5",
                          "dil_conv_3x3", "dil_conv_5x5")


@pytest.mark.parametrize("name", PRIMITIVES)
@pytest.mark.parametrize("size", [28, 32, 13, 7])
@pytest.mark.parametrize("stride", [1, 2])
def test_output_shape(name, size, stride):
    c = 6
    op = make_op(name, c, stride, affine=False)
    x = torch.randn(3, c, size, size)
    y = op(x)
    out = (size + stride - 1) // stride
    assert y.shape == (3, c, out, out), f"{name} stride {stride} on {size}x{size}: {tuple(y.shape)}"
    assert torch.isfinite(y).all()


def test_none_is_zeros_and_skip_is_the_input_itself():
    x = torch.randn(2, 4, 9, 9)
    assert (Zero(1)(x) == 0).all() and Zero(2)(x).shape == (2, 4, 5, 5)
    assert make_op("skip_connect", 4, 1, affine=False)(x) is x
    assert isinstance(make_op("skip_connect", 4, 2, affine=False), FactorizedReduce)
    assert isinstance(make_op("skip_connect", 4, 1, affine=False), Identity)


def test_parametric_ops_backpropagate_at_odd_sizes():
    for name in PRIMITIVES[3:]:
        op = make_op(name, 4, 2, affine=True)
        x = torch.randn(2, 4, 11, 11, requires_grad=True)
        op(x).square().mean().backward()
        assert x.grad is not None and torch.isfinite(x.grad).all(), name
        for p in op.parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_pooling_is_followed_by_a_non_affine_batchnorm_during_search():
    op = make_op("max_pool_3x3", 4, 1, affine=False)
    bn = op[1]
    assert isinstance(bn, torch.nn.BatchNorm2d) and not bn.affine


def test_unknown_primitive():
    with pytest.raises(ValueError, match="unknown primitive"):
        make_op("conv_7x7", 4, 1, affine=False)


_ODD_BATCH_SCRIPT = """
import torch
from engine.ops import FactorizedReduce
torch.set_num_threads(2)
for n, c, h in ((5, 4, 12), (17, 12, 14), (5, 8, 12), (3, 16, 28)):
    op = FactorizedReduce(c, c).to(memory_format=torch.channels_last)
    for _ in range(3):
        x = torch.randn(n, c, h, h).contiguous(memory_format=torch.channels_last).requires_grad_()
        op(x).sum().backward()
print("ok")
"""


def test_factorized_reduce_backward_with_odd_batches_on_channels_last():
    """Regression: a strided 1x1 conv's weight gradient in oneDNN corrupted the heap for odd batch sizes
    (a crash, so it runs in its own process)."""
    import os
    import subprocess
    import sys
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", _ODD_BATCH_SCRIPT], capture_output=True, text=True, cwd=repo,
                          timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_factorized_reduce_equals_a_strided_convolution():
    op = FactorizedReduce(6, 8, affine=False).eval()
    x = torch.randn(3, 6, 9, 9)
    y = torch.relu(x)
    ref1 = torch.nn.functional.conv2d(y, op.conv_1.weight, stride=2)
    shifted = torch.nn.functional.pad(y, (0, 1, 0, 1))[:, :, 1:, 1:]
    ref2 = torch.nn.functional.conv2d(shifted, op.conv_2.weight, stride=2)
    assert torch.allclose(op(x), op.bn(torch.cat([ref1, ref2], 1)), atol=1e-6)


@pytest.mark.parametrize("kernel", [3, 5])
@pytest.mark.parametrize("size", [14, 7, 4, 13])
@pytest.mark.parametrize("layout", ["channels_last", "contiguous"])
def test_strided_dilated_depthwise_is_the_dilated_convolution(kernel, size, layout):
    """The reduction cells' dilated convs run as undilated convs of the even pixels (engine/ops.py
    `Depthwise`): the same outputs as nn.Conv2d's dilated strided conv, the same gradients up to summation
    order, in the input's layout."""
    from engine.ops import Depthwise
    torch.manual_seed(0)
    pad = kernel - 1  # dilation 2
    op = Depthwise(6, 6, kernel, 2, pad, dilation=2, groups=6, bias=False)
    ref = torch.nn.Conv2d(6, 6, kernel, 2, pad, dilation=2, groups=6, bias=False)
    ref.weight.data.copy_(op.weight.data)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.randn(5, 6, size, size).contiguous(memory_format=fmt).requires_grad_()
    xr = x.detach().clone().requires_grad_()
    y, yr = op(x), ref(xr)
    assert y.shape == yr.shape and torch.equal(y, yr)
    if layout == "channels_last" and y.shape[-1] > 1:
        assert y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
    g = torch.randn_like(yr)
    y.backward(g)
    yr.backward(g)
    assert torch.allclose(x.grad, xr.grad, atol=1e-5) and torch.allclose(op.weight.grad, ref.weight.grad, atol=1e-4)


def test_only_stride_2_dilation_2_takes_the_even_pixels():
    """The other depthwise convs (sep convs, dilated convs at stride 1) are nn.Conv2d's own."""
    from engine.ops import Depthwise
    dil = make_op("dil_conv_3x3", 4, 2, affine=True)
    assert isinstance(dil[1], Depthwise) and dil[1].stride == (2, 2) and dil[1].dilation == (2, 2)
    x = torch.randn(2, 4, 8, 8)
    for op in (Depthwise(4, 4, 3, 1, 2, dilation=2, groups=4, bias=False),
               Depthwise(4, 4, 3, 2, 1, dilation=1, groups=4, bias=False)):
        assert torch.equal(op(x), torch.nn.functional.conv2d(x, op.weight, None, op.stride, op.padding,
                                                             op.dilation, op.groups))


@pytest.mark.parametrize("size", [12, 13])
@pytest.mark.parametrize("offset", [0, 1])
@pytest.mark.parametrize("layout", ["channels_last", "contiguous"])
def test_subsample_is_the_strided_slice_with_its_gradient_in_the_input_layout(size, offset, layout):
    """engine/ops.py `subsample`: x[:, :, o::2, o::2] (a missing last odd row/column is zeros, ceil(H/2) rows
    either way), whose gradient keeps x's memory format (a slice's own gradient is contiguous)."""
    from engine.ops import subsample
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.randn(3, 5, size, size).contiguous(memory_format=fmt).requires_grad_()
    ref = torch.nn.functional.pad(x, (0, 1, 0, 1))[:, :, offset::2, offset::2][:, :, :(size + 1) // 2, :(size + 1) // 2]
    y = subsample(x, offset)
    assert torch.equal(y, ref)
    g = torch.randn_like(ref)
    (grad,) = torch.autograd.grad(y, x, g)
    (grad_ref,) = torch.autograd.grad(ref, x, g)
    assert torch.equal(grad, grad_ref)
    assert grad.is_contiguous(memory_format=fmt)


def test_no_gradient_of_a_channels_last_network_is_contiguous():
    """Every feature-map gradient of a channels_last network is channels_last, or a channel slice of one (the
    concatenation's backward). A contiguous one makes every elementwise backward after it take a slow strided
    path; global pooling's backward (fixed by engine/ops.py `grad_in_layout`) and a slice's (`subsample`)
    handed them out."""
    from engine.genotype import Genotype
    from engine.network import Network, darts_spec
    pairs = [["sep_conv_3x3", 0], ["dil_conv_5x5", 1], ["dil_conv_3x3", 0], ["skip_connect", 1],
             ["max_pool_3x3", 2], ["avg_pool_3x3", 3], ["sep_conv_5x5", 4], ["skip_connect", 2]]
    g = Genotype.from_json({"normal": pairs, "normal_concat": [2, 3, 4, 5], "reduce": pairs, "reduce_concat": [2, 3, 4, 5]})
    net = Network(darts_spec(1, 10, c=4, layers=3), genotype=g).to(memory_format=torch.channels_last)
    contiguous = []

    def watch(name):
        def hook(mod, inp, out):
            if isinstance(out, torch.Tensor) and out.requires_grad and out.dim() == 4 and min(out.shape[-2:]) > 1:
                out.register_hook(lambda grad: contiguous.append(name) if grad.stride(1) != 1 else None)
        return hook

    for name, m in net.named_modules():
        m.register_forward_hook(watch(name))
    x = torch.randn(5, 1, 13, 13).contiguous(memory_format=torch.channels_last)
    net(x).square().sum().backward()
    assert contiguous == []
