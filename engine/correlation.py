"""Rank correlations, for the benches and the latency table's check: no scipy needed for three formulas."""
from __future__ import annotations

import numpy as np


def ranks(values: np.ndarray) -> np.ndarray:
    """Ranks from 1, ties given their average rank."""
    order = np.argsort(values, kind="stable")
    r = np.empty(len(values))
    r[order] = np.arange(1, len(values) + 1)
    for v in np.unique(values):
        tied = values == v
        r[tied] = r[tied].mean()
    return r


def kendall_tau_b(x: np.ndarray, y: np.ndarray) -> float:
    """Kendall's tau-b (ties in either variable accounted for); nan when either is constant."""
    n = len(x)
    conc = disc = tie_x = tie_y = 0
    for i in range(n):
        dx, dy = np.sign(x[i + 1:] - x[i]), np.sign(y[i + 1:] - y[i])
        conc += int(np.sum(dx * dy > 0))
        disc += int(np.sum(dx * dy < 0))
        tie_x += int(np.sum((dx == 0) & (dy != 0)))
        tie_y += int(np.sum((dy == 0) & (dx != 0)))
    denom = np.sqrt((conc + disc + tie_x) * (conc + disc + tie_y))
    return float((conc - disc) / denom) if denom > 0 else float("nan")


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    rx, ry = ranks(x), ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])
