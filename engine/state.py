"""Run state: the progress counters of a run, and everything a resume needs, saved and restored in one place.

`Progress` is what the phase loop advances; `save_run` writes it together with the models, optimizers,
architecture and every random generator into one checkpoint (atomically, engine/checkpoint.py);
`restore_run` puts all of it back into a freshly built `Run`, so the resumed run replays exactly the
batches, Gumbel samples and augmentations of an uninterrupted one.
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass, field

import numpy as np
import torch

from . import distributed
from .genotype import Genotype
from .build import Run, resolve_device
from .checkpoint import load_checkpoint, save_checkpoint
from .config import Config
from .errors import CheckpointError
from .network import NetSpec

# config fields that change no result: a resume may set them differently (e.g. `--resume DIR --nvtx`)
OBSERVATION_FIELDS = ("nvtx", "log_interval")


@dataclass
class Progress:
    phase_index: int = 0                 # phase in PHASES
    epoch: int = 0                       # epochs finished in that phase
    step: int = 0                        # steps finished in the current epoch (a mid-epoch checkpoint)
    sums: dict | None = None             # ... and the epoch's running sums (records.EpochSums) up to there
    global_epoch: int = 0
    global_step: int = 0                 # supernet weight steps
    arch_steps: int = 0
    arch_stream: tuple = (0, 0)          # (epoch, position) of the val batches for architecture steps
    growth_history: list = field(default_factory=list)
    val_history: list = field(default_factory=list)   # val accuracy of search and growth epochs
    elapsed: float = 0.0
    skipped: int = 0                     # steps skipped for a non-finite loss or gradient


def computed_fields(config: dict) -> dict:
    """The fields a result depends on. The device counts by its kind only: "auto" on a machine without a GPU
    computes what "cpu" does, so `--resume DIR --device cpu` continues an "auto" run. A field the config lacks
    (written before the field existed) counts at its default, which is what that engine did."""
    fields = {k: v for k, v in {**Config().to_json(), **config}.items() if k not in OBSERVATION_FIELDS}
    if "device" in fields:
        fields["device"] = resolve_device(fields["device"]).type
    return fields


def save_run(path: str, run: Run, progress: Progress, metrics_lines: int) -> None:
    """Every rank calls it (the ranks' BatchNorm statistics are gathered); rank 0 alone writes."""
    arch, sup, world = run.arch, run.supernet, run.world
    rank_buffers = {"supernet": distributed.gather_buffers(sup.net, world),
                    "final": distributed.gather_buffers(run.final.net, world) if run.final is not None else None}
    if not world.main:
        return
    state = {
        "config": run.cfg.to_json(), "spec": sup.net.spec.to_json(), "genotype": arch.genotype().to_json(),
        "phase_index": progress.phase_index, "epoch": progress.epoch, "global_epoch": progress.global_epoch,
        "step_in_epoch": progress.step, "epoch_sums": progress.sums,
        "global_step": progress.global_step, "arch_steps": progress.arch_steps,
        "arch_stream": list(progress.arch_stream),
        "supernet": sup.net.state_dict(), "arch": arch.state_dict(), "tau": arch.tau, "skip_bias": arch.skip_bias,
        "arch_counters": {**dict(zip(("nan_events", "repaired_rows"), arch.state.counts.tolist())),
                          "histogram": arch.state.histogram, **arch.state.gradient_sums()},
        "weight_opt": sup.opt.state_dict(), "arch_opt": run.arch_opt.state_dict(),
        "final_genotype": None, "final_net": None, "final_opt": None,
        "rng": {"torch": torch.get_rng_state(), "gumbel": run.gumbel.get_state(),
                "numpy": _numpy_state(), "python": list(random.getstate()[1])},
        "metrics_lines": metrics_lines, "growth_history": progress.growth_history,
        "val_history": progress.val_history, "elapsed_s": progress.elapsed, "skipped": progress.skipped,
        "world_size": world.size, "rank_buffers": rank_buffers if world.active else None,
    }
    if run.final is not None:
        state.update(final_genotype=run.final.net.genotype.to_json(), final_spec=run.final.net.spec.to_json(),
                     final_net=run.final.net.state_dict(),
                     final_opt=run.final.opt.state_dict())
    save_checkpoint(state, path)


def restore_run(path: str, run: Run) -> tuple[Progress, int]:
    """Load the checkpoint at `path` into `run` (built from the same config). Returns the progress and the
    number of metrics lines the checkpoint had written (later lines are epochs to redo)."""
    state = load_checkpoint(path)
    if computed_fields(state["config"]) != computed_fields(run.cfg.to_json()):
        config = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(path))), "config.json")
        raise CheckpointError(f"{path}: written with a different config than {config}; "
                              f"resume without --set/--preset changes")
    written = state.get("world_size", 1)
    if written != run.world.size:
        raise CheckpointError(f"{path}: written by a run on {written} rank(s), resumed on {run.world.size}: resume "
                              f"with as many (torchrun --nproc_per_node={written} ..., or without torchrun for 1)")
    try:
        spec = NetSpec.from_json(state["spec"])
        if spec != run.supernet.net.spec:
            run.new_supernet(spec)
        run.supernet.net.load_state_dict(state["supernet"])
        run.arch.load_state_dict(state["arch"])
        run.supernet.opt.load_state_dict(state["weight_opt"])
        run.arch_opt.load_state_dict(state["arch_opt"])
        run.supernet.steps.configure_optimizers()  # the loaded flags are the writer's device's (fused or not)
        if state["final_net"] is not None:
            final = run.build_final(Genotype.from_json(state["final_genotype"], path))
            final.net.load_state_dict(state["final_net"])
            final.opt.load_state_dict(state["final_opt"])
            final.steps.configure_optimizers()
        saved = state.get("rank_buffers")
        if saved is not None:  # each rank's own BatchNorm statistics
            for name, model in (("supernet", run.supernet), ("final", run.final)):
                if saved.get(name) is not None:
                    distributed.load_buffers_(model.net, saved[name][run.world.rank])
    except (RuntimeError, KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: incompatible checkpoint ({str(e).splitlines()[0][:160]})") from None
    arch = run.arch
    arch.tau = state["tau"]
    arch.skip_bias = state.get("skip_bias", 0.0)  # the next step's hand-over bias (absent before issue 13)
    counters = state["arch_counters"]
    arch.state.nan_events, arch.state.repaired_rows = counters["nan_events"], counters["repaired_rows"]
    arch.state.histogram = counters["histogram"]
    if "grad_sum" in counters:  # absent in checkpoints written before the drift was recorded: it restarts
        try:
            arch.state.load_gradient_sums(counters)
        except (KeyError, RuntimeError, TypeError) as e:
            raise CheckpointError(f"{path}: incompatible checkpoint (arch_counters: {str(e).splitlines()[0][:160]})") \
                from None
    progress = Progress(phase_index=state["phase_index"], epoch=state["epoch"], global_epoch=state["global_epoch"],
                        step=state.get("step_in_epoch", 0), sums=state.get("epoch_sums"),
                        global_step=state["global_step"], arch_steps=state["arch_steps"],
                        arch_stream=tuple(state["arch_stream"]), growth_history=state["growth_history"],
                        val_history=state["val_history"], elapsed=state["elapsed_s"], skipped=state["skipped"])
    rng = state["rng"]
    torch.set_rng_state(rng["torch"])
    run.gumbel.set_state(rng["gumbel"])
    np.random.set_state(("MT19937", np.asarray(rng["numpy"][0], dtype=np.uint32), *rng["numpy"][1:]))
    random.setstate((3, tuple(rng["python"]), None))
    return progress, state["metrics_lines"]


def _numpy_state() -> list:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return [keys.tolist(), int(pos), int(has_gauss), float(cached)]

