"""Phase-specific step functions: the only code that runs forward, backward and optimizer updates.

    weight_step(x, y)   train split: forward, backward to the network weights only, clip, SGD step
    arch_step(x, y)     val split: forward, gradient to the logits only (first-order DARTS), Adam step
    evaluate(loader)    eval mode, no gradients

An architecture step asks autograd for the logits' gradient alone (`torch.autograd.grad(loss, logits)`), so
no weight gradient is ever computed for it, and a weight step builds its edge weights detached from the
logits, so no logit gradient exists. Neither can move the other's parameters.

A non-finite loss or gradient skips the step (nothing is updated); the trainer counts the skips.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .arch import Architecture
from .network import Network
from .profiling import nvtx_range


@dataclass
class StepResult:
    loss: float
    correct: int
    count: int
    skipped: bool = False


def cosine_lr(step: int, total: int, lr: float, lr_min: float) -> float:
    if total <= 0:
        return lr
    return lr_min + 0.5 * (lr - lr_min) * (1 + math.cos(math.pi * min(step, total) / total))


class Steps:
    """Steps for one model. For the supernet, `phase` picks the architecture policy of each step."""

    def __init__(self, net: Network, weight_opt: torch.optim.Optimizer, *, arch: Architecture | None = None,
                 arch_opt: torch.optim.Optimizer | None = None, grad_clip: float = 5.0,
                 label_smoothing: float = 0.0, channels_last: bool = False,
                 generator: torch.Generator | None = None):
        self.net, self.weight_opt, self.arch, self.arch_opt = net, weight_opt, arch, arch_opt
        self.grad_clip, self.label_smoothing = grad_clip, label_smoothing
        self.channels_last = channels_last
        self.generator = generator  # Gumbel noise: seeded and checkpointed, so a resumed run samples the same

    def criterion(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def _forward(self, x, phase: str | None, grad_arch: bool):
        if self.net.is_supernet:
            sample = self.arch.sample(phase, grad=grad_arch, generator=self.generator)
            return self.net(x, sample)
        return self.net(x)

    def weight_step(self, x: torch.Tensor, y: torch.Tensor, phase: str | None = None) -> StepResult:
        self.net.train()
        with nvtx_range("forward"):
            out = self._forward(self._input(x), phase, grad_arch=False)
            loss = self.criterion(out, y)
        loss_value = float(loss.detach())  # sync point: needed to decide whether to step
        if not math.isfinite(loss_value):
            return StepResult(loss_value, 0, len(y), skipped=True)
        params = [p for g in self.weight_opt.param_groups for p in g["params"]]
        self.weight_opt.zero_grad(set_to_none=True)
        with nvtx_range("backward"):
            loss.backward(inputs=params)
        with nvtx_range("optimizer"):
            norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip) if self.grad_clip > 0 else \
                torch.stack([p.grad.norm() for p in params if p.grad is not None]).norm()
            if not torch.isfinite(norm):
                self.weight_opt.zero_grad(set_to_none=True)
                return StepResult(loss_value, 0, len(y), skipped=True)
            self.weight_opt.step()
        return StepResult(loss_value, int((out.detach().argmax(1) == y).sum()), len(y))

    def arch_step(self, x: torch.Tensor, y: torch.Tensor, phase: str) -> StepResult:
        self.net.train()
        logits = list(self.arch.parameters())
        with nvtx_range("forward"):
            out = self._forward(self._input(x), phase, grad_arch=True)
            loss = self.criterion(out, y)
        loss_value = float(loss.detach())
        if not math.isfinite(loss_value):
            return StepResult(loss_value, 0, len(y), skipped=True)
        with nvtx_range("backward"):
            grads = torch.autograd.grad(loss, logits, allow_unused=True)
        if not all(g is None or bool(torch.isfinite(g).all()) for g in grads):
            return StepResult(loss_value, 0, len(y), skipped=True)
        with nvtx_range("optimizer"):
            for p, g in zip(logits, grads):
                p.grad = torch.zeros_like(p) if g is None else g
            self.arch_opt.step()
            self.arch_opt.zero_grad(set_to_none=True)
            self.arch.repair_()  # belt and braces: a non-finite logit row is re-initialized, and counted
        return StepResult(loss_value, int((out.detach().argmax(1) == y).sum()), len(y))

    @torch.no_grad()
    def evaluate(self, loader, phase: str | None = None) -> tuple[float, float]:
        """(mean loss, accuracy) in eval mode. The supernet is evaluated at `phase`'s constant weights
        ("warmup": all skip_connect, "derive": the current genotype)."""
        self.net.eval()
        sample = self.arch.sample(phase) if self.net.is_supernet else None
        total_loss, correct, count = 0.0, 0, 0
        for x, y in loader:
            out = self.net(self._input(x), sample) if sample is not None else self.net(self._input(x))
            total_loss += float(F.cross_entropy(out, y, reduction="sum"))
            correct += int((out.argmax(1) == y).sum())
            count += len(y)
        self.net.train()
        return total_loss / max(count, 1), correct / max(count, 1)

    @torch.no_grad()
    def recalibrate_bn(self, loader, batches: int, phase: str | None = None) -> None:
        """Re-estimate BatchNorm running statistics for the architecture `phase` evaluates (a one-shot NAS
        habit: shared BN statistics were gathered under other sampled architectures)."""
        if batches <= 0:
            return
        bns = [m for m in self.net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        saved = [m.momentum for m in bns]
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the calibration batches
        self.net.train()
        sample = self.arch.sample(phase) if self.net.is_supernet else None
        for i, (x, _) in enumerate(loader):
            if i >= batches:
                break
            self.net(self._input(x), sample) if sample is not None else self.net(self._input(x))
        for m, mom in zip(bns, saved):
            m.momentum = mom
