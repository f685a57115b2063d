"""The phase loop: warmup -> search -> growth -> optimize, then one test evaluation.

    warmup    weights only; every edge is skip_connect
    search    weight steps on the train split, an architecture step on the val split every `arch_every`
              weight steps (first-order DARTS), Gumbel temperature annealed
    growth    search goes on; a growth event (engine/growth.py) may deepen or widen the supernet between epochs
    optimize  the derived genotype is fixed and its network trained (train+val by default)

Each phase is data (`Phase`: which model, which loader, which steps, what learning rate horizon, what is
evaluated); the loop orders epochs and events. The records and `last.pt` follow every epoch, and `last.pt`
also every `checkpoint_every_s` seconds at a step boundary (with the loader positions and the epoch's running
sums) and on SIGTERM/SIGINT (engine/stopping.py), so `--resume` continues from that step exactly. Steps live in engine/steps.py, schedules in
engine/schedules.py, records in engine/records.py, the checkpointed state in engine/state.py.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch

from . import distributed, growth
from .arch import PHASES
from .genotype import Genotype
from .build import Model, Run
from .checkpoint import MetricsLog, write_json
from .cost import fmt as fmt_cost, macs as count_macs
from .data import Cycle
from .errors import TrainingError
from .network import count_parameters, same_network
from .profiling import nvtx_range
from .records import EpochSums, epoch_line, epoch_record, final_line, final_record, growth_line, progress_bar
from .schedules import SEARCHING_PHASES, SUPERNET_PHASES, Budget, cosine_lr, handover_bias, temperature_at
from .state import Progress, save_run
from .stopping import CheckpointClock, StopRequest, Stopped

SYNC_STEPS = 16  # data-parallel: rank 0's checkpoint/stop decision reaches the other ranks every this many steps


@dataclass
class Phase:
    """What one phase runs: the model and loader its steps use, its learning-rate schedule, and what its
    epochs evaluate (`eval_as`: the supernet's architecture policy, None for the derived network; `evaluate`
    False where the val split is missing or trained on)."""
    name: str
    model: Model
    loader: object
    lr: float
    lr_steps: int          # the cosine schedule's horizon, in weight steps
    supernet: bool
    searching: bool
    evaluate: bool
    eval_as: str | None
    loaders: dict          # where `loader` comes from, with the arch and val loaders the epoch uses


class PhaseLoop:
    def __init__(self, run: Run, out: str, progress: Progress, metrics: MetricsLog, *, log,
                 stop_after: int | None = None, genotype: Genotype | None = None,
                 checkpoint_every_s: float | None = None, stop: StopRequest | None = None):
        self.run, self.cfg, self.out, self.p, self.metrics, self.log = run, run.cfg, out, progress, metrics, log
        self.stop_after = stop_after    # stop (as if interrupted) after this many epochs in this process
        self.genotype = genotype        # `aso-se train`: optimize this genotype instead of the searched one
        self.clock = CheckpointClock(checkpoint_every_s)   # mid-epoch checkpoints
        self.stop = stop or StopRequest()                   # SIGTERM / SIGINT, read at step boundaries
        self.world = run.world

    @property
    def budget(self) -> Budget:
        opt = self.run.loaders.get("optimize")
        return Budget(self.cfg, len(self.run.loaders["train"]), len(opt) if opt is not None else None)

    def phase(self, name: str) -> Phase:
        run, cfg, budget = self.run, self.cfg, self.budget
        if name in SUPERNET_PHASES:  # the curriculum's data in the run's first epochs, the data set's after
            loaders = run.supernet_loaders(self.p.global_epoch)
            return Phase(name, run.supernet, loaders["train"], cfg.lr, budget.supernet_steps(), True,
                         name in SEARCHING_PHASES, "val" in loaders, "warmup" if name == "warmup" else "argmax",
                         loaders)
        # the search evaluates the most likely architecture, not the genotype: its skip cap forces ops into the
        # cell that the search has barely trained yet (measured 14% vs 64%)
        return Phase(name, run.final, run.loaders["optimize"], cfg.optimize_lr, budget.phase_steps("optimize"),
                     False, False, cfg.optimize_data == "train" and "val" in run.loaders, None, run.loaders)

    # ------------------------------------------------------------------------------------------ phases
    def __call__(self) -> dict | None:
        """Run (or continue) all phases. Returns the final record, or None if stopped by `stop_after`."""
        p = self.p
        t_start = time.perf_counter() - p.elapsed
        epochs_here = 0
        while p.phase_index < len(PHASES):
            name = PHASES[p.phase_index]
            if p.epoch == 0 and p.step == 0:
                self.enter(name)
            with nvtx_range(name):
                while p.epoch < self.budget.epochs(name):
                    if self.stop_after is not None and epochs_here >= self.stop_after:
                        self.log(f"stopped after {epochs_here} epoch(s); continue with --resume {self.out}")
                        return None
                    if name == "growth" and p.step == 0:
                        self.maybe_grow()  # at the start of a growth epoch: the grown network then trains
                    if p.step == 0:
                        self.announce_data()
                    with nvtx_range(f"epoch {p.epoch}"):
                        record = self.epoch(self.phase(name), t_start)
                    p.epoch += 1
                    p.global_epoch += 1
                    p.step, p.sums = 0, None
                    epochs_here += 1
                    p.elapsed = time.perf_counter() - t_start
                    record["elapsed_s"] = round(p.elapsed, 2)
                    self.metrics.append(record)
                    self.log(epoch_line(record))
                    if record.get("val_acc") is not None and name in SEARCHING_PHASES:
                        p.val_history.append(record["val_acc"])
                    self.check_ranks(f"after {name} epoch {p.epoch}")
                    self.save("last.pt")
                    self.rank0_decision()  # a stop asked of any rank stops all after this epoch
                    self.stop_if_asked(f"after {name} epoch {p.epoch}")
            self.save(f"{name}.pt")
            p.phase_index += 1
            p.epoch = 0
        return self.finish(time.perf_counter() - t_start)

    def announce_data(self) -> None:
        """With a curriculum, a line where the run's data changes: at its first epoch and at the switch."""
        cfg, epoch = self.cfg, self.p.global_epoch
        if cfg.curriculum and epoch == 0:
            self.log(f"   data: {cfg.curriculum} (the curriculum) for the first {cfg.curriculum_epochs} epoch(s)")
        elif cfg.curriculum and epoch == cfg.curriculum_epochs:
            self.log(f"   data: {cfg.dataset} from here on (the curriculum is over)")

    def enter(self, name: str) -> None:
        run, cfg = self.run, self.cfg
        budget = self.budget.epochs_budget(name)
        if budget == 0:
            return
        self.log(f"== {name}: {budget:g} epoch(s)")
        if name == "search" and run.cost is not None:
            d = run.cost.describe(cfg.seed)
            self.log(f"   cost term: {fmt_cost(d['metric'], d['target'])} target, weight {cfg.cost_weight:g} (this "
                     f"space: cheapest genotype {fmt_cost(d['metric'], d['cheapest'])}, random mean "
                     f"{fmt_cost(d['metric'], d['random_mean'])})")
        if name in SEARCHING_PHASES and cfg.logit_noise > 0:
            with torch.no_grad():
                for t in run.arch.parameters():
                    t.add_(torch.randn(t.shape, generator=run.gumbel, device=t.device) * cfg.logit_noise)
        if name == "optimize":
            genotype = self.genotype or run.arch.genotype()
            final = run.build_final(genotype)
            self.log(f"   genotype: {genotype}")
            self.log(f"   derived network: {count_parameters(final.net):,} parameters ({cfg.optimize_init} init)")

    # ------------------------------------------------------------------------------------------ one epoch
    def epoch(self, ph: Phase, t_start: float) -> dict:
        """One epoch of `ph` from step `p.step` on (0, or where a mid-epoch checkpoint stopped): its record."""
        run, cfg, p, budget, arch = self.run, self.cfg, self.p, self.budget, self.run.arch
        n_steps = budget.steps_in_epoch(ph.name, p.epoch)
        steps = ph.model.steps
        if not ph.supernet and cfg.drop_path:
            ph.model.net.set_drop_path(cfg.drop_path * p.epoch / max(1, budget.epochs("optimize")))
        # the weight step this epoch began at (p.step of its steps are done when resuming mid-epoch)
        first_step = p.global_step - p.step if ph.supernet else budget.steps_before("optimize", p.epoch)
        arch_stream = Cycle(ph.loaders["arch"], *p.arch_stream) if ph.searching else None
        if ph.searching and cfg.tau_schedule == "linear":
            arch.tau = temperature_at(cfg, budget, ph.name, p.epoch, p.arch_steps)
        step_phase = ph.name if ph.supernet else None
        steps.prepare(step_phase)

        ph.loader.set_epoch(p.global_epoch)
        start = p.step
        # the sums stay on the device; the host reads them when the progress bar refreshes, at a checkpoint
        # and at the epoch's end (p.skipped: the run's skipped steps before this epoch's sums began)
        sums = EpochSums(run.device, p.sums if start else None)
        skipped_before = p.skipped
        refresh = CheckpointClock(cfg.log_interval)
        t0 = time.perf_counter()
        bar = progress_bar(n_steps, f"{ph.name} {p.epoch + 1}/{budget.epochs(ph.name)}", cfg.log_interval,
                           initial=start, disable=not self.world.main)
        data = ph.loader.iter_from(start)
        assert not arch.pending, "samples drawn ahead were left over from an earlier step"
        for i in range(start, n_steps):
            if ph.searching:  # this iteration's samples, drawn now; the host reads them once, in the weight step
                plan = self.prefetch(ph, i, n_steps)
            with nvtx_range("data_wait"):
                x, y = next(data)
            steps.set_lr(cosine_lr(first_step + i, ph.lr_steps, ph.lr, cfg.lr_min))
            with nvtx_range("weight_step"):
                r = steps.weight_step(x, y, step_phase)
            sums.add(r)
            if ph.searching:
                # the architecture step's and the next weight step's sampling: temperature and hand-over bias
                arch.tau, arch.skip_bias, arch_due = plan
                if arch_due:
                    xa, ya = next(arch_stream)
                    with nvtx_range("arch_step"):
                        ra = steps.arch_step(xa, ya, ph.name)
                    p.arch_steps += 1
                    sums.add_arch(ra)
            if ph.supernet:
                p.global_step += 1
            bar.update(1)
            checkpoint = i + 1 < n_steps and self.checkpoint_due(i)
            if checkpoint or refresh.due():
                self.read_sums(sums, skipped_before, bar)
                refresh.reset()
            if checkpoint:  # mid-epoch checkpoint
                p.step, p.sums = i + 1, {k: v for k, v in sums.values().items() if k != "skipped"}
                if arch_stream is not None:
                    p.arch_stream = (arch_stream.epoch, arch_stream.pos)
                p.elapsed = time.perf_counter() - t_start
                self.save("last.pt")
                self.stop_if_asked(f"at {ph.name} epoch {p.epoch + 1}, step {i + 1}/{n_steps}", bar)
        bar.close()
        del data
        totals = self.read_sums(sums, skipped_before)  # before this epoch's checkpoint: never save past nan_limit
        if arch_stream is not None:
            p.arch_stream = (arch_stream.epoch, arch_stream.pos)
        train_s = time.perf_counter() - t0

        val = (None, None)
        t_eval = time.perf_counter()
        if ph.evaluate:  # the val split: the search's own data, never the test set
            with nvtx_range("eval"):
                if ph.supernet:
                    steps.recalibrate_bn(ph.loaders["train"], cfg.bn_recalibrate, ph.eval_as)
                val = steps.evaluate(ph.loaders["val"], ph.eval_as)
        net = ph.model.net
        genotype = arch.genotype() if ph.supernet else net.genotype  # optimize: the network being trained
        record = epoch_record(phase=ph.name, epoch=p.epoch + 1, epochs=budget.epochs(ph.name), progress=p,
                              sums=totals, val=val, arch=arch, model=net, genotype=genotype,
                              lr=float(ph.model.opt.param_groups[0]["lr"]), n_steps=n_steps, train_s=train_s,
                              searching=ph.searching, compile_totals=self.compile_totals())
        if ph.evaluate:
            record["eval_s"] = round(time.perf_counter() - t_eval, 2)
        if cfg.curriculum:  # which data the epoch trained (and searched, and was evaluated) on
            record["data"] = cfg.curriculum if ph.loaders is run.curriculum_loaders else cfg.dataset
        if ph.supernet and run.cost is not None:
            record["cost"] = run.cost.record(arch.logits, genotype)
        if ph.supernet and self.world.main:
            write_json(os.path.join(self.out, "genotype.json"), genotype.to_json())
        return record

    # ------------------------------------------------------------------------------------------ ranks
    def checkpoint_due(self, i: int) -> bool:
        """A mid-epoch checkpoint after step `i`: its clock is due or a stop was asked. With several ranks it is
        rank 0's decision, passed on every SYNC_STEPS steps (one small host-side broadcast), so every rank
        checkpoints (and stops) at the same step."""
        if self.world.active and (i + 1) % SYNC_STEPS:
            return False
        return self.rank0_decision() or self.stop.signum is not None

    def rank0_decision(self) -> bool:
        """Whether the checkpoint clock is due, and the stop request (torchrun signals every rank, not at the same
        instant), as rank 0 sees them, on every rank: the request is set here, the clock's answer returned."""
        due, self.stop.signum = distributed.rank0((self.clock.due(), self.stop.signum), self.world)
        return due

    def check_ranks(self, where: str) -> None:
        """Every rank holds the same logits (and, after growth, weights): compared by checksum, stop if not."""
        distributed.check_same("architecture logits", self.run.arch.parameters(), self.world, where)

    def sampling(self, ph: Phase, i: int, n_steps: int) -> tuple[float, float, bool]:
        """What follows weight step `i` of a searching epoch: the temperature and hand-over bias its architecture
        step (if `due`) and the next weight step sample with. `p.global_step` and `p.arch_steps` as at step i."""
        cfg, p, budget = self.cfg, self.p, self.budget
        done = p.epoch + i / n_steps
        tau = temperature_at(cfg, budget, ph.name, p.epoch, p.arch_steps) if cfg.tau_schedule == "exp" \
            else self.run.arch.tau
        due = (p.global_step + 1) % cfg.arch_every == 0 and budget.arch_active(ph.name, done)
        return tau, handover_bias(cfg, ph.name, done), due

    def prefetch(self, ph: Phase, i: int, n_steps: int) -> tuple[float, float, bool]:
        """Draw step i's samples (its weight step's and, when one follows, its architecture step's) in one go,
        after the previous step's checkpoint: the generator state a checkpoint saves is never past a draw.
        The very same draws, in the same order, as sampling at each step: results are unchanged. Returns
        `sampling(ph, i, n_steps)`, which the weight step leaves as it is (it moves neither progress nor tau)."""
        arch = self.run.arch
        plans = [(False, arch.tau, arch.skip_bias)]
        tau, bias, due = sampling = self.sampling(ph, i, n_steps)
        if due:
            plans.append((True, tau, bias))
        ph.model.steps.prefetch(ph.name, plans)
        return sampling

    def compile_totals(self) -> dict:
        """compiles, recompiles, compile_s so far in this process (zeros when nothing is compiled)."""
        run = self.run
        mon = run.supernet.steps.monitor or (run.final.steps.monitor if run.final is not None else None)
        return mon.totals() if mon is not None else {"compiles": 0, "recompiles": 0, "compile_s": 0.0}

    def read_sums(self, sums: EpochSums, skipped_before: int, bar=None) -> dict:
        """One host read: the epoch's sums so far; updates the run's skipped count (and stops the run past
        nan_limit) and the progress bar's loss and accuracy."""
        v = sums.values()
        self.p.skipped = skipped_before + v["skipped"]
        self.check_skips()
        if bar is not None and v["count"]:
            bar.set_postfix(EpochSums.postfix(v), refresh=False)
        return v

    def check_skips(self) -> None:
        if self.p.skipped > self.cfg.nan_limit:
            raise TrainingError(f"{self.p.skipped} steps had a non-finite loss or gradient (nan_limit "
                                f"{self.cfg.nan_limit}); stopped. Last good checkpoint: "
                                f"{os.path.join(self.out, 'checkpoints', 'last.pt')}. Lower lr or raise nan_limit.")

    # ------------------------------------------------------------------------------------------ growth
    def maybe_grow(self) -> None:
        run, p = self.run, self.p
        kind = growth.plan_event(self.cfg, run.supernet.net, p.epoch, p.val_history, len(p.growth_history))
        if kind is not None:
            event = self.grow(kind)
            p.growth_history.append(event)
            self.metrics.append(event)
            self.log(growth_line(event))

    def grow(self, kind: str) -> dict:
        """One growth event: the transform, then the grown supernet adopted and each step graph recompiled once."""
        run, p = self.run, self.p
        grown = growth.grow(run.supernet.net, run.supernet.opt, run.arch, run.probe_batch(), kind,
                            width_factor=self.cfg.grow_width_factor)
        run.adopt_supernet(grown.net, grown.opt)
        distributed.check_same("grown weights", run.supernet.net.parameters(), self.world,
                               f"after the {kind} event of growth epoch {p.epoch + 1}")
        recompile = self.recompile()
        event = {**grown.event, "phase": "growth", "epoch": p.epoch, "global_epoch": p.global_epoch,
                 "step": p.global_step, "recompile_s": recompile["seconds"], "recompiles": recompile["recompiles"]}
        if self.world.active:  # exactly one recompile per step graph on every rank, not only on rank 0
            event["recompiles_per_rank"] = distributed.gather_object(recompile["recompiles"], self.world)
        return event

    def recompile(self) -> dict:
        """After a growth event every step graph is thrown away and compiled exactly once, now."""
        steps = self.run.supernet.steps
        if not steps.compiling:
            return {"seconds": 0.0, "recompiles": 0}
        before = steps.monitor.totals()
        t0 = time.perf_counter()
        steps.invalidate()
        x, y = next(iter(self.run.loaders["train"]))
        steps.precompile(x, y, "growth")
        after = steps.monitor.totals()
        return {"seconds": round(time.perf_counter() - t0, 2), "recompiles": after["recompiles"] - before["recompiles"]}

    # ------------------------------------------------------------------------------------------ end
    def finish(self, wall: float) -> dict:
        run, p = self.run, self.p
        with nvtx_range("test"):
            if run.final is None:  # no optimize phase: the derived architecture inside the supernet
                model, genotype = run.supernet, run.arch.genotype()
                test = model.steps.evaluate(run.loaders["test"], "derive")
            else:
                model, genotype = run.final, run.final.net.genotype
                test = model.steps.evaluate(run.loaders["test"], flip=self.cfg.test_flip)
        final = final_record(test=test, model=model.net, genotype=genotype, wall=wall, progress=p, arch=run.arch,
                             device=run.device)
        if run.final is not None:  # the trained network's multiply-accumulates per image (engine/cost.py)
            final["macs"] = count_macs(model.net, (1, *run.dataset.image_shape))
        if run.cost is not None:
            final["cost"] = run.cost.record(run.arch.logits, genotype)
            if run.final is not None and not same_network(run.final.net.spec, run.cost.table.spec):
                final["cost"]["note"] = "growth deepened the network: derived is the table's, for the layout before"
            verdict = run.cost.verdict(final["cost"]["derived"])
            if verdict:
                self.log(f"aso-se: WARNING: {verdict}")
        self.check_ranks("at the end")
        if self.world.active:  # the compile monitor of every rank (rank 0 writes final.json)
            final["compile_per_rank"] = distributed.gather_object(self.compile_totals(), self.world)
        self.metrics.append({"phase": "final", **{k: v for k, v in final.items() if k != "genotype"}})
        if self.world.main:
            write_json(os.path.join(self.out, "genotype.json"), genotype.to_json())
            write_json(os.path.join(self.out, "final.json"), final)  # last: a run with final.json is finished
        self.log(final_line(test[1], final["params"], wall))
        self.log(f"   genotype: {genotype}")
        return final

    def save(self, name: str) -> None:
        lines = self.metrics.count() if self.world.main else 0  # rank 0 writes the checkpoint and the metrics
        save_run(os.path.join(self.out, "checkpoints", name), self.run, self.p, lines)
        self.clock.reset()

    def stop_if_asked(self, where: str, bar=None) -> None:
        """After a checkpoint: a signal received meanwhile ends the run here, resumable."""
        if self.stop.signum is None:
            return
        if bar is not None:
            bar.close()
        path = os.path.join(self.out, "checkpoints", "last.pt")
        raise Stopped(f"stopped by {self.stop.name} {where}; checkpoint written: {path}; continue with: "
                      f"aso-se search --resume {self.out}", self.stop.signum)
