"""MixedOp: one supernet edge. Runs only the ops the architecture manager marked active and combines their
outputs with `kernels.mixed_sum.mixed_sum`, the single place the weighted sum happens.

    hard sampling      exactly the sampled op runs; in an architecture step its output is multiplied by the
                       straight-through weight (value 1, gradient of the soft sample), so every logit of the
                       edge still gets a gradient
    soft + skipping    ops below skip_threshold never run; a dominant op runs alone (plus ops above
                       keep_threshold); thresholds 0 give the dense DARTS sum
    `none`             never runs: its output and its weight's gradient are exactly zero
"""
from __future__ import annotations

import torch
from torch import nn

from kernels.mixed_sum import mixed_sum

from .ops import PRIMITIVES, gate_output, make_op


class MixedOp(nn.Module):
    def __init__(self, c: int, stride: int, affine: bool = False, gate: bool = True):
        super().__init__()
        self.stride = stride
        ops = [make_op(name, c, stride, affine) for name in PRIMITIVES]
        if gate:  # ops warmup never trains start silent (see ops.gate_output)
            ops = [op if name in ("none", "skip_connect") else gate_output(op) for name, op in zip(PRIMITIVES, ops)]
        self.ops = nn.ModuleList(ops)
        self._runners = None  # compiled per-op graphs when the engine compiles this phase (engine.compile)

    def set_runners(self, runners) -> None:
        """Callables that replace `ops[k](x)` (compiled graphs), or None for the modules themselves."""
        self._runners = runners

    def __getstate__(self):
        """Copies and pickles hold the modules, never the compiled runners (they belong to one network's steps
        and hold process-wide compile state): `copy.deepcopy(supernet)` is an eager supernet."""
        return {**super().__getstate__(), "_runners": None}

    def forward(self, x: torch.Tensor, w: torch.Tensor, active: tuple[int, ...], unit: bool = False):
        """x: (N, C, H, W); w: (K,) this edge's weights; active: op indices to run. Returns the edge's
        output, or None when nothing runs (the node sum then skips the edge)."""
        if not active:
            return None
        run = self._runners or self.ops
        outs = [run[k](x) for k in active]
        if unit:  # constant one-hot weight (warmup, derived, weight step of hard sampling): no multiply
            return outs[0]
        k0 = active[0]
        # views stacked, not w[list(active)]: a list index is a host tensor copied to the device every call
        ws = w[k0:k0 + 1] if len(active) == 1 else torch.stack([w[k] for k in active])
        return mixed_sum(outs, ws)

    def dense(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """The DARTS formulation, every op on the edge: sum_k w_k * op_k(x). The eager baseline."""
        run = self._runners or self.ops
        return sum(w[k] * run[k](x) for k in range(len(self.ops)))
