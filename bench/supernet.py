"""Supernet forward+backward cost by execution mode, at batch 64, for a 28x28 and a 32x32 input:

    dense        the DARTS formulation: every op on every edge, softmax weights (eager baseline)
    soft-skip    Gumbel-softmax soft weights with dominant-op skipping (skip_threshold, dominant_threshold)
    hard         hard Gumbel sampling: exactly one op per edge
Each mode does forward + backward to the weights and the logits (an architecture step's graph plus weight
gradients), eager, in the engine's memory format; medians of --reps after one warm-up, all in one run.

    python bench/supernet.py --json bench/results/supernet.json
"""
from __future__ import annotations

import argparse
import statistics
import time

import common  # noqa: F401
import torch
import torch.nn.functional as F

from engine.arch import Architecture
from engine.genotype import CELL_TYPES
from engine.baseline import EagerDarts
from engine.network import Network, count_parameters, darts_spec


def run(mode: str, net, arch, x, y, gen, memory_format) -> None:
    if mode == "dense":  # the eager DARTS baseline, in the engine's memory format
        EagerDarts(net, arch, memory_format=memory_format).forward_backward(x, y, "search")
        return
    net.zero_grad(set_to_none=True)
    arch.zero_grad(set_to_none=True)
    F.cross_entropy(net(x, arch.sample("search", grad=True, generator=gen)), y).backward()



def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--channels", type=int, default=16)
    p.add_argument("--layers", type=int, default=5)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--tau", type=float, default=1.0)
    p.add_argument("--skip-threshold", type=float, default=0.05)
    p.add_argument("--dominant-threshold", type=float, default=0.6)
    p.add_argument("--channels-last", type=int, default=1)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    records = []
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    for size, in_ch in ((28, 1), (32, 3)):
        torch.manual_seed(0)
        net = Network(darts_spec(in_ch, 10, args.channels, args.layers))
        x = torch.randn(args.batch, in_ch, size, size)
        if args.channels_last:
            net = net.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 10, (args.batch,))
        for mode in ("dense", "soft-skip", "hard"):
            arch = Architecture(hard=mode == "hard", skip_threshold=args.skip_threshold,
                                dominant_threshold=args.dominant_threshold)
            arch.tau = args.tau
            gen = torch.Generator().manual_seed(1)
            run(mode, net, arch, x, y, gen, fmt)  # warm-up
            times, executed = [], []
            for _ in range(args.reps):
                t0 = time.perf_counter()
                run(mode, net, arch, x, y, gen, fmt)
                times.append(time.perf_counter() - t0)
                if mode != "dense":
                    s = arch.sample("search", generator=gen)
                    executed.append(sum(len(a) for t in CELL_TYPES for a in s[t].active) / (2 * arch.edges))
            ms = statistics.median(times) * 1e3
            records.append({"input": f"{in_ch}x{size}x{size}", "mode": mode, "batch": args.batch,
                            "params": count_parameters(net), "ms": round(ms, 1),
                            "ops_per_edge": round(statistics.mean(executed), 2) if executed else 8.0})
            print(f"  {size}x{size} {mode:<9} {ms:8.1f} ms", flush=True)
        dense = next(r["ms"] for r in records if r["input"].endswith(f"{size}x{size}") and r["mode"] == "dense")
        for r in records:
            if r["input"].endswith(f"{size}x{size}"):
                r["vs_dense"] = round(dense / r["ms"], 2)
    common.print_table(records, ["input", "mode", "batch", "params", "ms", "ops_per_edge", "vs_dense"],
                       title=f"\nsupernet forward+backward, C={args.channels}, {args.layers} cells, tau {args.tau}, "
                             f"soft-skip thresholds {args.skip_threshold}/{args.dominant_threshold}")
    common.write_json(args.json, records, bench="supernet", **vars(args))


if __name__ == "__main__":
    main()
