"""`Trainer`: a thin facade over a run directory. It builds the run from the config (engine/build.py),
opens or resumes the run directory (engine/state.py), and hands both to the phase loop (engine/loop.py).

    Trainer(cfg, "runs/fm").run()                       a new run
    Trainer(cfg, "runs/fm", resume=True).run()          continue from checkpoints/last.pt
    Trainer(cfg, "runs/fm-train", genotype=g).run()     `aso-se train`: the optimize phase on a given genotype

Its attributes (net, arch, steps, loaders, final_net, ...) are views of the run for tests and benches.
"""
from __future__ import annotations

import os

from .arch import PHASES, Genotype
from .build import Model, build_run
from .checkpoint import MetricsLog, write_json
from .config import Config
from .loop import PhaseLoop
from .records import log_to_stdout
from .state import Progress, restore_run


class Trainer:
    def __init__(self, cfg: Config, out_dir: str, *, resume: bool = False, stop_after: int | None = None,
                 genotype: Genotype | None = None, log=None):
        self.cfg, self.out = cfg, out_dir
        self.stop_after, self.genotype = stop_after, genotype
        self.log = log or log_to_stdout
        self.run_state = build_run(cfg)
        os.makedirs(os.path.join(out_dir, "checkpoints"), exist_ok=True)
        self.metrics = MetricsLog(os.path.join(out_dir, "metrics.jsonl"))
        if resume:
            self.progress, lines = restore_run(os.path.join(out_dir, "checkpoints", "last.pt"), self.run_state)
            self.metrics.truncate(lines)
            p = self.progress
            self.log(f"resumed {out_dir} at {PHASES[min(p.phase_index, 3)]} epoch {p.epoch} "
                     f"(global epoch {p.global_epoch})")
        else:
            self.progress = Progress()
            self.metrics.truncate(0)
            write_json(os.path.join(out_dir, "config.json"), cfg.to_json())

    def loop(self) -> PhaseLoop:
        return PhaseLoop(self.run_state, self.out, self.progress, self.metrics, log=self.log,
                         stop_after=self.stop_after, genotype=self.genotype)

    def run(self) -> dict | None:
        """Run (or continue) all phases. Returns the final record, or None if stopped by `stop_after`."""
        return self.loop()()

    def grow(self, kind: str) -> dict:
        """One growth event on the supernet now (the policy not asked): its event record."""
        return self.loop().grow(kind)

    def build_final(self, genotype: Genotype) -> Model:
        return self.run_state.build_final(genotype)

    def probe_batch(self):
        return self.run_state.probe_batch()

    # views of the run
    device = property(lambda self: self.run_state.device)
    loaders = property(lambda self: self.run_state.loaders)
    arch = property(lambda self: self.run_state.arch)
    net = property(lambda self: self.run_state.supernet.net)
    weight_opt = property(lambda self: self.run_state.supernet.opt)
    steps = property(lambda self: self.run_state.supernet.steps)
    final_net = property(lambda self: self.run_state.final.net if self.run_state.final is not None else None)
    final_steps = property(lambda self: self.run_state.final.steps if self.run_state.final is not None else None)
