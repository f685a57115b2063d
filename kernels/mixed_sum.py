"""mixed_sum: the mixed op's weighted sum as one fused Triton kernel.

    out = sum over k of w[k] * xs[k]          xs: 1..8 same-shape tensors (the ops that ran), w: (K,) on device

Dominant-op skipping happens one level up, on the host, before anything runs: the architecture manager reads
the step's sampled weights once (engine/arch.py, prefetched with the step's other samples) and the mixed op
launches only the ops above the thresholds, so a skipped op is never computed and never reaches this kernel.
The kernel has no skipping branch of its own: one inside it could only save the read of an output that was
already computed, and the engine passes it nothing but the ops it ran (one mechanism, not two). The weights
stay on the device; the kernel loads them itself, so the op lives inside a captured CUDA graph.

Backward, fused in one kernel: grad_xs[k] = w[k] * grad_out, and, only when the weights need a gradient
(architecture steps), grad_w[k] = <grad_out, xs[k]>: without it the inputs are not read at all. grad_w is
reduced deterministically: each program writes its partial dot products to a (K, programs) buffer that is
summed in a fixed order (no float atomics).

Byte model (what the benchmark's GB/s counts), N elements of E bytes, K inputs:
    forward                 reads K*N*E, writes N*E            (the weights: K scalars)
    backward, grad_w        reads N*E (grad) + K*N*E (inputs), writes K*N*E (grad_xs)
    backward, no grad_w     reads N*E, writes K*N*E
Accumulation is fp32 for fp32, bf16 and fp16 inputs.

Dispatch (`mixed_sum`): CUDA tensors run the Triton kernel (the `aso_se::mixed_sum` library op while
torch.compile traces, so the graph keeps it whole); CPU tensors run `mixed_sum_ref`, except under
TRITON_INTERPRET=1, where the Triton kernel itself runs on CPU tensors (how the tests check its numerics).
Layout follows STYLE.md: kernels, host launchers, autograd Function, library op, reference.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

MAX_INPUTS = 8
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BLOCK = 2048         # elements per program on CUDA: 16 fp32 per thread at 4 warps = four 128-bit loads
NUM_WARPS = 4
INTERPRET_BLOCK = 1 << 16  # under the interpreter every program is Python: few, large blocks


# --------------------------------------------------------------------------------------------- kernels
@triton.jit
def _accumulate(acc, x_ptr, w_ptr, k: tl.constexpr, offs, mask):
    w = tl.load(w_ptr + k).to(tl.float32)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    return acc + w * x.to(tl.float32)


# The inputs are eight pointer arguments, unrolled by hand below: a pointer argument cannot be indexed by a
# loop variable, and `if K > k` on the constexpr K removes the unused ones at compile time.
@triton.jit
def _mixed_sum_fwd_kernel(out_ptr, w_ptr, x0, x1, x2, x3, x4, x5, x6, x7, n,
                          K: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    acc = _accumulate(acc, x0, w_ptr, 0, offs, mask)
    if K > 1:
        acc = _accumulate(acc, x1, w_ptr, 1, offs, mask)
    if K > 2:
        acc = _accumulate(acc, x2, w_ptr, 2, offs, mask)
    if K > 3:
        acc = _accumulate(acc, x3, w_ptr, 3, offs, mask)
    if K > 4:
        acc = _accumulate(acc, x4, w_ptr, 4, offs, mask)
    if K > 5:
        acc = _accumulate(acc, x5, w_ptr, 5, offs, mask)
    if K > 6:
        acc = _accumulate(acc, x6, w_ptr, 6, offs, mask)
    if K > 7:
        acc = _accumulate(acc, x7, w_ptr, 7, offs, mask)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _backward_one(g, x_ptr, gx_ptr, w_ptr, partial_ptr, k: tl.constexpr, pid, num_programs, offs, mask,
                  GRAD_W: tl.constexpr):
    if GRAD_W:  # grad_w partial: the only reason to read the input
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(partial_ptr + k * num_programs + pid, tl.sum(g * x, axis=0))
    w = tl.load(w_ptr + k).to(tl.float32)
    tl.store(gx_ptr + offs, (w * g).to(gx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _mixed_sum_bwd_kernel(g_ptr, w_ptr, partial_ptr, x0, x1, x2, x3, x4, x5, x6, x7,
                          gx0, gx1, gx2, gx3, gx4, gx5, gx6, gx7, n,
                          K: tl.constexpr, GRAD_W: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    _backward_one(g, x0, gx0, w_ptr, partial_ptr, 0, pid, num_programs, offs, mask, GRAD_W)
    if K > 1:
        _backward_one(g, x1, gx1, w_ptr, partial_ptr, 1, pid, num_programs, offs, mask, GRAD_W)
    if K > 2:
        _backward_one(g, x2, gx2, w_ptr, partial_ptr, 2, pid, num_programs, offs, mask, GRAD_W)
    if K > 3:
        _backward_one(g, x3, gx3, w_ptr, partial_ptr, 3, pid, num_programs, offs, mask, GRAD_W)
    if K > 4:
        _backward_one(g, x4, gx4, w_ptr, partial_ptr, 4, pid, num_programs, offs, mask, GRAD_W)
    if K > 5:
        _backward_one(g, x5, gx5, w_ptr, partial_ptr, 5, pid, num_programs, offs, mask, GRAD_W)
    if K > 6:
        _backward_one(g, x6, gx6, w_ptr, partial_ptr, 6, pid, num_programs, offs, mask, GRAD_W)
    if K > 7:
        _backward_one(g, x7, gx7, w_ptr, partial_ptr, 7, pid, num_programs, offs, mask, GRAD_W)


# --------------------------------------------------------------------------------------- host launchers
def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _dense(x: torch.Tensor) -> bool:
    """Non-overlapping and dense in a layout the kernel can walk flat: contiguous or channels_last."""
    return x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last))


def _check(xs, w) -> None:
    if not 1 <= len(xs) <= MAX_INPUTS:
        raise ValueError(f"mixed_sum takes 1 to {MAX_INPUTS} inputs, got {len(xs)}")
    x0 = xs[0]
    if x0.dtype not in KERNEL_DTYPES:
        raise TypeError(f"mixed_sum supports float32, bfloat16 and float16 inputs, got {x0.dtype}")
    if w.dim() != 1 or w.numel() != len(xs):
        raise ValueError(f"mixed_sum needs one weight per input: w has shape {tuple(w.shape)} for {len(xs)} inputs")
    if w.device != x0.device:
        raise ValueError(f"mixed_sum: weights on {w.device}, inputs on {x0.device}")
    if not _dense(x0):
        raise ValueError(f"mixed_sum: input 0 is not contiguous (strides {x0.stride()}); call .contiguous() first")
    for k, x in enumerate(xs[1:], 1):
        if x.shape != x0.shape or x.dtype != x0.dtype or x.device != x0.device or x.stride() != x0.stride():
            raise ValueError(f"mixed_sum: input {k} is {x.dtype} {tuple(x.shape)} strides {x.stride()} on {x.device}, "
                             f"input 0 is {x0.dtype} {tuple(x0.shape)} strides {x0.stride()} on {x0.device}")


def _pointers(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Pad to MAX_INPUTS arguments; the kernel's constexpr K keeps it from touching the padding."""
    return list(tensors) + [tensors[0]] * (MAX_INPUTS - len(tensors))


