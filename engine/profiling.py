"""NVTX ranges for Nsight Systems and torch.profiler traces per phase.

Ranges (nested): phase > epoch > weight_step | arch_step > forward | backward | optimizer, plus data_wait,
eval, compile and growth. They cost nothing when off (a shared no-op context manager); `enable_nvtx()`
turns them on (`--nvtx`). Run under Nsight with:

    nsys profile -t cuda,nvtx -o search aso-se search --preset cifar10 --nvtx --out runs/c10
"""
from __future__ import annotations

import contextlib

_NULL = contextlib.nullcontext()
_enabled = False
_DOMAIN = "aso-se"


def enable_nvtx(on: bool = True) -> None:
    global _enabled
    if on:
        import nvtx  # noqa: F401  (fail early, with the import error, if the package is missing)
    _enabled = on


def nvtx_enabled() -> bool:
    return _enabled


def nvtx_range(name: str):
    """`with nvtx_range("forward"): ...` -- a real NVTX push/pop when enabled, a shared no-op otherwise."""
    if not _enabled:
        return _NULL
    import nvtx
    return nvtx.annotate(name, domain=_DOMAIN)
