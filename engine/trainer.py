"""The four-phase loop: warmup -> search -> growth -> optimize, then one test evaluation.

    warmup    weights only; every edge is skip_connect
    search    weight steps on the train split, an architecture step on the val split every `arch_every`
              weight steps (first-order DARTS), Gumbel temperature annealed
    growth    search goes on; `grow()` deepens / widens the supernet between epochs
    optimize  the derived genotype is fixed and its network trained (train+val by default)

The trainer only orders steps, phases and events and records what happened; the steps themselves live in
`steps.py`. Each epoch prints one line, appends it to metrics.jsonl, and writes checkpoints/last.pt
(atomically), so `--resume` continues from the last finished epoch and replays exactly the same batches,
Gumbel samples and augmentations as an uninterrupted run.
"""
from __future__ import annotations

import math
import os
import random
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

from . import growth as growth_mod
from .arch import PHASES, Genotype, temperature
from .checkpoint import MetricsLog, load_checkpoint, save_checkpoint, write_json
from .config import Config
from .data import make_loader, make_splits, train_augment
from .errors import ConfigError, TrainingError
from .evaluate import build_architecture, load_data
from .network import NetSpec, Network, count_parameters, darts_spec, derive
from .profiling import enable_nvtx, nvtx_range
from .steps import Steps, cosine_lr

SUPERNET_PHASES = ("warmup", "search", "growth")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but no CUDA GPU is available; use --device cpu")
    return torch.device(name)


