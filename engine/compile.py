"""Compilation for the steps: which graphs exist per phase, how they are counted, and how they are thrown away.

Strategy (measured on the 2-core CPU; see README "Compiling"):
    warmup, optimize    static op set: the whole forward+loss is one graph (AOTAutograd compiles its
                        backward); on CUDA with mode="reduce-overhead", so the step replays as a CUDA graph
    search, growth      the executed op set changes every step (hard sampling, skipping): one graph per op
                        variant (op, stride, feature-map size), routed eagerly by the mixed op, so any sample
                        runs compiled code and a new sample never compiles anything
    optimizer           never compiled: on CUDA the fused SGD/Adam kernels (one multi-tensor launch, the skip
                        of a non-finite step decided on the device), so the changing set of sampled ops (None
                        grads) and the schedule (a float argument) can cause no recompile

`CompileMonitor` counts and times every compilation from torch's own callbacks (torch._dynamo
callback_handler) and attributes it to the graph being run. A compilation of a graph compiled before is
a recompile: after `invalidate()` (growth), or a guard failure (its reason is captured from torch's
recompiles log). `recompile_limit` is set explicitly: every per-op graph is a cache entry of one code
object (nn.Module.__call__), so the default of 8 would silently fall back to eager.
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field

import torch

from .profiling import nvtx_enabled

_MONITOR: "CompileMonitor | None" = None


@dataclass
class CompileEvent:
    graph: str
    seconds: float
    recompile: bool
    reason: str


@dataclass
class CompileMonitor:
    events: list[CompileEvent] = field(default_factory=list)
    backward_s: float = 0.0                  # lazily compiled backward graphs: time only
    _current: str = "(outside a step)"
    _seen: set = field(default_factory=set)
    _invalidated: set = field(default_factory=set)
    _t0: dict = field(default_factory=dict)
    _guard_reason: str = ""

    # -------------------------------------------------------------------------------- torch's callbacks
    def _start(self, args) -> None:
        self._t0[args.compile_id] = time.perf_counter()
        if nvtx_enabled():
            import nvtx
            nvtx.push_range(f"compile {self._current}", domain="aso-se")

    def _end(self, args) -> None:
        seconds = time.perf_counter() - self._t0.pop(args.compile_id, time.perf_counter())
        if nvtx_enabled():
            import nvtx
            nvtx.pop_range(domain="aso-se")
        if args.callback_trigger.name != "DYNAMO":  # lazy backward, cudagraph recording: part of the graph
            self.backward_s += seconds
            return
        graph = self._current
        if graph in self._invalidated:
            recompile, reason = True, "invalidated"
            self._invalidated.discard(graph)
        elif graph in self._seen:
            recompile, reason = True, self._guard_reason or "guard failure"
        else:
            recompile, reason = False, "first compile"
        self._seen.add(graph)
        self._guard_reason = ""
        self.events.append(CompileEvent(graph, seconds, recompile, reason))

    def _log_reason(self, message: str) -> None:
        lines = [line.strip("- ").strip() for line in message.splitlines() if line.strip().startswith("-")]
        self._guard_reason = "; ".join(lines)[:300] or message[:300]

    # -------------------------------------------------------------------------------- use
    @contextlib.contextmanager
    def graph(self, name: str):
        """Attribute compilations inside the block to `name`."""
        previous, self._current = self._current, name
        try:
            yield
        finally:
            self._current = previous

    def invalidate_all(self) -> None:
        """Everything compiled so far will compile again, and each of those counts as a recompile."""
        self._invalidated = set(self._seen)

    @property
    def graphs(self) -> set[str]:
        return set(self._seen)

    def totals(self) -> dict:
        return {"compiles": sum(not e.recompile for e in self.events),
                "recompiles": sum(e.recompile for e in self.events),
                "compile_s": round(sum(e.seconds for e in self.events) + self.backward_s, 2)}


class _ReasonHandler(logging.Handler):
    def emit(self, record):
        if _MONITOR is not None:
            _MONITOR._log_reason(record.getMessage())


def monitor(recompile_limit: int = 64) -> CompileMonitor:
    """The process-wide monitor (torch's callbacks are process-wide too), created on first use."""
    global _MONITOR
    torch._dynamo.config.recompile_limit = recompile_limit
    torch._dynamo.config.accumulated_recompile_limit = max(256, 4 * recompile_limit)
    if _MONITOR is None:
        _MONITOR = CompileMonitor()
        _attach(_MONITOR)
        log = logging.getLogger("torch._dynamo.guards.__recompiles")
        log.addHandler(_ReasonHandler())
        log.setLevel(logging.DEBUG)
        log.propagate = False  # captured for the metrics, not printed
        torch._logging._internal.log_state.enable_artifact("recompiles")
    return _MONITOR


def _attach(mon: CompileMonitor) -> None:
    torch._dynamo.callback_handler.register_start_callback(mon._start)
    torch._dynamo.callback_handler.register_end_callback(mon._end)


def reset() -> None:
    """Throw away every compiled graph in the process. torch.compiler.reset() also drops the registered
    compile callbacks, so the monitor is attached again."""
    torch.compiler.reset()
    if _MONITOR is not None:
        _MONITOR.invalidate_all()
        _attach(_MONITOR)


def eager():
    """A context in which compiled code runs eagerly (evaluation, growth checks): no compile is triggered."""
    return torch.compiler.set_stance("force_eager")


def resolve_policy(setting: str, device: torch.device) -> dict:
    """What is compiled, per the `compile` config field ("auto" | "on" | "static" | "off") and the device.
    "static" compiles only the static phases' graphs (warmup, optimize), not the search's per-op graphs.

    auto on CPU compiles nothing: measured on the 2-core CPU with a cold inductor cache (README
    "Compiling"), compiling costs more than it saves in warmup (56 s for 2.4x over 468 steps), per-op graphs
    are slower than eager in search, optimize breaks even at best (258 s for 1.16x over 1407 steps), and the
    supernet's dense graph took 738 s to compile for no gain. With a warm cache "static" pays on the CPU.
    auto on CUDA compiles everything, the static phases as CUDA graphs: there, launch overhead dominates
    DARTS's small kernels.
    """
    cuda = device.type == "cuda"
    on = setting == "on" or (setting == "auto" and cuda)
    return {"static": on or setting == "static", "ops": on, "sync_free": cuda,
            "mode": "reduce-overhead" if cuda else "default"}


class OpGraphs:
    """Per-op compiled graphs for the supernet's mixed ops (search and growth)."""

    def __init__(self, net, mon: CompileMonitor):
        from .mixed import MixedOp
        from .ops import PRIMITIVES
        self.monitor = mon
        for cell in net.cells:
            for edge in getattr(cell, "edges", []):
                if not isinstance(edge, MixedOp):
                    continue
                runners = []
                for name, op in zip(PRIMITIVES, edge.ops):
                    if name == "none" or (name == "skip_connect" and edge.stride == 1):
                        runners.append(op)  # zeros / identity: nothing to compile
                    else:
                        runners.append(_OpRunner(op, f"op:{name}:s{edge.stride}", mon))
                edge.set_runners(runners)

    @staticmethod
    def remove(net) -> None:
        for cell in net.cells:
            for edge in getattr(cell, "edges", []):
                if hasattr(edge, "set_runners"):
                    edge.set_runners(None)


class _OpRunner:
    """Calls a compiled op, naming its graph (op, stride, feature-map size) for the monitor."""

    def __init__(self, op, name: str, mon: CompileMonitor):
        self.compiled = torch.compile(op, dynamic=False, fullgraph=True)
        self.name, self.monitor = name, mon

    def __call__(self, x):
        with self.monitor.graph(f"{self.name}:{x.shape[-2]}x{x.shape[-1]}"):
            return self.compiled(x)
