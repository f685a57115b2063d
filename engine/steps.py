"""Phase-specific step functions: the only code that runs forward, backward and optimizer updates.

    weight_step(x, y, phase)   train split: forward, backward to the network weights only, clip, SGD step
    arch_step(x, y, phase)     val split: forward, gradient to the logits only (first-order DARTS), Adam step
    evaluate(loader, phase)    eval mode, no gradients (always eager: eval graphs would only add compiles)

An architecture step asks autograd for the logits' gradient alone (`torch.autograd.grad(loss, logits)`), so
no weight gradient is ever computed for it, and a weight step builds its edge weights detached from the
logits, so no logit gradient exists. Neither can move the other's parameters.

What is compiled follows `engine.compile.resolve_policy` (static graphs for warmup/optimize, per-op graphs
for the weight steps of search/growth; architecture steps and evaluation run eagerly, the optimizer is never
compiled); `invalidate()` throws every graph away so each compiles exactly once more (growth calls it), and
`precompile()` compiles a phase's graphs up front.

A non-finite loss or gradient skips the step (nothing is updated); the trainer counts the skips.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from .arch import Architecture
from .distributed import SINGLE, World, average_buffers_, average_gradients_, sum_
from .errors import ConfigError
from .genotype import CELL_TYPES
from .compile import CompileMonitor, OpGraphs, eager, monitor as get_monitor, reset as reset_compiled, resolve_policy
from .network import Network
from .profiling import nvtx_range

STATIC_PHASES = ("warmup", "optimize")


class StepResult:
    """One step's outcome, kept on the device: `loss` (the raw loss), `correct` (right predictions), `ok`
    (False: a non-finite loss or gradient, so nothing was updated) are tensors the loop sums on the device
    (records.EpochSums). The float/int/bool properties read them back: a host read each (tests, benches)."""
    __slots__ = ("loss_t", "correct_t", "ok_t", "count")

    def __init__(self, loss: torch.Tensor, correct: torch.Tensor, count: int, ok: torch.Tensor):
        self.loss_t, self.correct_t, self.count, self.ok_t = loss, correct, count, ok

    @property
    def loss(self) -> float:
        return float(self.loss_t)

    @property
    def correct(self) -> int:
        return int(self.correct_t) if bool(self.ok_t) else 0

    @property
    def skipped(self) -> bool:
        return not bool(self.ok_t)


def configure_optimizer(opt: torch.optim.Optimizer, fused: bool) -> None:
    """Fused optimizers (one multi-tensor kernel, and a skip decided on the device through `found_inf`, as
    torch.amp's GradScaler does) where steps must not read the device; torch's default implementation
    elsewhere. Applied again after `load_state_dict`, which brings back the flags a checkpoint was written with."""
    for g in opt.param_groups:
        if fused:
            g["fused"], g["foreach"] = True, None
        elif g.get("fused"):
            g["fused"] = None   # the constructor's default: torch picks (the for-loop kernels on the CPU)
    if not fused:
        return
    for p, st in opt.state.items():  # written without fusing: Adam's step count on the CPU, the kernel wants it by p
        if torch.is_tensor(st.get("step")) and st["step"].device != p.device:
            st["step"] = st["step"].to(p.device)
    for g in opt.param_groups:
        if isinstance(opt, torch.optim.SGD) and g["momentum"] != 0:
            # torch's fused SGD fails when only some parameters have a momentum buffer (a sampled op's first
            # update); a zero buffer gives that update exactly what the first one would: 0.9 * 0 + d_p = d_p
            for p in g["params"]:
                if "momentum_buffer" not in opt.state[p] or opt.state[p]["momentum_buffer"] is None:
                    opt.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def optimizer_step(opt: torch.optim.Optimizer, ok: torch.Tensor, sync_free: bool) -> None:
    """`opt.step()` unless `ok` is False. sync_free: the fused kernel skips the update on the device when
    found_inf is set (momentum and Adam moments untouched, Adam's step count restored), so the host never
    reads `ok`; otherwise the host reads it (the CPU, where a read is a load from memory)."""
    if sync_free:
        opt.found_inf = (~ok).to(torch.float32)
        try:
            opt.step()
        finally:
            del opt.found_inf
    elif bool(ok):
        opt.step()


class Steps:
    """Steps for one model. For the supernet, `phase` picks the architecture policy of each step."""

    def __init__(self, net: Network, weight_opt: torch.optim.Optimizer, *, arch: Architecture | None = None,
                 arch_opt: torch.optim.Optimizer | None = None, grad_clip: float = 5.0,
                 label_smoothing: float = 0.0, channels_last: bool = False,
                 generator: torch.Generator | None = None, compile: str = "off", recompile_limit: int = 64,
                 world: World = SINGLE, grad_sync: str = "allreduce", cost_term=None):
        self.net, self.weight_opt, self.arch, self.arch_opt = net, weight_opt, arch, arch_opt
        self.cost_term = cost_term  # engine/cost.py CostTerm: added to the architecture step's loss
        self.grad_clip, self.label_smoothing = grad_clip, label_smoothing
        self.channels_last = channels_last
        self.generator = generator  # Gumbel noise: seeded and checkpointed, so a resumed run samples the same
        self.world = world          # several ranks: gradients averaged, BN statistics averaged before evaluation
        device = next(net.parameters()).device
        self.policy = resolve_policy(compile, device)
        self.compiling = self.policy["static"] or self.policy["ops"]
        self.monitor: CompileMonitor | None = get_monitor(recompile_limit) if self.compiling else None
        self._static: dict = {}       # phase -> compiled forward+loss
        self._op_graphs = False
        self.sync_free = self.policy["sync_free"]   # no host read in a weight step (fused optimizers)
        self.ddp = self._wrap_ddp(grad_sync, device)
        self.configure_optimizers()

    # ------------------------------------------------------------------------------------------ setup
    def criterion(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def _graph(self, name: str):
        return self.monitor.graph(name) if self.monitor is not None else contextlib.nullcontext()

    def _wrap_ddp(self, grad_sync: str, device: torch.device):
        """grad_sync=ddp (several ranks): weight steps run through DistributedDataParallel instead of the
        flattened all_reduce (`average_gradients_`), for comparison (bench/ddp.py). The supernet needs
        find_unused_parameters (only the sampled ops have gradients; no static graph: the graph changes every
        step). BN buffers stay per rank as with the all_reduce. Architecture steps never go through DDP (their
        backward reaches only the logits). Eager steps only: the all_reduce path keeps the compiled graphs."""
        if not self.world.active or grad_sync != "ddp":
            return None
        if self.compiling:
            raise ConfigError("grad_sync=ddp takes eager steps: add --set compile=off (or keep grad_sync=allreduce, "
                              "which compiles)")
        from torch.nn.parallel import DistributedDataParallel
        return DistributedDataParallel(self.net, device_ids=[device.index] if device.type == "cuda" else None,
                                       find_unused_parameters=self.net.is_supernet, broadcast_buffers=False,
                                       gradient_as_bucket_view=True)

    def configure_optimizers(self) -> None:
        """(Again) after an optimizer's state is loaded from a checkpoint."""
        for opt in (self.weight_opt, self.arch_opt):
            if opt is not None:
                configure_optimizer(opt, self.sync_free)

    def set_lr(self, lr: float) -> None:
        """A Python float: the fused kernel takes it as an argument, so a schedule neither reads the device nor
        recompiles anything."""
        for g in self.weight_opt.param_groups:
            g["lr"] = lr

    def prepare(self, phase: str | None) -> None:
        """Set up the compiled graphs `phase` uses (compiled lazily, on first call, unless precompiled)."""
        if not self.compiling:
            return
        key = phase or "optimize"
        if key in STATIC_PHASES and self.policy["static"] and key not in self._static:
            # fullgraph: a graph break would split the step (and its CUDA graph); it is an error instead
            self._static[key] = torch.compile(self._static_loss(key), mode=self.policy["mode"], dynamic=False,
                                              fullgraph=True)
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
    def prefetch(self, phase: str, plans: list[tuple[bool, float, float]]) -> None:
        """Draw the next steps' samples now, from the run's seeded generator (Architecture.prefetch): `plans` is
        (grad, tau, skip_bias) per step, in the order the steps run; their routing reaches the host in one read."""
        self.arch.prefetch(phase, plans, self.generator)

    def _forward(self, x, phase: str | None, grad_arch: bool, net=None):
        net = net if net is not None else self.net
        if self.net.is_supernet:
            sample = self.arch.sample(phase, grad=grad_arch, generator=self.generator)
            return net(x, sample)
        return net(x)

    def _train_mode(self) -> None:
        """`Module.train()` walks every submodule: ~35 ms per call on the main job's supernet (3,000
        modules), a fifth of a search iteration. Mode changes all go through the root, so its flag tells."""
        if not self.net.training:
            self.net.train()

    def weight_step(self, x: torch.Tensor, y: torch.Tensor, phase: str | None = None) -> StepResult:
        """No host read with `sync_free` (search and growth: the sample's routing read, see Architecture.sample).
        A non-finite loss or gradient norm skips the update, decided on the device."""
        self._train_mode()
        key = phase or "optimize"
        with self._graph(f"{key}.weight_step"):
            with nvtx_range("forward"):
                x = self._input(x)
                if key in self._static:
                    self._mark_step()
                    loss, out = self._static[key](x, y)
                else:
                    out = self._forward(x, phase, grad_arch=False, net=self.ddp)
                    loss = self.criterion(out, y)
            correct = (out.detach().argmax(1) == y).sum()
            params = [p for g in self.weight_opt.param_groups for p in g["params"]]
            self.weight_opt.zero_grad(set_to_none=True)
            with nvtx_range("backward"):
                loss.backward(inputs=params)
                if self.ddp is None:  # data-parallel: every rank applies the same update
                    average_gradients_(params, self.world)
            with nvtx_range("optimizer"):
                norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip if self.grad_clip > 0 else float("inf"))
                ok = torch.isfinite(norm) & torch.isfinite(loss.detach())
                optimizer_step(self.weight_opt, ok, self.sync_free)
        return StepResult(loss.detach(), correct, len(y), ok)

    def arch_step(self, x: torch.Tensor, y: torch.Tensor, phase: str) -> StepResult:
        """One host read (the sample's routing), none when the loop prefetched it with the weight step's. A
        non-finite loss or logit gradient skips the update, decided on the device; non-finite logit rows are
        reset on the device (Architecture.repair_)."""
        self._train_mode()
        logits = list(self.arch.parameters())
        # Eager ops, also where the weight steps run compiled per-op graphs: a compiled graph's backward
        # (AOTAutograd) returns the gradient of every input it was traced with, the weights included, so
        # `autograd.grad(loss, logits)` would pay for weight gradients nobody reads. Eagerly, autograd walks
        # only the paths to the logits (no convolution weight gradient is computed).
        with self._graph(f"{phase}.arch_step"), self.eager():
            with nvtx_range("forward"):
                out = self._forward(self._input(x), phase, grad_arch=True)
                loss = self.criterion(out, y)
                objective = loss if self.cost_term is None else loss + self.cost_term(self.arch.logits)
            with nvtx_range("backward"):
                grads = torch.autograd.grad(objective, logits, allow_unused=True)
        with nvtx_range("optimizer"):
            grads = [torch.zeros_like(p) if g is None else g for p, g in zip(logits, grads)]
            for p, g in zip(logits, grads):
                p.grad = g
            average_gradients_(logits, self.world)  # data-parallel: the logits stay identical on every rank
            ok = torch.stack([torch.isfinite(loss.detach())] + [torch.isfinite(g).all() for g in grads]).all()
            optimizer_step(self.arch_opt, ok, self.sync_free)
            self.arch.state.add_gradients([self.arch.logits[t].grad for t in CELL_TYPES], ok)
            self.arch_opt.zero_grad(set_to_none=True)
            self.arch.repair_()  # belt and braces: a non-finite logit row is reset to the prior, and counted
        return StepResult(loss.detach(), (out.detach().argmax(1) == y).sum(), len(y), ok)

    # ------------------------------------------------------------------------------------------ eval
    def eager(self):
        """Compiled graphs off for the block (evaluation): a nullcontext when nothing is compiled."""
        return eager() if self.compiling else contextlib.nullcontext()

    @torch.no_grad()
    def evaluate(self, loader, phase: str | None = None, flip: bool = False, sample=None) -> tuple[float, float]:
        """(mean loss, accuracy) in eval mode. The supernet is evaluated at `phase`'s constant weights
        ("warmup": all skip_connect, "argmax": most likely ops, "derive": the genotype), or at `sample` when
        given (e.g. `Architecture.genotype_weights`). `flip`: test-time augmentation, the mean of the logits of
        each image and its mirror (for networks trained with flips)."""
        average_buffers_(self.net, self.world)  # data-parallel: every rank evaluates the same network
        self.net.eval()
        if sample is None and self.net.is_supernet:
            sample = self.arch.sample(phase)
        sums, count = None, 0   # (loss sum, correct) on the device, read once at the end
        with self.eager():
            for x, y in loader:
                out = self._eval_forward(x, sample)
                if flip:
                    out = 0.5 * (out + self._eval_forward(x.flip(-1), sample))
                batch = torch.stack([F.cross_entropy(out, y, reduction="sum").double(),
                                     (out.argmax(1) == y).sum().double()])
                sums = batch if sums is None else sums + batch
                count += len(y)
        self.net.train()
        if sums is None:
            sums = torch.zeros(2, dtype=torch.float64, device=next(self.net.parameters()).device)
        if getattr(getattr(loader, "plan", None), "num_shards", 1) > 1:  # a shard each: the whole split's counts
            total = sum_(torch.cat([sums, sums.new_tensor([count])]), self.world).tolist()
            (total_loss, correct), count = total[:2], int(total[2])
        else:
            total_loss, correct = sums.tolist()
        return total_loss / max(count, 1), correct / max(count, 1)

    def _eval_forward(self, x: torch.Tensor, sample) -> torch.Tensor:
        return self.net(self._input(x), sample) if sample is not None else self.net(self._input(x))

    @torch.no_grad()
    def recalibrate_bn(self, loader, batches: int, phase: str | None = None, sample=None) -> None:
        """Re-estimate BatchNorm running statistics for the architecture `phase` evaluates, or `sample` (a
        one-shot NAS habit: shared BN statistics were gathered under other sampled architectures)."""
        if batches <= 0:
            return
        bns = [m for m in self.net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        saved = [m.momentum for m in bns]
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the calibration batches
        self.net.train()
        if sample is None and self.net.is_supernet:
            sample = self.arch.sample(phase)
        with self.eager():
            for i, (x, _) in enumerate(loader):
                if i >= batches:
                    break
                self.net(self._input(x), sample) if sample is not None else self.net(self._input(x))
        for m, mom in zip(bns, saved):
            m.momentum = mom
