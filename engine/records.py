"""Records: what a run says about itself. One line per epoch on stdout, the same record as JSON in
metrics.jsonl, a progress bar on stderr while an epoch runs, growth event lines, and the final record.

Records are plain dicts of rounded numbers (timings apart, two runs with one seed write identical ones);
reports and tests read metrics.jsonl, never the loop.
"""
from __future__ import annotations

import sys

import torch
from tqdm import tqdm

from .cost import fmt as fmt_cost
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


class EpochSums:
    """Running sums of an epoch's weight and architecture steps, one float64 tensor on the device (skipped
    steps count only as skipped): adding a step's result makes the host wait for nothing; `values()` reads
    them all in one host read (progress refreshes, checkpoints, the epoch's end)."""
    FIELDS = ("loss", "correct", "count", "arch_loss", "arch_correct", "arch_count", "skipped")

    def __init__(self, device=None, values: dict | None = None):
        values = values or {}
        self.t = torch.tensor([float(values.get(k, 0.0)) for k in self.FIELDS], dtype=torch.float64, device=device)

    def add(self, r: StepResult) -> None:
        self._add(r, 0)

    def add_arch(self, r: StepResult) -> None:
        self._add(r, 3)

    def _add(self, r: StepResult, at: int) -> None:
        ok = r.ok_t.to(torch.float64)
        self.t[at:at + 3] += torch.stack([torch.where(r.ok_t, r.loss_t.double() * r.count, 0.0),
                                          r.correct_t.double() * ok, ok * r.count])
        self.t[6] += 1.0 - ok

    def values(self) -> dict:
        """Every sum as a number (one host read); counts as ints."""
        v = dict(zip(self.FIELDS, self.t.tolist()))
        return {k: (int(x) if k in ("correct", "count", "arch_correct", "arch_count", "skipped") else x)
                for k, x in v.items()}

    @staticmethod
    def postfix(v: dict) -> dict:
        return dict(loss=f"{v['loss'] / max(v['count'], 1):.3f}", acc=f"{100 * v['correct'] / max(v['count'], 1):.1f}%")


def progress_bar(total: int, desc: str, interval: float, initial: int = 0, disable: bool = False) -> tqdm:
    """The epoch's progress bar: stderr, gone when the epoch ends, off when stderr is not a terminal (and on
    the ranks other than 0 of a data-parallel run)."""
    return tqdm(total=total, desc=desc, leave=False, mininterval=interval, file=sys.stderr,
                disable=True if disable else None, dynamic_ncols=True, initial=initial)


def epoch_record(*, phase: str, epoch: int, epochs: int, progress, sums: dict, val: tuple, arch, model,
                 genotype, lr: float, n_steps: int, train_s: float, searching: bool, compile_totals: dict) -> dict:
    """metrics.jsonl's record of one epoch (`epoch` counts from 1; `progress` as after the epoch's steps;
    `sums`: EpochSums.values())."""
    val_loss, val_acc = val
    stats = arch.statistics()
    s = sums
    images = s["count"] + s["arch_count"]
    record = {
        "phase": phase, "epoch": epoch, "epochs": epochs, "global_epoch": progress.global_epoch + 1,
        "step": progress.global_step, "arch_steps": progress.arch_steps,
        "train_loss": rounded(s["loss"] / max(s["count"], 1)), "train_acc": rounded(s["correct"] / max(s["count"], 1)),
        "val_loss": rounded(val_loss), "val_acc": rounded(val_acc),
        "arch_loss": rounded(s["arch_loss"] / s["arch_count"]) if s["arch_count"] else None,
        "arch_acc": rounded(s["arch_correct"] / s["arch_count"]) if s["arch_count"] else None,
        "mean_entropy": rounded(stats["mean_entropy"]), "tau": rounded(arch.tau) if searching else None,
        "lr": rounded(lr), "it_s": rounded(n_steps / train_s, 3),
        "images_s": rounded(images / train_s, 1), "epoch_s": rounded(train_s, 2),
        "params": count_parameters(model), "cells": len(model.cells), "channels": model.spec.cells[0].c,
        "skipped_steps": progress.skipped, "nan_events": stats["nan_events"], **compile_totals,
        "genotype": str(genotype), "param_free": genotype.param_free_fraction(),
    }
    if searching:
        record["histogram"] = {t: stats[f"{t}_histogram"] for t in ("normal", "reduce")}
        # per edge and op, how consistently the architecture steps so far pushed the logit (ArchState.drift)
        record["drift"] = {t: stats[f"{t}_drift"] for t in ("normal", "reduce")}
        record["arch_grad_steps"] = stats["arch_grad_steps"]
    if model.is_supernet:  # the expected architecture (softmax of the logits) per edge and op: the report's heatmaps
        record["probs"] = {t: [[round(v, 4) for v in row] for row in arch.probabilities(t).tolist()]
                           for t in ("normal", "reduce")}
    return record


def epoch_line(r: dict) -> str:
    pct = lambda v: "  -  " if v is None else f"{100 * v:5.2f}%"  # noqa: E731
    tau = f" tau {r['tau']:.3f}" if r.get("tau") is not None else ""
    return (f"{r['phase']:<8} {r['epoch']:>2}/{r['epochs']:<2} loss {r['train_loss']:.4f} acc {pct(r['train_acc'])} "
            f"val {pct(r['val_acc'])} arch {pct(r['arch_acc'])} H {r['mean_entropy']:.3f}{tau} "
            f"| {r['it_s']:.2f} it/s {r['images_s']:.0f} img/s | {r['params']:,} params | "
            + (f"compiles {r['compiles']} recompiles {r['recompiles']} ({r['compile_s']:.0f}s) | "
               if r.get("compiles") or r.get("recompiles") else "")
            + (f"{fmt_cost(r['cost']['metric'], r['cost']['derived'])} derived, "
               f"{fmt_cost(r['cost']['metric'], r['cost']['expected'])} expected | " if r.get("cost") else "")
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
