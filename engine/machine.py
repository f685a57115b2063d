"""What a run's numbers depend on besides its config: the software and the hardware that computed them.

A run is reproducible bit for bit only where these agree: the same torch build, the same CPU capability
(the vector instruction set torch's CPU kernels were dispatched to: AVX512 and AVX2 hosts round their
convolutions' sums in another order), the same number of CPU threads and the same GPU. `Trainer` writes
`machine.json` into the run directory when the run starts and adds an entry on every resume, and says so
in one line when a resume computes on another kind of machine (NUMERICS).
"""
from __future__ import annotations

import importlib.metadata
import platform

import torch

NUMERICS = ("torch", "cpu_capability", "cpu_threads", "gpu")  # a change in any of them changes float results


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict:
    """Versions and hardware: python, torch, CPU threads, model and capability, triton, DALI, GPU."""
    info = {"python": platform.python_version(), "torch": torch.__version__, "cpu_threads": torch.get_num_threads(),
            "cpu": cpu_model(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "machine": platform.machine()}
    try:
        import triton  # already loaded with kernels/
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    info["dali"] = _installed_version("nvidia-dali")  # from its metadata: importing DALI costs half a second
    info["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return info


def _installed_version(prefix: str) -> str | None:
    """The version of the installed distribution whose name starts with `prefix` (DALI's carries its CUDA
    major: nvidia-dali-cuda120), None when there is none."""
    for dist in importlib.metadata.distributions():
        if (dist.metadata["Name"] or "").lower().startswith(prefix):
            return dist.version
    return None


def numerics_changes(before: dict, now: dict) -> list[str]:
    """'key: before -> now' for each NUMERICS entry that differs (keys a record lacks are not compared)."""
    return [f"{k}: {before[k]} -> {now[k]}" for k in NUMERICS if k in before and k in now and before[k] != now[k]]
