"""Schedules: how many steps each phase runs, and learning rate, temperature and hand-over bias as pure
functions of run progress (phase, epoch, step counts). Nothing here holds state or touches a tensor.

    budget = Budget(cfg, train_batches=len(loaders["train"]), optimize_batches=...)
    budget.steps_in_epoch("search", 0)            weight steps in the first search epoch
    cosine_lr(step, total, cfg.lr, cfg.lr_min)    learning rate of a weight step
    temperature_at(cfg, budget, "growth", 0, 120) Gumbel temperature after 120 architecture steps
    handover_bias(cfg, "search", 0.25)            skip_connect sampling bias a quarter into search
"""
from __future__ import annotations

import math

from .arch import temperature
from .config import Config

SUPERNET_PHASES = ("warmup", "search", "growth")
SEARCHING_PHASES = ("search", "growth")


def cosine_lr(step: int, total: int, lr: float, lr_min: float) -> float:
    if total <= 0:
        return lr
    return lr_min + 0.5 * (lr - lr_min) * (1 + math.cos(math.pi * min(step, total) / total))


class Budget:
    """Epochs and steps per phase. A fractional epoch budget shortens the phase's last epoch;
    `steps_per_epoch` caps the supernet phases' epochs. `optimize_batches` may be unknown (None) until
    the derived network's loader exists; only the optimize phase needs it."""

    def __init__(self, cfg: Config, train_batches: int, optimize_batches: int | None = None):
        self.cfg, self.train_batches, self.optimize_batches = cfg, train_batches, optimize_batches

    def epochs_budget(self, phase: str) -> float:
        return getattr(self.cfg, f"{phase}_epochs")

    def epochs(self, phase: str) -> int:
        return math.ceil(self.epochs_budget(phase))

    def steps_in_epoch(self, phase: str, epoch: int) -> int:
        if phase == "optimize":
            if self.optimize_batches is None:
                raise RuntimeError("the optimize phase's batches per epoch are not known yet")
            full = self.optimize_batches
        else:
            full = self.train_batches
            if self.cfg.steps_per_epoch:
                full = min(full, self.cfg.steps_per_epoch)
        budget = self.epochs_budget(phase)
        frac = budget - epoch if epoch + 1 > budget else 1.0
        return max(1, int(round(full * frac)))

    def steps_before(self, phase: str, epoch: int) -> int:
        """Weight steps of `phase` in its epochs before `epoch`."""
        return sum(self.steps_in_epoch(phase, e) for e in range(epoch))

    def phase_steps(self, phase: str) -> int:
        return self.steps_before(phase, self.epochs(phase))

    def supernet_steps(self) -> int:
        """Weight steps of warmup, search and growth together: the supernet's learning-rate horizon."""
        return sum(self.phase_steps(p) for p in SUPERNET_PHASES)

    def arch_start_steps(self) -> int:
        """Weight steps of the search phase before its first architecture step (`arch_start_epochs`)."""
        start, steps = self.cfg.arch_start_epochs, 0
        for e in range(self.epochs("search")):
            if start <= e:
                break
            n = self.steps_in_epoch("search", e)
            steps += n if start >= e + 1 else int(round(n * (start - e)))
        return steps

    def arch_steps(self) -> tuple[int, int]:
        """(architecture steps in search, in growth)."""
        every = self.cfg.arch_every
        return (self.phase_steps("search") // every - self.arch_start_steps() // every,
                self.phase_steps("growth") // every)

    def arch_active(self, phase: str, epochs_done: float) -> bool:
        """Whether architecture steps run at this point of `phase` (epochs_done: fractional epochs)."""
        return phase == "growth" or (phase == "search" and epochs_done >= self.cfg.arch_start_epochs)


def handover_bias(cfg: Config, phase: str, epochs_done: float) -> float:
    """Sampling bias on skip_connect at the start of search, decaying linearly to 0: the sampled
    architectures move from the warmup one (all skip) to the learned distribution gradually, so the
    weights learned in warmup are not thrown into random architectures (the 39% -> 10% collapse)."""
    if phase != "search" or cfg.handover_bias == 0 or cfg.handover_epochs == 0:
        return 0.0
    return cfg.handover_bias * max(0.0, 1.0 - epochs_done / cfg.handover_epochs)


def temperature_at(cfg: Config, budget: Budget, phase: str, epoch: int, arch_steps: int) -> float:
    """The Gumbel temperature in `phase` at `epoch` after `arch_steps` architecture steps in all: annealed over
    the architecture steps of search and growth ("exp") or over their epochs ("linear"); growth may restart
    from its own `growth_tau_start`."""
    n_search, n_growth = budget.arch_steps()
    start = cfg.search_tau_start or cfg.tau_max
    if cfg.tau_schedule == "linear":
        done = epoch + (budget.epochs("search") if phase == "growth" else 0)
        total = budget.epochs("search") + budget.epochs("growth")
    else:
        done, total = arch_steps, n_search + n_growth
    if phase == "growth" and cfg.growth_tau_start:
        start = cfg.growth_tau_start
        done = done - (n_search if cfg.tau_schedule == "exp" else budget.epochs("search"))
        total = n_growth if cfg.tau_schedule == "exp" else budget.epochs("growth")
    return temperature(done, total, start, cfg.tau_min, cfg.tau_schedule)
