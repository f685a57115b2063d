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
        for name in ("tolist", "numpy"):
            original = getattr(torch.Tensor, name)
            self._patched[name] = original

            def wrapped(t, *a, _original=original, **k):
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
