"""Step throughput per phase and variant:

    eager-dense       the DARTS formulation: every op on every edge, softmax weights (warmup: one-hot
                      skip weights), eager, contiguous memory format, DARTS' own dilated convs; its
                      architecture step back-propagates into every weight too (DARTS' first-order `loss.backward()`)
    engine-eager      the engine's steps, eager: hard sampling, one op per edge, logit-only gradients for
                      architecture steps, channels_last on the CPU, strided dilated convs on the even pixels
    engine-compiled   the engine's steps with `compile=on` (static graphs for warmup/optimize, per-op graphs
                      for search); compile time is measured apart and kept out of it/s

One search iteration is one weight step plus its share (1/arch_every) of an architecture step, their samples drawn
together as the run loop draws them (Steps.prefetch: one host read per iteration sync-free, as on CUDA; the CPU steps
also read `ok` on the host, 5 per search iteration). Each
variant starts from empty compile caches (and, on CUDA, empty CUDA-graph trees), runs `--warmup-iters` untimed
iterations (and, compiled, its precompile), then `--iters` timed ones; on CUDA the clock is read only after
`torch.cuda.synchronize()`. `host_reads_it`: host reads per iteration (engine/hostreads.py: each one makes the
host wait for the device on a GPU), counted over `--read-iters` further untimed iterations, run eagerly.
`amortized_it_s` spreads the compile time over that phase's budget in the fashion-mnist preset, the
figure the engine's CPU default is chosen by.

    python bench/step.py --preset fashion-mnist --json bench/results/step-fmnist.json
    python bench/step.py --preset cifar10 --synthetic --json bench/results/step-cifar10.json
"""
from __future__ import annotations

import argparse
import time

import common  # noqa: F401
import torch

from engine.baseline import EagerDarts, darts_convolutions
from engine.build import build_run
from engine.config import preset
from engine.compile import reset as reset_compiled
from engine.data import Cycle
from engine.hostreads import HostReads
from engine.network import count_parameters

PHASES = ("warmup", "search", "optimize")


def fresh_caches(device: torch.device) -> None:
    """Nothing compiled or recorded by an earlier variant may serve (or slow) the next one."""
    reset_compiled()
    if device.type == "cuda":
        from torch._inductor import cudagraph_trees
        cudagraph_trees.reset_cudagraph_trees()
        torch.cuda.synchronize()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(cfg, phase: str, variant: str, iters: int, warmup_iters: int, read_iters: int = 3) -> dict:
    compiled = variant == "engine-compiled"
    run = build_run(cfg.override([f"compile={'on' if compiled else 'off'}"]))
    fresh_caches(run.device)
    if phase == "optimize":
        model = run.build_final(run.arch.genotype())
        if variant == "eager-dense":
            darts_convolutions(model.net.to(memory_format=torch.contiguous_format))
            model.steps.channels_last = False
    else:
        model = run.supernet
    steps = model.steps
    runner = None
    if variant == "eager-dense" and phase != "optimize":
        runner = EagerDarts(model.net.to(memory_format=torch.contiguous_format), run.arch, model.opt, run.arch_opt)
    loader = run.loaders["optimize" if phase == "optimize" else "train"]
    data = Cycle(loader)
    arch_data = Cycle(run.loaders["arch"]) if "arch" in run.loaders else None
    every = cfg.arch_every
    mon = steps.monitor
    run.arch.tau = 1.0
    count = {"i": 0}

    def iteration():
        arch_due = phase == "search" and (count["i"] + 1) % every == 0
        if phase == "search" and runner is None:  # as the loop does: the iteration's samples, one transfer
            steps.prefetch(phase, [(False, run.arch.tau, 0.0)] + [(True, run.arch.tau, 0.0)] * arch_due)
        x, y = next(data)
        p = None if phase == "optimize" else phase
        (runner or steps).weight_step(x, y, p)
        images = len(y)
        count["i"] += 1
        if arch_due:
            xa, ya = next(arch_data)
            (runner or steps).arch_step(xa, ya, phase)
            images += len(ya)
        return images

    compile_s = 0.0
    if compiled:
        x, y = next(data)
        t0 = time.perf_counter()
        steps.precompile(x, y, None if phase == "optimize" else phase)
        sync(run.device)
        compile_s = time.perf_counter() - t0
    else:
        steps.prepare(None if phase == "optimize" else phase)
    for _ in range(warmup_iters):
        iteration()
    before = mon.totals() if mon else {"compiles": 0, "recompiles": 0, "compile_s": 0.0}
    if compiled:
        compile_s = max(compile_s, before["compile_s"])
    images = 0
    sync(run.device)
    t0 = time.perf_counter()
    for _ in range(iters):
        images += iteration()
    sync(run.device)
    dt = time.perf_counter() - t0
    after = mon.totals() if mon else before
    with torch.compiler.set_stance("force_eager"), HostReads() as reads:  # the same Python, no compile triggered
        for _ in range(read_iters):
            iteration()
    return {"phase": phase, "variant": variant, "it_s": round(iters / dt, 3), "images_s": round(images / dt, 1),
            "compile_s": round(compile_s, 1), "recompiles": after["recompiles"] - before["recompiles"],
            "compiles_timed": after["compiles"] - before["compiles"], "params": count_parameters(model.net),
            "host_reads_it": round(reads.count / read_iters, 2), "sync_free": steps.sync_free,
            "steps_per_epoch": len(loader)}


