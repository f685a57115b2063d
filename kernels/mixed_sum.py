"""mixed_sum: out = sum_k w_k * xs[k] over the inputs whose weight is above eps (placeholder: reference only)."""
from __future__ import annotations

import torch


def mixed_sum_ref(xs, w, eps: float = 0.0):
    out = None
    for k, x in enumerate(xs):
        term = x * w[k]
        out = term if out is None else out + term
    return out


def mixed_sum(xs, w, eps: float = 0.0):
    return mixed_sum_ref(xs, w, eps)
