"""The eager DARTS baseline every speed figure is measured against (bench/step.py, bench/supernet.py, tests).

The DARTS formulation (Liu et al. 2019), eager: every op on every edge, `sum_k w_k * op_k(x)` with softmax
weights of the logits (warmup: one-hot skip_connect), no sampling, no skipping, no compile; its
architecture step back-propagates into every weight as well as the logits, as first-order DARTS'
`loss.backward()` does. It runs on the engine's own supernet and architecture, so the two are compared on
the same parameters, with DARTS' own dilated convs (`darts_convolutions`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .arch import Architecture
from .genotype import CELL_TYPES, SKIP
from .network import Network
from .ops import Depthwise


def darts_convolutions(net: torch.nn.Module) -> torch.nn.Module:
    """Run every dilated conv as nn.Conv2d's own (DARTS' op), not on the even pixels as the engine does
    (engine/ops.py `Depthwise`); the outputs are the same, the speed is DARTS'."""
    for m in net.modules():
        if isinstance(m, Depthwise):
            m.even_pixels = False
    return net


class EagerDarts:
    def __init__(self, net: Network, arch: Architecture, weight_opt: torch.optim.Optimizer | None = None,
                 arch_opt: torch.optim.Optimizer | None = None, grad_clip: float = 5.0,
                 memory_format: torch.memory_format = torch.contiguous_format):
        self.net, self.arch, self.weight_opt, self.arch_opt = darts_convolutions(net), arch, weight_opt, arch_opt
        self.grad_clip, self.memory_format = grad_clip, memory_format
        self.params = list(net.parameters())

    def weights(self, phase: str) -> dict[str, torch.Tensor]:
        if phase == "warmup":
            w = torch.zeros_like(self.arch.logits["normal"], requires_grad=False)
            w[:, SKIP] = 1.0
            return {t: w for t in CELL_TYPES}
        return {t: torch.softmax(self.arch.logits[t], 1) for t in CELL_TYPES}

    def forward(self, x: torch.Tensor, phase: str, detach: bool = False) -> torch.Tensor:
        w = self.weights(phase)
        if detach:
            w = {t: v.detach() for t, v in w.items()}
        return self.net(x.contiguous(memory_format=self.memory_format), dense=w)

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor, phase: str = "search") -> torch.Tensor:
        """Gradients of the loss to every weight and every logit (what both DARTS steps compute)."""
        self.net.zero_grad(set_to_none=True)
        self.arch.zero_grad(set_to_none=True)
        loss = F.cross_entropy(self.forward(x, phase), y)
        loss.backward()
        return loss

    def weight_step(self, x: torch.Tensor, y: torch.Tensor, phase: str) -> torch.Tensor:
        self.weight_opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(self.forward(x, phase, detach=True), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.weight_opt.step()
        return loss.detach()

    def arch_step(self, x: torch.Tensor, y: torch.Tensor, phase: str) -> torch.Tensor:
        loss = self.forward_backward(x, y, phase)  # DARTS: gradients to every weight too
        self.arch_opt.step()
        return loss.detach()
