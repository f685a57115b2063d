"""`aso-se profile`: a torch.profiler Chrome trace per phase and the top ops by self time.

Each phase runs 2 untimed warm-up steps (compiles, allocator warm-up) and then `steps` profiled steps of
exactly what the trainer runs in that phase (search and growth: a weight step plus an architecture step).
Open the traces in chrome://tracing or https://ui.perfetto.dev. For Nsight Systems use NVTX instead:
`nsys profile -t cuda,nvtx aso-se search ... --nvtx` (see README).
"""
from __future__ import annotations

import os

import torch
from torch.profiler import ProfilerActivity, profile

from .arch import PHASES
from .build import build_run
from .config import Config
from .data import Cycle
from .profiling import nvtx_range


def profile_phases(cfg: Config, out: str, steps: int = 5, top: int = 12, log=print) -> dict[str, str]:
    os.makedirs(out, exist_ok=True)
    run = build_run(cfg)
    cuda = run.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    train, arch = Cycle(run.loaders["train"]), Cycle(run.loaders["arch"])
    traces = {}
    for phase in PHASES:
        if phase == "optimize":
            run_steps, data = run.build_final(run.arch.genotype()).steps, Cycle(run.loaders["optimize"])
        else:
            run_steps, data = run.supernet.steps, train
        run_steps.prepare(None if phase == "optimize" else phase)

        def one_step():
            x, y = next(data)
            with nvtx_range("weight_step"):
                run_steps.weight_step(x, y, None if phase == "optimize" else phase)
            if phase in ("search", "growth"):
                xa, ya = next(arch)
                with nvtx_range("arch_step"):
                    run_steps.arch_step(xa, ya, phase)

        for _ in range(2):
            one_step()
        with profile(activities=activities) as prof:
            for _ in range(steps):
                one_step()
                if cuda:
                    torch.cuda.synchronize()
        path = os.path.join(out, f"{phase}.json")
        prof.export_chrome_trace(path)
        traces[phase] = path
        key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        log(f"== {phase}: {steps} steps, top {top} ops by self time -> {path}")
        log(prof.key_averages().table(sort_by=key, row_limit=top))
    return traces
