"""mixed_sum benchmark: the fused Triton kernel against eager PyTorch, on DARTS feature-map shapes.

Providers
    triton      kernels.mixed_sum (CUDA only: on CPU the kernel runs only under the interpreter, which is a
                numerics tool, not a performance path; its rows print as "not measured")
    eager       the DARTS formulation, sum(w[k] * xs[k]) (what the engine runs on the CPU: mixed_sum_ref)
    compiled    torch.compile of mixed_sum_ref
Modes: fwd, bwd (given the forward's saved tensors), fwd+bwd; the backward with the weights' gradient
(grad_w: architecture steps) and without it (weight steps of soft sampling), K = 2, 4, 8 inputs. Skipping is
not benchmarked here: skipped ops never reach the sum (the mixed op does not run them).

Byte model (GB/s = useful bytes / time, the same for every provider), N elements of E bytes:
    fwd              K*N*E read + N*E written
    bwd, grad_w      N*E (grad) + K*N*E (inputs) read + K*N*E written (grad_xs)
    bwd, no grad_w   N*E read + K*N*E written
    fwd+bwd          the sum
On CUDA each row also gives pct_of_copy: its GB/s over a device-to-device copy's measured in the same run,
and times are medians from triton.testing.do_bench. Expected on an H100 (not measured here unless a GPU
was available): forward at or above 85% of copy bandwidth for large shapes and at least 3x eager.

    python bench/mixed_sum.py --json bench/results/mixed_sum.json
"""
from __future__ import annotations

import argparse

import common  # noqa: F401  (puts the repo on sys.path)
import torch

from common import median_ms
from kernels.mixed_sum import mixed_sum_backward, mixed_sum_forward, mixed_sum_ref

SHAPES = [(64, 16, 32, 32), (64, 32, 16, 16), (64, 64, 8, 8)]


def bench_cuda(fn) -> float:
    import triton.testing
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def useful_bytes(mode: str, n: int, e: int, k: int, grad_w: bool) -> int:
    fwd = k * n * e + n * e
    bwd = n * e + (k * n * e if grad_w else 0) + k * n * e
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


def eager_sum(xs, w):
    return sum(w[k] * xs[k] for k in range(len(xs)))


def make_case(provider: str, mode: str, xs, w, grad_w: bool, compiled_cache: dict):
    """A zero-argument callable doing one `mode` pass of `provider`."""
    k = len(xs)
    grad = torch.randn_like(xs[0])
    if provider == "triton":
        if mode == "fwd":
            return lambda: mixed_sum_forward(xs, w)
        if mode == "bwd":
            return lambda: mixed_sum_backward(grad, xs, w, grad_w=grad_w)
        return lambda: (mixed_sum_forward(xs, w), mixed_sum_backward(grad, xs, w, grad_w=grad_w))
    if provider == "eager":
        fn = eager_sum
    else:
        key = (k, tuple(xs[0].shape), mode, grad_w)
        if key not in compiled_cache:
            compiled_cache[key] = torch.compile(lambda xs_, w_: mixed_sum_ref(xs_, w_), dynamic=False)
        fn = compiled_cache[key]
    if mode == "fwd":
        return lambda: fn(xs, w)
    xs_g = [x.detach().requires_grad_() for x in xs]
    w_g = w.detach().requires_grad_(grad_w)
    inputs = xs_g + ([w_g] if grad_w else [])
    if mode == "bwd":
        out = fn(xs_g, w_g)
        return lambda: torch.autograd.grad(out, inputs, grad, retain_graph=True)
    return lambda: torch.autograd.grad(fn(xs_g, w_g), inputs, grad)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--ks", default="2,4,8")
    p.add_argument("--modes", default="fwd,bwd,fwd+bwd")
    p.add_argument("--reps", type=int, default=15, help="CPU timing repetitions (median)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile provider")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    cuda = device.type == "cuda"
    providers = ["triton", "eager"] + ([] if args.no_compile else ["compiled"])
    records, compiled_cache = [], {}
    # Every compiled case wraps the same lambda, so dynamo keeps all of them as cache entries of one code
    # object: past the default limit (8) it would silently run the rest eagerly.
    torch._dynamo.config.recompile_limit = 1024
    torch._dynamo.config.accumulated_recompile_limit = 4096
    for shape in SHAPES:
        n = 1
        for s in shape:
            n *= s
        copy_gbs = None
        if cuda:
            src, dst = torch.randn(shape, device=device), torch.empty(shape, device=device)
            copy_gbs = 2 * n * 4 / bench_cuda(lambda: dst.copy_(src)) / 1e6
        for k in [int(v) for v in args.ks.split(",")]:
            xs = [torch.randn(shape, device=device) for _ in range(k)]
            w = torch.rand(k, device=device) + 0.1
            for mode in args.modes.split(","):
                for grad_w in ((True,) if mode == "fwd" else (True, False)):
                    for provider in providers:
                        rec = {"provider": provider, "device": device.type, "shape": list(shape), "K": k,
                               "mode": mode, "grad_w": grad_w if mode != "fwd" else None}
                        if provider == "triton" and not cuda:
                            rec.update(ms=None, gb_per_s=None, note="not measured: no GPU")
                        else:
                            case = make_case(provider, mode, xs, w, grad_w, compiled_cache)
                            ms = bench_cuda(case) if cuda else median_ms(case, args.reps)  # warm-ups compile
                            gbs = useful_bytes(mode, n, 4, k, grad_w) / ms / 1e6
                            rec.update(ms=round(ms, 4), gb_per_s=round(gbs, 2))
                            if cuda:
                                rec["pct_of_copy"] = round(100 * gbs / copy_gbs, 1)
                        records.append(rec)
                        print(f"  {provider:<9} {mode:<7} K={k} grad_w={rec['grad_w']} "
                              f"{'x'.join(map(str, shape)):<12} "
                              f"{rec['ms'] if rec['ms'] is not None else 'not measured'} ms", flush=True)
    # speed-up over eager, per (shape, K, mode, grad_w)
    def case(r):
        return tuple(r["shape"]), r["K"], r["mode"], r["grad_w"]
    eager = {case(r): r["ms"] for r in records if r["provider"] == "eager"}
    for r in records:
        base = eager[case(r)]
        r["vs_eager"] = round(base / r["ms"], 2) if r["ms"] else None
    for r in records:
        r["shape_str"] = "x".join(map(str, r["shape"]))
    cols = ["provider", "mode", "grad_w", "shape_str", "K", "ms", "gb_per_s", "vs_eager"] + (["pct_of_copy"] if cuda else [])
    common.print_table([r for r in records if r["ms"] is not None], cols,
                       title=f"\nmixed_sum on {device.type} (fp32; vs_eager = eager ms / provider ms)")
    if not cuda:
        print("triton: not measured (no GPU on this machine; the kernel's numerics are tested under "
              "TRITON_INTERPRET=1 and its compilation for sm_80/sm_90 with ptxas)")
    for r in records:
        r.pop("shape_str")
    common.write_json(args.json, records, bench="mixed_sum", device=device.type)


if __name__ == "__main__":
    main()