def growth_run(cfg, events: list[str], iters: int) -> list[dict]:
    """Search-step it/s and FLOPs per step on the supernet before and after each growth event. Timing and
    FLOP counting replay the same Gumbel samples (the generator is re-seeded), so the two are comparable."""
    from torch.utils.flop_counter import FlopCounterMode

    from engine import growth

    records = []
    run = build_run(cfg.override(["compile=off"]))
    run.arch.tau = 1.0
    run.arch.skip_bias = 0.0
    batches = Cycle(run.loaders["train"]).take(iters + 2)
    arch_batches = Cycle(run.loaders["arch"]).take(iters + 2)

    def steps(n, start=0):
        run.gumbel.manual_seed(1234)
        for i in range(start, start + n):
            run.supernet.steps.weight_step(*batches[i], "growth")
            run.supernet.steps.arch_step(*arch_batches[i], "growth")

    def measure(label):
        steps(2)  # warm-up
        t0 = time.perf_counter()
        steps(iters)
        dt = time.perf_counter() - t0
        with FlopCounterMode(display=False) as counter:
            steps(iters)
        net = run.supernet.net
        rec = {"after": label, "cells": len(net.cells), "channels": net.spec.cells[0].c,
               "params": count_parameters(net), "it_s": round(iters / dt, 3),
               "gflop_per_it": round(counter.get_total_flops() / iters / 1e9, 3)}
        print(f"  {label:<12} {rec['it_s']:.3f} it/s  {rec['gflop_per_it']:.3f} GFLOP/it  "
              f"{rec['params']:,} params", flush=True)
        return rec

    records.append(measure("start"))
    for kind in events:
        grown = growth.grow(run.supernet.net, run.supernet.opt, run.arch, run.probe_batch(), kind,
                            width_factor=cfg.grow_width_factor)
        run.adopt_supernet(grown.net, grown.opt)
        records.append(measure(f"grow_{kind}"))
    base = records[0]
    for r in records:
        r["it_s_ratio"] = round(r["it_s"] / base["it_s"], 3)
        r["time_per_it_ratio"] = round(base["it_s"] / r["it_s"], 3)
        r["flop_ratio"] = round(r["gflop_per_it"] / base["gflop_per_it"], 3)
    return records


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="fashion-mnist")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--synthetic", action="store_true", help="synthetic data of the preset's image shape "
                   "(cifar10 when the data set is not on this machine)")
    p.add_argument("--phases", default=",".join(PHASES))
    p.add_argument("--variants", default="eager-dense,engine-eager,engine-compiled")
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--dense-iters", type=int, default=5, help="timed iterations for eager-dense (slow)")
    p.add_argument("--warmup-iters", type=int, default=2)
    p.add_argument("--growth-events", default="", help="e.g. depth,width: measure search steps before and "
                   "after each growth event instead of the phase table")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    cfg = preset(args.preset).override(args.overrides)
    if args.synthetic:
        size, ch = (32, 3) if args.preset == "cifar10" else (28, 1)
        cfg = cfg.override(["dataset=synthetic", f"synthetic_size={size}", f"synthetic_channels={ch}",
                            "synthetic_train=4096", "synthetic_test=256", "loader=tensor"])
    if args.growth_events:
        records = growth_run(cfg, args.growth_events.split(","), args.iters)
        common.print_table(records, ["after", "cells", "channels", "params", "it_s", "gflop_per_it",
                                     "time_per_it_ratio", "flop_ratio"],
                           title=f"\ngrowth run, preset {args.preset}: search iterations (weight + architecture "
                                 f"step) before and after each event; ratios against the start")
        common.write_json(args.json, records, bench="step-growth", preset=args.preset, config=cfg.to_json())
        return
    budget_cfg = preset("fashion-mnist")
    records = []
    for phase in args.phases.split(","):
        for variant in args.variants.split(","):
            iters = args.dense_iters if variant == "eager-dense" else args.iters
            rec = measure(cfg, phase, variant, iters, 1 if variant == "eager-dense" else args.warmup_iters)
            budget_epochs = getattr(budget_cfg, f"{phase}_epochs")
            budget_steps = max(1, int(budget_epochs * rec["steps_per_epoch"]))
            rec["amortized_it_s"] = round(budget_steps / (budget_steps / rec["it_s"] + rec["compile_s"]), 3)
            rec.update(preset=args.preset, device=cfg.device, batch_size=cfg.batch_size if phase != "optimize"
                       else cfg.optimize_batch_size, arch_every=cfg.arch_every, budget_steps=budget_steps)
            records.append(rec)
            print(f"  {phase:<8} {variant:<15} {rec['it_s']:8.3f} it/s  {rec['images_s']:8.1f} img/s  "
                  f"compile {rec['compile_s']:.1f}s  recompiles {rec['recompiles']}  "
                  f"host reads/it {rec['host_reads_it']}", flush=True)
    for phase in {r["phase"] for r in records}:
        rows = [r for r in records if r["phase"] == phase]
        dense = next((r for r in rows if r["variant"] == "eager-dense"), None)
        for r in rows:
            r["vs_eager_dense"] = round(r["it_s"] / dense["it_s"], 2) if dense else None
    order = {ph: i for i, ph in enumerate(PHASES)}
    records.sort(key=lambda r: (order.get(r["phase"], 9), r["variant"]))
    common.print_table(records, ["phase", "variant", "it_s", "images_s", "vs_eager_dense", "compile_s",
                                 "recompiles", "amortized_it_s", "host_reads_it", "params"],
                       title=f"\nsteps, preset {args.preset}{' (synthetic data)' if args.synthetic else ''}, "
                             f"batch {cfg.batch_size}, arch_every {cfg.arch_every}; amortized over the "
                             f"fashion-mnist preset's phase budget")
    common.write_json(args.json, records, bench="step", preset=args.preset, synthetic=args.synthetic,
                      config=cfg.to_json())


if __name__ == "__main__":
    main()