def _fmt_time(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class _Cycle:
    """Endless batches from a loader, epoch after epoch; `position` makes it resumable."""

    def __init__(self, loader, epoch: int = 0, start: int = 0):
        self.loader, self.epoch, self.pos = loader, epoch, start
        self._it = None

    def __next__(self):
        if self._it is None:
            self.loader.set_epoch(self.epoch)
            self._it = self.loader.iter_from(self.pos)
        try:
            batch = next(self._it)
        except StopIteration:
            self.epoch, self.pos = self.epoch + 1, 0
            self.loader.set_epoch(self.epoch)
            self._it = self.loader.iter_from(0)
            batch = next(self._it)
        self.pos += 1
        return batch


class Trainer:
    def __init__(self, cfg: Config, out_dir: str, *, resume: bool = False, stop_after: int | None = None,
                 genotype: Genotype | None = None, log=None):
        self.cfg, self.out = cfg, out_dir
        self.fixed_genotype = genotype      # `aso-se train`: optimize this genotype instead of the searched one
        self.stop_after = stop_after        # stop (as if interrupted) after this many epochs in this process
        self.log = log or (lambda msg: tqdm.write(msg, file=sys.stdout))
        self.device = resolve_device(cfg.device)
        self.channels_last = cfg.channels_last if cfg.channels_last is not None else self.device.type == "cpu"
        enable_nvtx(cfg.nvtx)
        self._seed(cfg.seed)
        os.makedirs(os.path.join(out_dir, "checkpoints"), exist_ok=True)
        self.metrics = MetricsLog(os.path.join(out_dir, "metrics.jsonl"))

        # ---- data: uint8 arrays in memory; loaders augment per batch
        self.dataset = load_data(cfg)
        self.splits = make_splits(self.dataset, cfg.val_fraction, cfg.seed)
        self.augment = train_augment(self.dataset, cfg.flip, cfg.crop_pad)
        self.loaders = self._make_loaders()

        # ---- model: supernet + architecture, two optimizers separated by parameter identity
        c, h, w = self.dataset.image_shape
        spec = darts_spec(c, self.dataset.num_classes, cfg.channels, cfg.layers, cfg.nodes, cfg.stem_multiplier,
                          cfg.stem_stride)
        self.arch = build_architecture(cfg, self.device)
        self.arch_opt = torch.optim.Adam(self.arch.parameters(), lr=cfg.arch_lr, betas=(0.5, 0.999),
                                         weight_decay=cfg.arch_weight_decay)
        self.gumbel = torch.Generator(device=self.device).manual_seed(cfg.seed + 1)
        self._build_supernet(spec)
        self.final_net: Network | None = None
        self.final_opt = None

        # ---- progress (all of it goes into checkpoints)
        self.phase_index, self.epoch = 0, 0  # phase in PHASES, epochs finished in that phase
        self.global_epoch, self.global_step, self.arch_steps = 0, 0, 0
        self.arch_stream_state = (0, 0)      # (epoch, position) of the val batches for architecture steps
        self.growth_history: list[dict] = []
        self.val_history: list[float] = []
        self.elapsed = 0.0
        self.skipped = 0
        self.best_val: float | None = None
        if resume:
            self._restore(os.path.join(out_dir, "checkpoints", "last.pt"))
        else:
            self.metrics.truncate(0)
            write_json(os.path.join(out_dir, "config.json"), cfg.to_json())

    # ------------------------------------------------------------------------------------------ setup
    @staticmethod
    def _seed(seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    def _make_loaders(self) -> dict:
        cfg = self.cfg
        kw = dict(device=self.device, seed=cfg.seed)
        tr_x, tr_y = self.splits["train"]
        va_x, va_y = self.splits["val"]
        loaders = {"train": make_loader(cfg.loader, tr_x, tr_y, cfg.batch_size, train=True, augment=self.augment,
                                        drop_last=cfg.drop_last, **kw)}
        if len(va_y):
            loaders["arch"] = make_loader(cfg.loader, va_x, va_y, cfg.batch_size, train=True, augment=self.augment,
                                          drop_last=cfg.drop_last, **{**kw, "seed": cfg.seed + 1})
            if cfg.eval_samples and cfg.eval_samples < len(va_y):
                pick = np.sort(np.random.default_rng([cfg.seed, 11]).permutation(len(va_y))[:cfg.eval_samples])
                va_x, va_y = va_x[pick], va_y[pick]
            loaders["val"] = make_loader(cfg.loader, va_x, va_y, cfg.eval_batch_size, train=False,
                                         augment=self.augment, **kw)
        loaders["test"] = make_loader(cfg.loader, *self.splits["test"], cfg.eval_batch_size, train=False,
                                      augment=self.augment, **kw)
        return loaders

    def _build_supernet(self, spec: NetSpec) -> None:
        net = Network(spec).to(self.device)
        self.adopt_supernet(net.to(memory_format=torch.channels_last) if self.channels_last else net)

    def adopt_supernet(self, net: Network) -> None:
        """Make `net` the supernet (at start, on resume, after a growth event): a fresh weight optimizer over
        its parameters (growth moves the old one's state across) and steps bound to it."""
        cfg = self.cfg
        self.net = net
        self.weight_opt = torch.optim.SGD(self.net.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                          weight_decay=cfg.weight_decay)
        self.steps = Steps(self.net, self.weight_opt, arch=self.arch, arch_opt=self.arch_opt, grad_clip=cfg.grad_clip,
                           channels_last=self.channels_last, generator=self.gumbel, compile=cfg.compile,
                           recompile_limit=cfg.recompile_limit)

    def _build_final(self, genotype: Genotype) -> None:
        cfg = self.cfg
        net = derive(self.net, genotype, transfer=cfg.optimize_init == "supernet",
                     stem_stride=cfg.optimize_stem_stride or None, channels=cfg.optimize_channels or None)
        if self.channels_last:
            net = net.to(memory_format=torch.channels_last)
        self.final_net = net
        self.final_opt = torch.optim.SGD(net.parameters(), lr=cfg.optimize_lr, momentum=cfg.momentum, nesterov=True,
                                         weight_decay=cfg.optimize_weight_decay)
        self.final_steps = Steps(net, self.final_opt, grad_clip=cfg.grad_clip, label_smoothing=cfg.label_smoothing,
                                 channels_last=self.channels_last, compile=cfg.compile,
                                 recompile_limit=cfg.recompile_limit)
        x, y = self.splits["train"]
        if cfg.optimize_data == "train+val":
            x = np.concatenate([x, self.splits["val"][0]])
            y = np.concatenate([y, self.splits["val"][1]])
        self.loaders["optimize"] = make_loader(cfg.loader, x, y, cfg.optimize_batch_size, train=True,
                                               augment=self.augment, device=self.device, seed=cfg.seed + 2,
                                               drop_last=cfg.drop_last)

    # ------------------------------------------------------------------------------------------ budgets
    def _budget(self, phase: str) -> float:
        return getattr(self.cfg, f"{phase}_epochs")

    def _epochs(self, phase: str) -> int:
        return math.ceil(self._budget(phase))

    def _steps_in_epoch(self, phase: str, epoch: int) -> int:
        if phase == "optimize":
            full = len(self.loaders["optimize"])
        else:
            full = len(self.loaders["train"])
            if self.cfg.steps_per_epoch:
                full = min(full, self.cfg.steps_per_epoch)
        budget = self._budget(phase)
        frac = budget - epoch if epoch + 1 > budget else 1.0  # a fractional budget shortens the last epoch
        return max(1, int(round(full * frac)))

    def _supernet_steps_total(self) -> int:
        return sum(self._steps_in_epoch(p, e) for p in SUPERNET_PHASES for e in range(self._epochs(p)))

    def _arch_steps_total(self) -> tuple[int, int]:
        """(architecture steps in search, in growth)."""
        n = [sum(self._steps_in_epoch(p, e) for e in range(self._epochs(p))) // self.cfg.arch_every
             for p in ("search", "growth")]
        return n[0] - self._arch_start_steps() // self.cfg.arch_every, n[1]

    def _arch_start_steps(self) -> int:
        """Weight steps of the search phase before its first architecture step (`arch_start_epochs`)."""
        start, steps = self.cfg.arch_start_epochs, 0
        for e in range(self._epochs("search")):
            if start <= e:
                break
            n = self._steps_in_epoch("search", e)
            steps += n if start >= e + 1 else int(round(n * (start - e)))
        return steps

    def _arch_active(self, phase: str, epochs_done: float) -> bool:
        return phase == "growth" or epochs_done >= self.cfg.arch_start_epochs

    def _handover_bias(self, phase: str, epochs_done: float) -> float:
        """Sampling bias on skip_connect at the start of search, decaying linearly to 0: the sampled
        architectures move from the warmup one (all skip) to the learned distribution gradually, so the
        weights learned in warmup are not thrown into random architectures (the 39% -> 10% collapse)."""
        cfg = self.cfg
        if phase != "search" or cfg.handover_bias == 0 or cfg.handover_epochs == 0:
            return 0.0
        return cfg.handover_bias * max(0.0, 1.0 - epochs_done / cfg.handover_epochs)

    def _update_tau(self, phase: str, epoch: int) -> None:
        cfg = self.cfg
        n_search, n_growth = self._arch_steps_total()
        start = cfg.search_tau_start or cfg.tau_max
        if cfg.tau_schedule == "linear":
            units = self._epochs("search") + self._epochs("growth")
            done = epoch + (self._epochs("search") if phase == "growth" else 0)
            total = units
        else:
            done, total = self.arch_steps, n_search + n_growth
        if phase == "growth" and cfg.growth_tau_start:
            start = cfg.growth_tau_start
            done = done - (n_search if cfg.tau_schedule == "exp" else self._epochs("search"))
            total = n_growth if cfg.tau_schedule == "exp" else self._epochs("growth")
        self.arch.tau = temperature(done, total, start, cfg.tau_min, cfg.tau_schedule)

    # ------------------------------------------------------------------------------------------ run
    def run(self) -> dict | None:
        """Run (or continue) all phases. Returns the final record, or None if stopped by `stop_after`."""
        t_start = time.perf_counter() - self.elapsed
        epochs_this_process = 0
        while self.phase_index < len(PHASES):
            phase = PHASES[self.phase_index]
            if self.epoch == 0:
                self._enter_phase(phase)
            with nvtx_range(phase):
                while self.epoch < self._epochs(phase):
                    if self.stop_after is not None and epochs_this_process >= self.stop_after:
                        self.log(f"stopped after {epochs_this_process} epoch(s); continue with --resume {self.out}")
                        return None
                    if phase == "growth":
                        self._maybe_grow()  # at the start of a growth epoch: the grown network then trains
                    with nvtx_range(f"epoch {self.epoch}"):
                        record = self._run_epoch(phase)
                    self.epoch += 1
                    self.global_epoch += 1
                    epochs_this_process += 1
                    self.elapsed = time.perf_counter() - t_start
                    record["elapsed_s"] = round(self.elapsed, 2)
                    self.metrics.append(record)
                    self.log(self._epoch_line(record))
                    if record.get("val_acc") is not None and phase in ("search", "growth"):
                        self.val_history.append(record["val_acc"])
                    self._save("last.pt")
            self._save(f"{phase}.pt")
            self.phase_index += 1
            self.epoch = 0
        return self._finish(time.perf_counter() - t_start)

    def _enter_phase(self, phase: str) -> None:
        budget = self._budget(phase)
        if budget == 0:
            return
        self.log(f"== {phase}: {budget:g} epoch(s)")
        if phase in ("search", "growth") and self.cfg.logit_noise > 0:
            with torch.no_grad():
                for p in self.arch.parameters():
                    p.add_(torch.randn(p.shape, generator=self.gumbel, device=p.device) * self.cfg.logit_noise)
        if phase == "optimize":
            genotype = self.fixed_genotype or self.arch.genotype()
            self._build_final(genotype)
            self.log(f"   genotype: {genotype}")
            self.log(f"   derived network: {count_parameters(self.final_net):,} parameters "
                     f"({self.cfg.optimize_init} init)")

    def _run_epoch(self, phase: str) -> dict:
        cfg = self.cfg
        n_steps = self._steps_in_epoch(phase, self.epoch)
        supernet = phase in SUPERNET_PHASES
        steps = self.steps if supernet else self.final_steps
        loader = self.loaders["train" if supernet else "optimize"]
        opt = self.weight_opt if supernet else self.final_opt
        if supernet:
            total, offset = self._supernet_steps_total(), 0
            lr_base = cfg.lr
        else:
            total = sum(self._steps_in_epoch("optimize", e) for e in range(self._epochs("optimize")))
            lr_base = cfg.optimize_lr
            if cfg.drop_path:
                self.final_net.set_drop_path(cfg.drop_path * self.epoch / max(1, self._epochs("optimize")))
        searching = phase in ("search", "growth")
        arch_stream = _Cycle(self.loaders["arch"], *self.arch_stream_state) if searching else None
        if searching and cfg.tau_schedule == "linear":
            self._update_tau(phase, self.epoch)
        steps.prepare(phase if supernet else None)

        loader.set_epoch(self.global_epoch)
        sums = dict(loss=0.0, correct=0, count=0, arch_loss=0.0, arch_correct=0, arch_count=0, arch_n=0)
        t0 = time.perf_counter()
        bar = tqdm(total=n_steps, desc=f"{phase} {self.epoch + 1}/{self._epochs(phase)}", leave=False,
                   mininterval=cfg.log_interval, file=sys.stderr, disable=None, dynamic_ncols=True)
        data_iter = iter(loader)
        for i in range(n_steps):
            with nvtx_range("data_wait"):
                x, y = next(data_iter)
            step = self.global_step if supernet else self._optimize_step_index(i)
            steps.set_lr(cosine_lr(step, total, lr_base, cfg.lr_min))
            with nvtx_range("weight_step"):
                r = steps.weight_step(x, y, phase if supernet else None)
            self.skipped += r.skipped
            if not r.skipped:
                sums["loss"] += r.loss * r.count
                sums["correct"] += r.correct
                sums["count"] += r.count
            if searching:  # the next step's sampling: temperature and hand-over bias
                if cfg.tau_schedule == "exp":
                    self._update_tau(phase, self.epoch)
                self.arch.skip_bias = self._handover_bias(phase, self.epoch + i / n_steps)
            if searching and (self.global_step + 1) % cfg.arch_every == 0 and \
                    self._arch_active(phase, self.epoch + i / n_steps):
                xa, ya = next(arch_stream)
                with nvtx_range("arch_step"):
                    ra = steps.arch_step(xa, ya, phase)
                self.arch_steps += 1
                self.skipped += ra.skipped
                if not ra.skipped:
                    sums["arch_loss"] += ra.loss * ra.count
                    sums["arch_correct"] += ra.correct
                    sums["arch_count"] += ra.count
            if supernet:
                self.global_step += 1
            self._check_skips()
            bar.update(1)
            if sums["count"]:
                bar.set_postfix(loss=f"{sums['loss'] / sums['count']:.3f}",
                                acc=f"{100 * sums['correct'] / sums['count']:.1f}%", refresh=False)
        bar.close()
        del data_iter
        if arch_stream is not None:
            self.arch_stream_state = (arch_stream.epoch, arch_stream.pos)
        train_s = time.perf_counter() - t0

        # ---- evaluation on the val split (the search's own data: never the test set)
        val_loss = val_acc = None
        with nvtx_range("eval"):
            if supernet and "val" in self.loaders:
                # search: the most likely architecture. The genotype is not evaluated here: its skip cap
                # forces ops into the cell that the search has barely trained yet (measured 14% vs 64%).
                eval_phase = "warmup" if phase == "warmup" else "argmax"
                steps.recalibrate_bn(self.loaders["train"], cfg.bn_recalibrate, eval_phase)
                val_loss, val_acc = steps.evaluate(self.loaders["val"], eval_phase)
            elif not supernet and cfg.optimize_data == "train" and "val" in self.loaders:
                val_loss, val_acc = steps.evaluate(self.loaders["val"])
        images = sums["count"] + sums["arch_count"]
        stats = self.arch.statistics()
        model = self.net if supernet else self.final_net
        genotype = self.arch.genotype() if supernet else model.genotype  # optimize: the network being trained
        record = {
            "phase": phase, "epoch": self.epoch + 1, "epochs": self._epochs(phase), "global_epoch": self.global_epoch + 1,
            "step": self.global_step, "arch_steps": self.arch_steps,
            "train_loss": _r(sums["loss"] / max(sums["count"], 1)), "train_acc": _r(sums["correct"] / max(sums["count"], 1)),
            "val_loss": _r(val_loss), "val_acc": _r(val_acc),
            "arch_loss": _r(sums["arch_loss"] / sums["arch_count"]) if sums["arch_count"] else None,
            "arch_acc": _r(sums["arch_correct"] / sums["arch_count"]) if sums["arch_count"] else None,
            "mean_entropy": _r(stats["mean_entropy"]), "tau": _r(self.arch.tau) if searching else None,
            "lr": _r(float(opt.param_groups[0]["lr"])), "it_s": _r(n_steps / train_s, 3),
            "images_s": _r(images / train_s, 1), "epoch_s": _r(train_s, 2),
            "params": count_parameters(model), "cells": len(model.cells), "channels": model.spec.cells[0].c,
            "skipped_steps": self.skipped, "nan_events": stats["nan_events"], **self._compile_totals(),
            "genotype": str(genotype), "param_free": genotype.param_free_fraction(),
        }
        if searching:
            record["histogram"] = {t: stats[f"{t}_histogram"] for t in ("normal", "reduce")}
        if supernet:
            write_json(os.path.join(self.out, "genotype.json"), genotype.to_json())
        return record

    def _compile_totals(self) -> dict:
        """compiles, recompiles, compile_s so far in this process (zeros when nothing is compiled)."""
        mon = self.steps.monitor or (self.final_steps.monitor if self.final_net is not None else None)
        return mon.totals() if mon is not None else {"compiles": 0, "recompiles": 0, "compile_s": 0.0}

    def _optimize_step_index(self, i: int) -> int:
        return sum(self._steps_in_epoch("optimize", e) for e in range(self.epoch)) + i

    def _check_skips(self) -> None:
        if self.skipped > self.cfg.nan_limit:
            raise TrainingError(f"{self.skipped} steps had a non-finite loss or gradient (nan_limit "
                                f"{self.cfg.nan_limit}); stopped. Last good checkpoint: "
                                f"{os.path.join(self.out, 'checkpoints', 'last.pt')}. Lower lr or raise nan_limit.")

    @staticmethod
    def _epoch_line(r: dict) -> str:
        pct = lambda v: "  -  " if v is None else f"{100 * v:5.2f}%"  # noqa: E731
        tau = f" tau {r['tau']:.3f}" if r.get("tau") is not None else ""
        return (f"{r['phase']:<8} {r['epoch']:>2}/{r['epochs']:<2} loss {r['train_loss']:.4f} acc {pct(r['train_acc'])} "
                f"val {pct(r['val_acc'])} arch {pct(r['arch_acc'])} H {r['mean_entropy']:.3f}{tau} "
                f"| {r['it_s']:.2f} it/s {r['images_s']:.0f} img/s | {r['params']:,} params | "
                + (f"compiles {r['compiles']} recompiles {r['recompiles']} ({r['compile_s']:.0f}s) | "
                   if r.get("compiles") or r.get("recompiles") else "")
                + f"{_fmt_time(r['elapsed_s'])}")

    # ------------------------------------------------------------------------------------------ growth
    def probe_batch(self) -> torch.Tensor:
        """A fixed batch (the first of the val evaluation split) on which growth checks preservation."""
        if getattr(self, "_probe", None) is None:
            loader = self.loaders.get("val", self.loaders["test"])
            x, _ = next(iter(loader))
            self._probe = x[:64].clone()
        return self._probe.contiguous(memory_format=torch.channels_last) if self.channels_last else self._probe

    def recompile_after_growth(self) -> dict:
        """After a growth event every step graph is thrown away and compiled exactly once, now."""
        steps = self.steps
        if not steps.compiling:
            return {"seconds": 0.0, "recompiles": 0}
        before = steps.monitor.totals()
        t0 = time.perf_counter()
        steps.invalidate()
        x, y = next(iter(self.loaders["train"]))
        steps.precompile(x, y, "growth")
        after = steps.monitor.totals()
        return {"seconds": round(time.perf_counter() - t0, 2), "recompiles": after["recompiles"] - before["recompiles"]}

    def _maybe_grow(self) -> None:
        event = growth_mod.maybe_grow(self)
        if event is not None:
            self.growth_history.append(event)
            self.metrics.append(event)
            self.log(f"   growth: {event['event']} params {event['params_before']:,} -> {event['params_after']:,} "
                     f"max|diff| {event['max_abs_diff']:.2e}")

    # ------------------------------------------------------------------------------------------ end
    def _finish(self, wall: float) -> dict:
        net = self.final_net
        steps = self.final_steps if net is not None else self.steps
        with nvtx_range("test"):
            if net is None:  # no optimize phase: the derived architecture inside the supernet
                test_loss, test_acc = steps.evaluate(self.loaders["test"], "derive")
                model = self.net
            else:
                test_loss, test_acc = steps.evaluate(self.loaders["test"], flip=self.cfg.test_flip)
                model = net
        genotype = net.genotype if net is not None else self.arch.genotype()
        final = {"test_acc": round(test_acc, 5), "test_loss": round(test_loss, 5), "params": count_parameters(model),
                 "wall_s": round(wall, 1), "genotype": genotype.to_json(), "genotype_str": str(genotype),
                 "epochs": self.global_epoch, "steps": self.global_step, "arch_steps": self.arch_steps,
                 "skipped_steps": self.skipped, "nan_events": self.arch.state.nan_events,
                 "growth_events": len(self.growth_history), "device": str(self.device)}
        write_json(os.path.join(self.out, "final.json"), final)
        write_json(os.path.join(self.out, "genotype.json"), genotype.to_json())
        self.metrics.append({"phase": "final", **{k: v for k, v in final.items() if k != "genotype"}})
        self.log(f"== test accuracy {100 * test_acc:.2f}%  ({count_parameters(model):,} params, "
                 f"wall {_fmt_time(wall)})")
        self.log(f"   genotype: {genotype}")
        return final

    # ------------------------------------------------------------------------------------------ checkpoints
    def _save(self, name: str) -> None:
        state = {
            "config": self.cfg.to_json(), "spec": self.net.spec.to_json(), "genotype": self.arch.genotype().to_json(),
            "phase_index": self.phase_index, "epoch": self.epoch, "global_epoch": self.global_epoch,
            "global_step": self.global_step, "arch_steps": self.arch_steps, "arch_stream": list(self.arch_stream_state),
            "supernet": self.net.state_dict(), "arch": self.arch.state_dict(), "tau": self.arch.tau,
            "arch_counters": {"nan_events": self.arch.state.nan_events, "repaired_rows": self.arch.state.repaired_rows,
                              "histogram": self.arch.state.histogram},
            "weight_opt": self.weight_opt.state_dict(), "arch_opt": self.arch_opt.state_dict(),
            "final_genotype": None, "final_net": None, "final_opt": None,
            "rng": {"torch": torch.get_rng_state(), "gumbel": self.gumbel.get_state(),
                    "numpy": _numpy_state(), "python": list(random.getstate()[1])},
            "metrics_lines": self.metrics.count(), "growth_history": self.growth_history, "val_history": self.val_history,
            "elapsed_s": self.elapsed, "skipped": self.skipped,
        }
        if self.final_net is not None:
            state.update(final_genotype=self.final_net.genotype.to_json(), final_net=self.final_net.state_dict(),
                         final_opt=self.final_opt.state_dict())
        save_checkpoint(state, os.path.join(self.out, "checkpoints", name))

    def _restore(self, path: str) -> None:
        from .errors import CheckpointError
        state = load_checkpoint(path)
        if _computed(state["config"]) != _computed(self.cfg.to_json()):
            raise CheckpointError(f"{path}: written with a different config than {self.out}/config.json; "
                                  f"resume without --set/--preset changes")
        try:
            spec = NetSpec.from_json(state["spec"])
            if spec != self.net.spec:
                self._build_supernet(spec)
            self.net.load_state_dict(state["supernet"])
            self.arch.load_state_dict(state["arch"])
            self.weight_opt.load_state_dict(state["weight_opt"])
            self.arch_opt.load_state_dict(state["arch_opt"])
            if state["final_net"] is not None:
                self._build_final(Genotype.from_json(state["final_genotype"], path))
                self.final_net.load_state_dict(state["final_net"])
                self.final_opt.load_state_dict(state["final_opt"])
        except (RuntimeError, KeyError, ValueError, TypeError) as e:
            raise CheckpointError(f"{path}: incompatible checkpoint ({str(e).splitlines()[0][:160]})") from None
        self.arch.tau = state["tau"]
        counters = state["arch_counters"]
        self.arch.state.nan_events, self.arch.state.repaired_rows = counters["nan_events"], counters["repaired_rows"]
        self.arch.state.histogram = counters["histogram"]
        self.phase_index, self.epoch = state["phase_index"], state["epoch"]
        self.global_epoch, self.global_step = state["global_epoch"], state["global_step"]
        self.arch_steps, self.arch_stream_state = state["arch_steps"], tuple(state["arch_stream"])
        self.growth_history, self.val_history = state["growth_history"], state["val_history"]
        self.elapsed, self.skipped = state["elapsed_s"], state["skipped"]
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        self.gumbel.set_state(rng["gumbel"])
        np.random.set_state(("MT19937", np.asarray(rng["numpy"][0], dtype=np.uint32), *rng["numpy"][1:]))
        random.setstate((3, tuple(rng["python"]), None))
        self.metrics.truncate(state["metrics_lines"])
        self.log(f"resumed {self.out} at {PHASES[min(self.phase_index, 3)]} epoch {self.epoch} "
                 f"(global epoch {self.global_epoch})")


# config fields that change no result: a resume may set them differently (e.g. `--resume DIR --nvtx`)
OBSERVATION_FIELDS = ("nvtx", "log_interval")


def _computed(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in OBSERVATION_FIELDS}


def _numpy_state() -> list:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return [keys.tolist(), int(pos), int(has_gauss), float(cached)]


def _r(v, digits: int = 5):
    return None if v is None else round(float(v), digits)
