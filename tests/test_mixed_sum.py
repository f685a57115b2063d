"""kernels/mixed_sum.py: the Triton kernel's numerics (under TRITON_INTERPRET=1 on CPU), its gradients (with
and without the weights' gradient, which is the only reason its backward reads the inputs), and proof that the
real compiler accepts it for sm_80 and sm_90 without register spills."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from kernels.mixed_sum import (MAX_INPUTS, MixedSumFn, find_ptxas, mixed_sum, mixed_sum_backward, mixed_sum_forward,
                               mixed_sum_ref, ptxas_report)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
interpreted = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                                 reason="needs TRITON_INTERPRET=1 (set by conftest without a GPU) or CUDA")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(k, shape, dtype=torch.float32, zeros=()):
    xs = [torch.randn(shape, dtype=dtype, device=DEVICE) for _ in range(k)]
    w = torch.rand(k, device=DEVICE) + 0.05
    for i in zeros:
        w[i] = 0.0
    return xs, w


def _report(a, b) -> str:
    d = (a.double() - b.double()).abs()
    return f"max diff {d.max():.3g}, mean diff {d.mean():.3g}"


def _rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def _fp64_grads(xs, w, grad):
    xs64 = [x.detach().double().requires_grad_() for x in xs]
    w64 = w.detach().double().requires_grad_()
    out = mixed_sum_ref(xs64, w64)
    out.backward(grad.double())
    return out.detach(), [x.grad for x in xs64], w64.grad


SHAPES = [(1,), (7,), (1023,), (4097,), (64, 16, 32, 32), (64, 64, 8, 8), (3, 5, 11, 13)]


@interpreted
@pytest.mark.parametrize("k", range(1, MAX_INPUTS + 1))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward_and_gradients_match_fp64(k, shape):
    zeros = (0,) if k > 2 else ()
    xs, w = _inputs(k, shape, zeros=zeros)
    grad = torch.randn(shape, device=DEVICE)
    block = 256 if len(xs[0].flatten()) < 5000 else None
    out = mixed_sum_forward(xs, w, block=block)
    ref, ref_gxs, ref_gw = _fp64_grads(xs, w, grad)
    assert _rel(out, ref) < 1e-5, _report(out, ref)
    for grad_w in (True, False):
        gxs, gw = mixed_sum_backward(grad, xs, w, grad_w=grad_w, block=block)
        for i, (g, r) in enumerate(zip(gxs, ref_gxs)):
            if i in zeros:
                assert (g == 0).all()  # a zero weight passes no gradient to its input
            else:
                assert _rel(g, r) < 1e-5, f"grad_x[{i}] (grad_w={grad_w}): " + _report(g, r)
        if grad_w:
            assert _rel(gw, ref_gw) < 1e-5, "grad_w: " + _report(gw, ref_gw)
        else:
            assert gw is None


@interpreted
@pytest.mark.parametrize("k", [1, 3, 8])
def test_without_the_weights_gradient_the_backward_reads_no_input(k):
    xs, w = _inputs(k, (5, 33))
    nan = [torch.full_like(x, float("nan")) for x in xs]
    grad = torch.randn(5, 33, device=DEVICE)
    gxs, gw = mixed_sum_backward(grad, nan, w, grad_w=False, block=64)
    assert gw is None
    for i in range(k):
        assert torch.equal(gxs[i], w[i] * grad), f"grad_x[{i}] read its NaN input"
    _, gw = mixed_sum_backward(grad, nan, w, grad_w=True, block=64)
    assert torch.isnan(gw).all()  # the same inputs are read when grad_w is asked for: the test can fail
    # through autograd: weights that need no gradient keep only one input alive for the backward
    leaves = [x.clone().requires_grad_() for x in xs]
    out = MixedSumFn.apply(w, *leaves)
    assert len(out.grad_fn.saved_tensors) == 2
    out.backward(grad)
    for wk, leaf in zip(w, leaves):
        assert torch.allclose(leaf.grad, wk * grad)


@interpreted
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_error_at_most_twice_pytorchs(dtype):
    shape = (64, 16, 32, 32)
    for k in (2, 5, 8):
        xs, w = _inputs(k, shape, dtype=dtype)
        grad = torch.randn(shape, device=DEVICE).to(dtype)
        ref, ref_gxs, ref_gw = _fp64_grads(xs, w.to(dtype), grad)
        torch_out = mixed_sum_ref(xs, w.to(dtype))                     # same-precision PyTorch
        out = mixed_sum_forward(xs, w.to(dtype))
        ours, theirs = (out.double() - ref).abs().max(), (torch_out.double() - ref).abs().max()
        assert ours <= 2 * theirs + 1e-12, f"K={k} {dtype}: kernel {ours:.3g} vs PyTorch {theirs:.3g}"
        xs_t = [x.clone().requires_grad_() for x in xs]
        w_t = w.to(dtype).clone().requires_grad_()
        mixed_sum_ref(xs_t, w_t).backward(grad)
        gxs, gw = mixed_sum_backward(grad, xs, w.to(dtype))
        assert (gw.double() - ref_gw).abs().max() <= 2 * (w_t.grad.double() - ref_gw).abs().max() + 1e-6
        for g, gt, r in zip(gxs, xs_t, ref_gxs):
            err = (g.double() - r).abs()
            if dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1":
                # Triton's interpreter casts fp32 -> bf16 by truncation (interpreter.py, cast_impl), the GPU
                # rounds to nearest even; w * g is exact in fp32, so either way the error is below 1 ulp.
                ulp = torch.exp2(torch.floor(torch.log2(r.abs().clamp_min(1e-30))) - 7)
                assert (err <= ulp).all(), f"K={k}: {int((err > ulp).sum())} elements off by more than 1 ulp"
            else:
                assert err.max() <= 2 * (gt.grad.double() - r).abs().max() + 1e-12


@interpreted
def test_autograd_function_and_dispatch():
    xs, w = _inputs(4, (2, 3, 9, 9))
    xs = [x.requires_grad_() for x in xs]
    w.requires_grad_()
    out = mixed_sum(xs, w)  # under the interpreter on CPU: the Triton kernel via MixedSumFn
    out.square().sum().backward()
    got = [x.grad.clone() for x in xs] + [w.grad.clone()]
    for t in xs + [w]:
        t.grad = None
    mixed_sum_ref(xs, w).square().sum().backward()
    want = [x.grad for x in xs] + [w.grad]
    for g, r in zip(got, want):
        assert torch.allclose(g, r, rtol=1e-5, atol=1e-6), _report(g, r)
    # the autograd Function is what eager CUDA (and the interpreter) runs: same gradients again, via .apply
    w2 = w.detach().clone().requires_grad_()
    xs2 = [x.detach().clone().requires_grad_() for x in xs]
    MixedSumFn.apply(w2, *xs2).square().sum().backward()
    for g, r in zip([x.grad for x in xs2] + [w2.grad], want):
        assert torch.allclose(g, r, rtol=1e-5, atol=1e-6), _report(g, r)


@interpreted
def test_channels_last_inputs_keep_their_layout():
    xs = [torch.randn(2, 8, 5, 5, device=DEVICE).contiguous(memory_format=torch.channels_last) for _ in range(3)]
    w = torch.rand(3, device=DEVICE)
    out = mixed_sum_forward(xs, w, block=64)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(out, mixed_sum_ref(xs, w), atol=1e-6)


def test_bad_inputs_are_rejected_clearly():
    x = torch.randn(4, 6)
    with pytest.raises(ValueError, match="not contiguous"):
        mixed_sum_forward([x.t()], torch.ones(1))
    with pytest.raises(ValueError, match="one weight per input"):
        mixed_sum_forward([x, x], torch.ones(3))
    with pytest.raises(ValueError, match="1 to 8 inputs"):
        mixed_sum_forward([x] * 9, torch.ones(9))
    with pytest.raises(ValueError, match="input 1"):
        mixed_sum_forward([x, torch.randn(6, 4)], torch.ones(2))
    with pytest.raises(TypeError, match="float32, bfloat16 and float16"):
        mixed_sum_forward([x.double()], torch.ones(1))


def test_reference_gradients():
    xs = [torch.randn(10, requires_grad=True) for _ in range(3)]
    w = torch.tensor([0.5, 0.0, 0.3], requires_grad=True)
    out = mixed_sum_ref(xs, w)
    assert torch.allclose(out, 0.5 * xs[0] + 0.3 * xs[2])
    out.sum().backward()
    assert torch.allclose(w.grad, torch.stack([x.sum() for x in xs]).detach())  # every input's weight, 0 or not
    assert (xs[1].grad == 0).all()


# ------------------------------------------------------------------------------ the real compiler
_COMPILE_SCRIPT = r"""
import json, sys
from kernels.mixed_sum import compile_for
out = {}
for cap in (80, 90):
    for name, ck in compile_for(cap).items():
        out[f"sm_{cap}_{name}"] = {"ptx": ck.asm["ptx"]}  # registers and spills: from ptxas -v below
    out[f"sm_{cap}_bwd_no_grad_w"] = {"ptx": compile_for(cap, grad_w=False)["bwd"].asm["ptx"]}
