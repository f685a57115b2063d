"""Counting host reads: every place the host waits for a tensor's value.

On a GPU the host runs ahead of the device only while it never needs a device value; `float(loss)`,
`int(correct)`, `bool(isfinite(norm))`, `t.tolist()`, `nonzero`, boolean-mask indexing each make it wait until
every queued kernel has finished. On the CPU those reads cost nothing, so they go unnoticed: this counts them
on CPU tensors exactly where they would stall a GPU, so tests can hold the engine to its budget
(tests/test_hostreads.py) and `bench/step.py` can print reads per iteration.

    with HostReads() as reads:
        steps.weight_step(x, y)
    reads.count, reads.sites     # number of reads, and "file:line" of the engine code that made them

Caught: `aten._local_scalar_dense` (item, float, int, bool of a tensor), `aten.nonzero` and the ops built on it
(boolean-mask indexing and index_put, masked_select, one-argument where), `aten.equal`, device-to-host copies
that block, and `Tensor.tolist` / `Tensor.numpy`, which read memory without dispatching (wrapped for the block).
A blocking `.cpu()` / `.to("cpu")` of a CPU tensor dispatches nothing either (the tensor is returned as it is),
yet on a GPU the same line is a device-to-host copy that waits: those two methods are wrapped too, and count
when their tensor is on the CPU (a device tensor's copy is counted at dispatch, once). `.to(device)` with a
`torch.device` (or another tensor) is how code moves data to its compute device, which on a CPU run is the
CPU too: it is not counted there, so a read is caught on the CPU when it is spelled as one (`.cpu()`,
`.to("cpu")`, `.numpy()`, `.tolist()`, `.item()` and the rest above).
"""
from __future__ import annotations

import collections
import os
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
_ALWAYS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.nonzero_static.default,
           aten.masked_select.default, aten.equal.default, aten.is_nonzero.default}
_INDEXING = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._unsafe_index.Tensor}
_COPIES = {aten._to_copy.default, aten.copy_.default}
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_OURS = tuple(os.path.join(_ROOT, d) + os.sep for d in ("engine", "kernels", "bench"))


def _bool_index(args) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (indices or ()))


def _blocking_device_to_host(func, args, kwargs) -> bool:
    if func is aten.copy_.default:
        dst, src = args[0], args[1]
        blocking = not (args[2] if len(args) > 2 else kwargs.get("non_blocking", False))
        return blocking and src.device.type != "cpu" and dst.device.type == "cpu"
    src, device = args[0], kwargs.get("device")
    return (not kwargs.get("non_blocking", False) and src.device.type != "cpu"
            and device is not None and torch.device(device).type == "cpu")


def _asks_for_the_host(args, kwargs) -> bool:
    """Whether `Tensor.to(*args, **kwargs)` is spelled as a blocking read to the host: to("cpu"), to(device="cpu"),
    without non_blocking=True. A dtype or memory-format change, or a torch.device (the compute device), is not."""
    target = args[0] if args and isinstance(args[0], str) else kwargs.get("device")
    non_blocking = kwargs.get("non_blocking", False) or any(a is True for a in args[1:3])
    return isinstance(target, str) and torch.device(target).type == "cpu" and not non_blocking


def _site() -> str:
    """The innermost frame in this project's code (engine/, kernels/, bench/) that asked for the read."""
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_code.co_filename
        if name.startswith(_OURS) and not name.endswith("hostreads.py"):
            return f"{os.path.relpath(name, _ROOT)}:{frame.f_lineno} ({frame.f_code.co_name})"
        frame = frame.f_back
    return "(outside the engine)"


class HostReads(TorchDispatchMode):
    """Counts host reads of tensor values made while the block runs (on any thread autograd uses)."""

    def __init__(self):
        super().__init__()
        self.count = 0
        self.sites: collections.Counter[str] = collections.Counter()
        self._patched: dict = {}

    def _hit(self) -> None:
        self.count += 1
        self.sites[_site()] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _ALWAYS or (func in _INDEXING and _bool_index(args)) or \
                (func in _COPIES and _blocking_device_to_host(func, args, kwargs)):
            self._hit()
        return func(*args, **kwargs)

    def __enter__(self):
        counts = {"tolist": lambda t, a, k: True, "numpy": lambda t, a, k: True,
                  "cpu": lambda t, a, k: t.device.type == "cpu",
                  "to": lambda t, a, k: t.device.type == "cpu" and _asks_for_the_host(a, k)}
        for name, counted in counts.items():
            original = getattr(torch.Tensor, name)
            self._patched[name] = original

            def wrapped(t, *a, _original=original, _counted=counted, **k):
                if _counted(t, a, k):
                    self._hit()
                return _original(t, *a, **k)
            setattr(torch.Tensor, name, wrapped)
        return super().__enter__()

    def __exit__(self, *exc):
        for name, original in self._patched.items():
            setattr(torch.Tensor, name, original)
        self._patched.clear()
        return super().__exit__(*exc)

    def report(self, top: int = 8) -> str:
        return f"{self.count} host reads: " + ", ".join(f"{site} x{n}" for site, n in self.sites.most_common(top))
