"""Phase-specific step functions: the only code that runs forward, backward and optimizer updates.

    weight_step(x, y, phase)   train split: forward, backward to the network weights only, clip, SGD step
    arch_step(x, y, phase)     val split: forward, gradient to the logits only (first-order DARTS), Adam step
    evaluate(loader, phase)    eval mode, no gradients (always eager: eval graphs would only add compiles)

An architecture step asks autograd for the logits' gradient alone (`torch.autograd.grad(loss, logits)`), so
no weight gradient is ever computed for it, and a weight step builds its edge weights detached from the
logits, so no logit gradient exists. Neither can move the other's parameters.

What is compiled follows `engine.compile.resolve_policy` (static graphs for warmup/optimize, per-op graphs
for search/growth, the optimizer on CUDA); `invalidate()` throws every graph away so each compiles exactly
once more (growth calls it), and `precompile()` compiles a phase's graphs up front.

A non-finite loss or gradient skips the step (nothing is updated); the trainer counts the skips.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .arch import Architecture
from .compile import CompileMonitor, OpGraphs, eager, monitor as get_monitor, reset as reset_compiled, resolve_policy
from .network import Network
from .profiling import nvtx_range

STATIC_PHASES = ("warmup", "optimize")


@dataclass
class StepResult:
    loss: float
    correct: int
    count: int
    skipped: bool = False


class Steps:
    """Steps for one model. For the supernet, `phase` picks the architecture policy of each step."""

    def __init__(self, net: Network, weight_opt: torch.optim.Optimizer, *, arch: Architecture | None = None,
                 arch_opt: torch.optim.Optimizer | None = None, grad_clip: float = 5.0,
                 label_smoothing: float = 0.0, channels_last: bool = False,
                 generator: torch.Generator | None = None, compile: str = "off", recompile_limit: int = 64):
        self.net, self.weight_opt, self.arch, self.arch_opt = net, weight_opt, arch, arch_opt
        self.grad_clip, self.label_smoothing = grad_clip, label_smoothing
        self.channels_last = channels_last
        self.generator = generator  # Gumbel noise: seeded and checkpointed, so a resumed run samples the same
        device = next(net.parameters()).device
        self.policy = resolve_policy(compile, device)
        self.compiling = self.policy["static"] or self.policy["ops"]
        self.monitor: CompileMonitor | None = get_monitor(recompile_limit) if self.compiling else None
        self._static: dict = {}       # phase -> compiled forward+loss
        self._op_graphs = False
        self._opt_step = None
        self._tensor_lr = False
        if self.policy["optimizer"]:
            self._compile_optimizer()

    # ------------------------------------------------------------------------------------------ setup
    def criterion(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def _graph(self, name: str):
        return self.monitor.graph(name) if self.monitor is not None else contextlib.nullcontext()

    def _compile_optimizer(self) -> None:
        # tensor learning rates: the schedule writes into them, so it never causes a recompile
        for g in self.weight_opt.param_groups:
            g["lr"] = torch.tensor(float(g["lr"]), device=g["params"][0].device)
        self._tensor_lr = True
        self._opt_step = torch.compile(self.weight_opt.step, dynamic=False)

    def set_lr(self, lr: float) -> None:
        for g in self.weight_opt.param_groups:
            if self._tensor_lr:
                g["lr"].fill_(lr)
            else:
                g["lr"] = lr

    def prepare(self, phase: str | None) -> None:
        """Set up the compiled graphs `phase` uses (compiled lazily, on first call, unless precompiled)."""
        if not self.compiling:
            return
        key = phase or "optimize"
        if key in STATIC_PHASES and self.policy["static"] and key not in self._static:
            self._static[key] = torch.compile(self._static_loss(key), mode=self.policy["mode"], dynamic=False)
        if key in ("search", "growth") and self.policy["ops"] and not self._op_graphs:
            OpGraphs(self.net, self.monitor)
            self._op_graphs = True

    def _static_loss(self, phase: str):
        net = self.net
        sample = self.arch.sample("warmup") if phase == "warmup" else None  # a constant of the graph

        def forward_loss(x, y):
            out = net(x, sample) if sample is not None else net(x)
            return self.criterion(out, y), out
        return forward_loss

    def invalidate(self) -> None:
        """Throw every compiled graph away (the network changed): each one compiles exactly once more,
        counted as a recompile."""
        if not self.compiling:
            return
        reset_compiled()
        phases = list(self._static)
        self._static.clear()
        if self._op_graphs:
            OpGraphs.remove(self.net)
            self._op_graphs = False
            phases.append("search")
        if self._opt_step is not None:
            self._opt_step = torch.compile(self.weight_opt.step, dynamic=False)
        for phase in phases:
            self.prepare(phase)

    def precompile(self, x: torch.Tensor, y: torch.Tensor, phase: str | None) -> None:
        """Compile `phase`'s graphs now, on one batch, leaving weights, BN statistics and gradients as they
        were. Search phases run one dense pass, which touches every op variant once."""
        if not self.compiling:
            return
        self.prepare(phase)
        buffers = {k: v.clone() for k, v in self.net.state_dict().items() if "running" in k or "num_batches" in k}
        self.net.train()
        x = self._input(x)
        key = phase or "optimize"
        with self._graph(f"{key}.weight_step"):
            if key in self._static:
                self._mark_step()
                loss, _ = self._static[key](x, y)
            else:
                kinds = ("normal", "reduce")
                dense = {t: torch.full((self.arch.edges, 8), 1 / 8, device=x.device) for t in kinds}
                loss = self.criterion(self.net(x, dense=dense), y)
            loss.backward()
        self.weight_opt.zero_grad(set_to_none=True)
        self.net.load_state_dict(buffers, strict=False)

    def _mark_step(self) -> None:
        if self.policy["mode"] == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()  # CUDA graphs: the previous step's outputs may be reused

    # ------------------------------------------------------------------------------------------ steps
    def _forward(self, x, phase: str | None, grad_arch: bool):
        if self.net.is_supernet:
            sample = self.arch.sample(phase, grad=grad_arch, generator=self.generator)
            return self.net(x, sample)
        return self.net(x)

    def _train_mode(self) -> None:
        """`Module.train()` walks every submodule: ~35 ms per call on the main job's supernet (3,000
        modules), a fifth of a search iteration. Mode changes all go through the root, so its flag tells."""
        if not self.net.training:
            self.net.train()

    def weight_step(self, x: torch.Tensor, y: torch.Tensor, phase: str | None = None) -> StepResult:
        self._train_mode()
        key = phase or "optimize"
        with self._graph(f"{key}.weight_step"):
            with nvtx_range("forward"):
                x = self._input(x)
                if key in self._static:
                    self._mark_step()
                    loss, out = self._static[key](x, y)
                else:
                    out = self._forward(x, phase, grad_arch=False)
                    loss = self.criterion(out, y)
            loss_value = float(loss.detach())  # sync point: needed to decide whether to step
            if not math.isfinite(loss_value):
                return StepResult(loss_value, 0, len(y), skipped=True)
            correct = int((out.detach().argmax(1) == y).sum())
            params = [p for g in self.weight_opt.param_groups for p in g["params"]]
            self.weight_opt.zero_grad(set_to_none=True)
            with nvtx_range("backward"):
                loss.backward(inputs=params)
            with nvtx_range("optimizer"):
                norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip if self.grad_clip > 0 else float("inf"))
                if not torch.isfinite(norm):
                    self.weight_opt.zero_grad(set_to_none=True)
                    return StepResult(loss_value, 0, len(y), skipped=True)
                (self._opt_step or self.weight_opt.step)()
        return StepResult(loss_value, correct, len(y))

    def arch_step(self, x: torch.Tensor, y: torch.Tensor, phase: str) -> StepResult:
        self._train_mode()
        logits = list(self.arch.parameters())
        with self._graph(f"{phase}.arch_step"):
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

    # ------------------------------------------------------------------------------------------ eval
    def eager(self):
        """Compiled graphs off for the block (evaluation): a nullcontext when nothing is compiled."""
        return eager() if self.compiling else contextlib.nullcontext()

    @torch.no_grad()
    def evaluate(self, loader, phase: str | None = None, flip: bool = False) -> tuple[float, float]:
        """(mean loss, accuracy) in eval mode. The supernet is evaluated at `phase`'s constant weights
        ("warmup": all skip_connect, "argmax": most likely ops, "derive": the genotype). `flip`: test-time
        augmentation, the mean of the logits of each image and its mirror (for networks trained with flips)."""
        self.net.eval()
        sample = self.arch.sample(phase) if self.net.is_supernet else None
        total_loss, correct, count = 0.0, 0, 0
        with self.eager():
            for x, y in loader:
                out = self._eval_forward(x, sample)
                if flip:
                    out = 0.5 * (out + self._eval_forward(x.flip(-1), sample))
                total_loss += float(F.cross_entropy(out, y, reduction="sum"))
                correct += int((out.argmax(1) == y).sum())
                count += len(y)
        self.net.train()
        return total_loss / max(count, 1), correct / max(count, 1)

    def _eval_forward(self, x: torch.Tensor, sample) -> torch.Tensor:
        return self.net(self._input(x), sample) if sample is not None else self.net(self._input(x))

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
        with self.eager():
            for i, (x, _) in enumerate(loader):
                if i >= batches:
                    break
                self.net(self._input(x), sample) if sample is not None else self.net(self._input(x))
        for m, mom in zip(bns, saved):
            m.momentum = mom