def _launch(kernel, launch):
    return kernel if launch is None else launch(kernel)


def mixed_sum_forward(xs: list[torch.Tensor], w: torch.Tensor, *, block: int | None = None,
                      launch=None) -> torch.Tensor:
    """Run the forward kernel. `launch` wraps the kernel (torch.library.wrap_triton inside the library op)."""
    _check(xs, w)
    n = xs[0].numel()
    out = torch.empty_like(xs[0])  # keeps the inputs' layout (contiguous or channels_last)
    if n == 0:
        return out
    block = block or (INTERPRET_BLOCK if _interpreting() else BLOCK)
    grid = (triton.cdiv(n, block),)
    _launch(_mixed_sum_fwd_kernel, launch)[grid](out, w, *_pointers(xs), n, K=len(xs), BLOCK=block,
                                                 num_warps=NUM_WARPS)
    return out


def mixed_sum_backward(grad: torch.Tensor, xs: list[torch.Tensor], w: torch.Tensor, *, grad_w: bool = True,
                       block: int | None = None, launch=None) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """Run the backward kernel: (grad_xs, grad_w); grad_w is None, and no input is read, when `grad_w` is False
    (then `xs` only give the shapes: the tensors of a weight step's forward need not be kept)."""
    _check(xs, w)
    if grad.stride() != xs[0].stride():  # walk grad in the inputs' layout
        grad = torch.empty_like(xs[0]).copy_(grad)
    n = xs[0].numel()
    grad_xs = [torch.empty_like(x) for x in xs]
    if n == 0:
        return grad_xs, torch.zeros_like(w) if grad_w else None
    block = block or (INTERPRET_BLOCK if _interpreting() else BLOCK)
    programs = triton.cdiv(n, block)
    partial = torch.empty(len(xs) if grad_w else 1, programs, device=w.device, dtype=torch.float32)
    _launch(_mixed_sum_bwd_kernel, launch)[(programs,)](grad, w, partial, *_pointers(xs), *_pointers(grad_xs), n,
                                                        K=len(xs), GRAD_W=grad_w, BLOCK=block, num_warps=NUM_WARPS)
    return grad_xs, partial.sum(dim=1).to(w.dtype) if grad_w else None  # fixed-order reduction: deterministic