json.dump(out, sys.stdout)
"""


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the compiler needs the real language
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], capture_output=True, text=True, cwd=REPO, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("kernel", ["fwd", "bwd", "bwd_no_grad_w"])
def test_ptxas_accepts_the_kernels_without_spills(compiled, arch, kernel):
    ptxas = find_ptxas()
    if ptxas is None:
        pytest.skip("no ptxas on this machine")
    report = ptxas_report(compiled[f"{arch}_{kernel}"]["ptx"], int(arch[3:]), ptxas)  # raises if rejected
    assert report["registers"] > 0, report["report"]
    assert report["spill_reports"] > 0, report["report"]
    assert report["spill_stores"] == 0 and report["spill_loads"] == 0, report["report"]


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_forward_loads_are_128_bit(compiled, arch):
    ptx = compiled[f"{arch}_fwd"]["ptx"]
    loads = [line for line in ptx.splitlines() if "ld.global" in line]
    wide = [line for line in loads if ".v4.b32" in line or ".v4.f32" in line]
    assert wide, "no 128-bit global loads in the forward kernel:\n" + "\n".join(loads[:10])
    # every input-tensor load is vectorized; the only scalar loads are the K weights
    assert len(loads) - len(wide) <= 8, "\n".join(loads)


@pytest.mark.cuda
def test_library_op_compiles_into_the_graph_without_breaks():
    xs = [torch.randn(8, 16, 8, 8, device="cuda") for _ in range(3)]
    w = torch.rand(3, device="cuda")
    fn = lambda w_, *xs_: mixed_sum(list(xs_), w_) * 2  # noqa: E731
    explain = torch._dynamo.explain(fn)(w, *xs)
    assert explain.graph_break_count == 0 and explain.graph_count == 1
    compiled_fn = torch.compile(fn, fullgraph=True)
    assert torch.allclose(compiled_fn(w, *xs), fn(w, *xs), atol=1e-6)


@pytest.mark.cuda
def test_library_op_backward_under_compile_matches_eager():
    xs = [torch.randn(8, 16, 8, 8, device="cuda", requires_grad=True) for _ in range(3)]
    w = torch.rand(3, device="cuda", requires_grad=True)
    fn = lambda w_, *xs_: (mixed_sum(list(xs_), w_) ** 2).sum()  # noqa: E731
    want = torch.autograd.grad(fn(w, *xs), [w, *xs])
    got = torch.autograd.grad(torch.compile(fn, fullgraph=True)(w, *xs), [w, *xs])
    for a, b in zip(got, want):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)
