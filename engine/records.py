"""Records: what a run says about itself. One line per epoch on stdout, the same record as JSON in
metrics.jsonl, a progress bar on stderr while an epoch runs, growth event lines, and the final record.

Records are plain dicts of rounded numbers (timings apart, two runs with one seed write identical ones);
reports and tests read metrics.jsonl, never the loop.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

from tqdm import tqdm

from .network import count_parameters
from .steps import StepResult


def fmt_time(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def rounded(v, digits: int = 5):
    return None if v is None else round(float(v), digits)


def log_to_stdout(msg: str) -> None:
    tqdm.write(msg, file=sys.stdout)


@dataclass
class EpochSums:
    """Running sums of an epoch's weight and architecture steps (skipped steps count nowhere)."""
    loss: float = 0.0
    correct: int = 0
    count: int = 0
    arch_loss: float = 0.0
    arch_correct: int = 0
    arch_count: int = 0

    def add(self, r: StepResult) -> None:
        if not r.skipped:
            self.loss += r.loss * r.count
            self.correct += r.correct
            self.count += r.count

    def add_arch(self, r: StepResult) -> None:
        if not r.skipped:
            self.arch_loss += r.loss * r.count
            self.arch_correct += r.correct
            self.arch_count += r.count

    def postfix(self) -> dict:
        return dict(loss=f"{self.loss / self.count:.3f}", acc=f"{100 * self.correct / self.count:.1f}%")


def progress_bar(total: int, desc: str, interval: float, initial: int = 0) -> tqdm:
    """The epoch's progress bar: stderr, gone when the epoch ends, off when stderr is not a terminal."""
    return tqdm(total=total, desc=desc, leave=False, mininterval=interval, file=sys.stderr, disable=None,
                dynamic_ncols=True, initial=initial)


def epoch_record(*, phase: str, epoch: int, epochs: int, progress, sums: EpochSums, val: tuple, arch, model,
                 genotype, lr: float, n_steps: int, train_s: float, searching: bool, compile_totals: dict) -> dict:
    """metrics.jsonl's record of one epoch (`epoch` counts from 1; `progress` as after the epoch's steps)."""
    val_loss, val_acc = val
    stats = arch.statistics()
    images = sums.count + sums.arch_count
    record = {
        "phase": phase, "epoch": epoch, "epochs": epochs, "global_epoch": progress.global_epoch + 1,
        "step": progress.global_step, "arch_steps": progress.arch_steps,
        "train_loss": rounded(sums.loss / max(sums.count, 1)), "train_acc": rounded(sums.correct / max(sums.count, 1)),
        "val_loss": rounded(val_loss), "val_acc": rounded(val_acc),
        "arch_loss": rounded(sums.arch_loss / sums.arch_count) if sums.arch_count else None,
        "arch_acc": rounded(sums.arch_correct / sums.arch_count) if sums.arch_count else None,
        "mean_entropy": rounded(stats["mean_entropy"]), "tau": rounded(arch.tau) if searching else None,
        "lr": rounded(lr), "it_s": rounded(n_steps / train_s, 3),
        "images_s": rounded(images / train_s, 1), "epoch_s": rounded(train_s, 2),
        "params": count_parameters(model), "cells": len(model.cells), "channels": model.spec.cells[0].c,
        "skipped_steps": progress.skipped, "nan_events": stats["nan_events"], **compile_totals,
        "genotype": str(genotype), "param_free": genotype.param_free_fraction(),
    }
    if searching:
        record["histogram"] = {t: stats[f"{t}_histogram"] for t in ("normal", "reduce")}
    return record


def epoch_line(r: dict) -> str:
    pct = lambda v: "  -  " if v is None else f"{100 * v:5.2f}%"  # noqa: E731
    tau = f" tau {r['tau']:.3f}" if r.get("tau") is not None else ""
    return (f"{r['phase']:<8} {r['epoch']:>2}/{r['epochs']:<2} loss {r['train_loss']:.4f} acc {pct(r['train_acc'])} "
            f"val {pct(r['val_acc'])} arch {pct(r['arch_acc'])} H {r['mean_entropy']:.3f}{tau} "
            f"| {r['it_s']:.2f} it/s {r['images_s']:.0f} img/s | {r['params']:,} params | "
            + (f"compiles {r['compiles']} recompiles {r['recompiles']} ({r['compile_s']:.0f}s) | "
               if r.get("compiles") or r.get("recompiles") else "")
            + f"{fmt_time(r['elapsed_s'])}")


def growth_line(event: dict) -> str:
    return (f"   growth: {event['event']} params {event['params_before']:,} -> {event['params_after']:,} "
            f"max|diff| {event['max_abs_diff']:.2e}")


def final_record(*, test: tuple, model, genotype, wall: float, progress, arch, device) -> dict:
    test_loss, test_acc = test
    return {"test_acc": round(test_acc, 5), "test_loss": round(test_loss, 5), "params": count_parameters(model),
            "wall_s": round(wall, 1), "genotype": genotype.to_json(), "genotype_str": str(genotype),
            "epochs": progress.global_epoch, "steps": progress.global_step, "arch_steps": progress.arch_steps,
            "skipped_steps": progress.skipped, "nan_events": arch.state.nan_events,
            "growth_events": len(progress.growth_history), "device": str(device)}


def final_line(test_acc: float, params: int, wall: float) -> str:
    return f"== test accuracy {100 * test_acc:.2f}%  ({params:,} params, wall {fmt_time(wall)})"