# ---------------------------------------------------------------------------------- autograd Function
class MixedSumFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, *xs):
        ctx.grad_w = ctx.needs_input_grad[0]
        # without a weight gradient the backward reads no input: keep only what gives their shapes
        ctx.save_for_backward(w, *(xs if ctx.grad_w else xs[:1]))
        ctx.k = len(xs)
        return mixed_sum_forward(list(xs), w)

    @staticmethod
    def backward(ctx, grad):
        w, *xs = ctx.saved_tensors
        grad_xs, grad_w = mixed_sum_backward(grad, xs if ctx.grad_w else xs * ctx.k, w, grad_w=ctx.grad_w)
        return (grad_w, *grad_xs)


# ---------------------------------------------------------------------------------------- library op
@torch.library.triton_op("aso_se::mixed_sum", mutates_args=())
def _mixed_sum_op(xs: list[torch.Tensor], w: torch.Tensor) -> torch.Tensor:
    return mixed_sum_forward(xs, w, launch=torch.library.wrap_triton)


@torch.library.triton_op("aso_se::mixed_sum_backward", mutates_args=())
def _mixed_sum_backward_op(grad: torch.Tensor, xs: list[torch.Tensor], w: torch.Tensor,
                           grad_w: bool) -> list[torch.Tensor]:
    grad_xs, gw = mixed_sum_backward(grad, xs, w, grad_w=grad_w, launch=torch.library.wrap_triton)
    return [*grad_xs, gw] if grad_w else grad_xs


def _setup_context(ctx, inputs, output):
    xs, w = inputs
    ctx.save_for_backward(w, *xs)


def _op_backward(ctx, grad):
    w, *xs = ctx.saved_tensors
    grad_w = bool(ctx.needs_input_grad[1])   # inputs are (xs, w): needs_input_grad is ([...], bool)
    grads = torch.ops.aso_se.mixed_sum_backward(grad, xs, w, grad_w)
    return (list(grads[:-1]), grads[-1]) if grad_w else (list(grads), None)


