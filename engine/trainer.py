"""`Trainer`: a thin facade over a run directory. It builds the run from the config (engine/build.py),
opens or resumes the run directory (engine/state.py), and hands both to the phase loop (engine/loop.py).

    Trainer(cfg, "runs/fm").run()                       a new run
    Trainer(cfg, "runs/fm", resume=True).run()          continue from checkpoints/last.pt
    Trainer(cfg, "runs/fm", resume="search.pt").run()   ... or from another checkpoint of the run
    Trainer(cfg, "runs/fm-train", genotype=g).run()     `aso-se train`: the optimize phase on a given genotype

Its attributes (net, arch, steps, loaders, final_net, ...) are views of the run for tests and benches.
"""
from __future__ import annotations

import json
import os

from .arch import PHASES
from .genotype import Genotype
from .build import Model, build_run
from .checkpoint import MetricsLog, load_checkpoint, remove_stale_temporaries, write_json
from .config import Config
from .errors import CheckpointError, DamagedCheckpoint
from .loop import PhaseLoop
from .machine import machine_info, numerics_changes
from .records import log_to_stdout
from .state import Progress, restore_run
from .stopping import CHECKPOINT_EVERY_S, StopRequest


def _silent(msg: str) -> None:
    pass


def checkpoint_files(out_dir: str) -> list[str]:
    """The run's checkpoints, newest progress first: last.pt, then the phase checkpoints from the latest phase."""
    names = ["last.pt"] + [f"{name}.pt" for name in reversed(PHASES)]
    return [n for n in names if os.path.isfile(os.path.join(out_dir, "checkpoints", n))]


def holds_run(out_dir: str) -> bool:
    """Whether `out_dir` holds work worth keeping: a checkpoint or a final record (a run killed before its first
    checkpoint left only config.json: nothing to resume, nothing lost by starting again)."""
    return bool(checkpoint_files(out_dir)) or os.path.isfile(os.path.join(out_dir, "final.json"))


class Trainer:
    def __init__(self, cfg: Config, out_dir: str, *, resume: bool | str = False, stop_after: int | None = None,
                 genotype: Genotype | None = None, log=None, checkpoint_every_s: float | None = CHECKPOINT_EVERY_S,
                 tensorboard: bool = False):
        self.cfg, self.out = cfg, out_dir
        self.stop_after, self.genotype, self.checkpoint_every_s = stop_after, genotype, checkpoint_every_s
        self.run_state = build_run(cfg)
        self.world = self.run_state.world
        self.log = (log or log_to_stdout) if self.world.main else _silent  # rank 0 alone prints and writes
        if self.world.main:
            os.makedirs(os.path.join(out_dir, "checkpoints"), exist_ok=True)
        self.metrics = MetricsLog(os.path.join(out_dir, "metrics.jsonl"), write=self.world.main)
        if resume and not holds_run(out_dir):
            self.log(f"{out_dir}: stopped before its first checkpoint; starting the run again from the beginning")
            resume = False
        if resume and self.world.main:
            for d in (out_dir, os.path.join(out_dir, "checkpoints")):
                remove_stale_temporaries(d)  # writes a kill cut short; the files they would have replaced are intact
        if resume:
            name = resume if isinstance(resume, str) else "last.pt"
            path = name if os.sep in name else os.path.join(out_dir, "checkpoints", name)
            problem = None if os.path.isfile(path) else "checkpoint not found"
            if problem is None:
                try:
                    self.progress, lines = restore_run(path, self.run_state)
                except DamagedCheckpoint as e:  # raised before anything is restored
                    problem = e.problem
            if problem is not None:  # point to the newest intact checkpoint instead
                raise CheckpointError(f"{path}: {problem}; {self._newest_intact(path)}")
            self.metrics.truncate(lines)
            p = self.progress
            at = f", step {p.step}" if p.step else ""
            self.log(f"resumed {out_dir} from {os.path.basename(path)} at {PHASES[min(p.phase_index, 3)]} epoch "
                     f"{p.epoch}{at} (global epoch {p.global_epoch})")
            if self.world.main:
                self._record_machine(resumed=True)
        else:
            self.progress = Progress()
            self.metrics.truncate(0)
            if self.world.main:
                write_json(os.path.join(out_dir, "config.json"), cfg.to_json())
                self._record_machine(resumed=False)
        self.tensorboard = None
        if tensorboard and self.world.main:  # live scalars beside metrics.jsonl (engine/tensorboard.py)
            from .tensorboard import TensorBoardSink
            self.tensorboard = TensorBoardSink(os.path.join(out_dir, "tensorboard"),
                                               purge_step=self.progress.global_epoch + 1 if resume else None)
            self.metrics.listeners.append(self.tensorboard)

    def _record_machine(self, resumed: bool) -> None:
        """machine.json: the machine the run started on (None: a run from before the record), then one entry per
        resume; a resume on a machine whose numerics differ from the last one's (engine/machine.py) is said in
        one line: the run goes on, but not bit for bit."""
        path = os.path.join(self.out, "machine.json")
        now = machine_info()
        if not resumed:
            write_json(path, {"started": now, "resumed": []})
            return
        try:
            with open(path) as f:
                record = json.load(f)
            last = (record["resumed"] or [record["started"]])[-1] or {}
            if not isinstance(last, dict):
                raise TypeError(last)
            record["resumed"].append(now)
        except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError):  # missing or unreadable
            record, last = {"started": None, "resumed": [now]}, {}
        changes = numerics_changes(last, now)
        if changes:
            self.log(f"resumed on another kind of machine ({'; '.join(changes)}): the run goes on, but its "
                     f"numbers will not equal an uninterrupted run's bit for bit")
        write_json(path, record)

    def _newest_intact(self, unusable: str) -> str:
        """What to do when `unusable` cannot be resumed from: the newest other checkpoint that loads."""
        for name in checkpoint_files(self.out):
            path = os.path.join(self.out, "checkpoints", name)
            if os.path.abspath(path) == os.path.abspath(unusable):
                continue
            try:
                load_checkpoint(path)
            except CheckpointError:
                continue
            return (f"the newest intact checkpoint is {path}: continue from it with "
                    f"aso-se search --resume {self.out} --from {name}")
        return f"no intact checkpoint in {os.path.join(self.out, 'checkpoints')}: start the run again with --out"

    def loop(self, stop: StopRequest | None = None) -> PhaseLoop:
        return PhaseLoop(self.run_state, self.out, self.progress, self.metrics, log=self.log,
                         stop_after=self.stop_after, genotype=self.genotype,
                         checkpoint_every_s=self.checkpoint_every_s, stop=stop)

    def run(self) -> dict | None:
        """Run (or continue) all phases. Returns the final record, or None if stopped by `stop_after`. SIGTERM
        and SIGINT write `last.pt` at the next step boundary and raise `Stopped` (engine/stopping.py)."""
        try:
            with StopRequest().installed() as stop:
                return self.loop(stop)()
        finally:
            if self.tensorboard is not None:
                self.tensorboard.close()

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