torch.library.register_autograd("aso_se::mixed_sum", _op_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------- reference
def mixed_sum_ref(xs: list[torch.Tensor], w: torch.Tensor, upcast: bool = False) -> torch.Tensor:
    """PyTorch reference with the kernel's semantics: sum_k w[k] * xs[k]. Branch-free (no host sync), so
    torch.compile traces it whole. `upcast` accumulates in float32 whatever the input dtype."""
    acc = torch.float32 if upcast else xs[0].dtype
    out = xs[0].to(acc) * w[0].to(acc)
    for k in range(1, len(xs)):
        out = out + xs[k].to(acc) * w[k].to(acc)
    return out.to(xs[0].dtype)


def mixed_sum(xs: list[torch.Tensor], w: torch.Tensor) -> torch.Tensor:
    """The engine's single weighted sum. CUDA: the Triton kernel (the library op under torch.compile);
    CPU: the reference, or the Triton kernel under TRITON_INTERPRET=1. Dtypes the kernel does not take
    (float64) use the reference everywhere."""
    if xs[0].dtype not in KERNEL_DTYPES:
        return mixed_sum_ref(xs, w)
    if xs[0].is_cuda:
        if torch.compiler.is_compiling():
            return torch.ops.aso_se.mixed_sum(list(xs), w)
        return MixedSumFn.apply(w, *xs)
    if _interpreting() and not torch.compiler.is_compiling():
        return MixedSumFn.apply(w, *xs)
    return mixed_sum_ref(xs, w)


# ------------------------------------------------------------------------------- ahead-of-time compile
def compile_for(capability: int, dtype: str = "fp32", block: int = BLOCK, k: int = 8, grad_w: bool = True) -> dict:
    """Compile both kernels for an NVIDIA target (e.g. 90 = Hopper) on any machine, GPU or not (the backward
    with or without `grad_w`); returns {"fwd": CompiledKernel, "bwd": CompiledKernel}. Must run without TRITON_INTERPRET (the interpreter
    replaces the language). Pointers and `n` are declared 16-divisible, as Triton specializes them at
    launch for aligned tensors and sizes."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    target = GPUTarget("cuda", capability, 32)
    out = {}
    for name, kernel in (("fwd", _mixed_sum_fwd_kernel), ("bwd", _mixed_sum_bwd_kernel)):
        fn = kernel if isinstance(kernel, JITFunction) else JITFunction(kernel.fn)
        signature, attrs = {}, {}
        for i, arg in enumerate(fn.arg_names):
            if arg in ("K", "GRAD_W", "BLOCK"):
                signature[arg] = "constexpr"
            elif arg == "n":
                signature[arg], attrs[(i,)] = "i32", [["tt.divisibility", 16]]
            else:
                elem = "fp32" if arg in ("w_ptr", "partial_ptr") else dtype
                signature[arg], attrs[(i,)] = f"*{elem}", [["tt.divisibility", 16]]
        constexprs = {"K": k, "BLOCK": block, **({"GRAD_W": grad_w} if name == "bwd" else {})}
        src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
        out[name] = triton.compile(src, target=target, options={"num_warps": NUM_WARPS})
    return out


def find_ptxas() -> str | None:
    """Triton's bundled ptxas, else the one on PATH, else None."""
    import shutil
    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    return bundled if os.path.exists(bundled) else shutil.which("ptxas")


def ptxas_report(ptx: str, capability: int, ptxas: str) -> dict:
    """Assemble `ptx` (from `compile_for(capability)`) with `ptxas -v`; returns the target, registers,
    spill stores/loads and shared memory it reports, the PTX's global loads and how many are 128-bit,
    and the raw report. Raises RuntimeError when ptxas rejects the PTX."""
    import re
    import subprocess
    import tempfile

    arch = f"sm_{capability}"
    target = arch + ("a" if capability == 90 and ".target sm_90a" in ptx else "")
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        proc = subprocess.run([ptxas, "-v", f"--gpu-name={target}", src, "-o", os.path.join(tmp, "k.cubin")],
                              capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"ptxas rejected the {target} kernel: {proc.stderr.strip()[:300]}")
    report = proc.stdout + proc.stderr
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    loads = [line for line in ptx.splitlines() if "ld.global" in line]
    return {"target": target,
            "registers": int(re.findall(r"Used (\d+) registers", report)[-1]),
            "spill_stores": sum(int(s) for s, _ in spills), "spill_loads": sum(int(ld) for _, ld in spills),
            "spill_reports": len(spills),
            "smem_bytes": int((re.findall(r"(\d+) bytes smem", report) or ["0"])[-1]),
            "global_loads": len(loads),
            "loads_128bit": sum(".v4.b32" in line or ".v4.f32" in line for line in loads),
            "report": report}
