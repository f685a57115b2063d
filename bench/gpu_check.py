"""The GPU check: everything that can only be measured on a GPU, in one command, the day one is lent.

    make gpu-check                  # = python bench/gpu_check.py --out bench/results
    python bench/gpu_check.py --only ptxas,tests

Parts, each a child process with its own time limit; what each writes lands in `--out` as gpu-*.json:
    tests     the `cuda`-marked tests (CUDA-graph replay of the static weight steps, the kernel in a compiled
              graph, ...) plus the host-read tests                              -> gpu-tests.json
    ptxas     the kernels compiled for Hopper by the real compiler: registers, spills (no GPU needed)
    kernel    bench/mixed_sum.py: the fused kernel vs eager, GB/s               -> gpu-mixed_sum.json
    step      bench/step.py at the cifar10 preset's shape on synthetic data: it/s per phase, host reads per
              iteration, recompiles                                              -> gpu-step.json
    search    a two-minute synthetic cifar10 search with growth (aso-se search) -> gpu-search/metrics.jsonl
    nsys      an Nsight Systems capture of a short search with NVTX ranges, where `nsys` exists
Without a GPU the parts that need one are skipped, each with a "no GPU" line; the rest runs. The summary table
is printed and written to gpu-summary.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import common

PY = sys.executable
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEARCH = ["--preset", "cifar10", "--set", "dataset=synthetic", "--set", "synthetic_size=32", "--set",
          "synthetic_channels=3", "--set", "synthetic_train=8000", "--set", "synthetic_test=2000", "--set",
          "loader=tensor", "--set", "warmup_epochs=1", "--set", "search_epochs=1", "--set", "growth_epochs=1",
          "--set", "optimize_epochs=1"]


def parts(out: str) -> dict:
    j = lambda name: os.path.join(out, f"gpu-{name}.json")  # noqa: E731
    return {
        "tests": (False, 600, [PY, "-m", "pytest", "-q", "-m", "cuda or not slow", "tests/test_steps.py",
                               "tests/test_hostreads.py", "tests/test_mixed_sum.py", "-rs",
                               f"--junitxml={os.path.join(out, 'gpu-tests.xml')}"]),
        "ptxas": (False, 300, [PY, "bench/ptxas.py", "--json", j("ptxas")]),
        "kernel": (True, 300, [PY, "bench/mixed_sum.py", "--device", "cuda", "--json", j("mixed_sum")]),
        "step": (True, 600, [PY, "bench/step.py", "--preset", "cifar10", "--synthetic", "--set", "device=cuda",
                             "--variants", "engine-eager,engine-compiled", "--json", j("step")]),
        "search": (True, 300, [PY, "-m", "engine.cli", "search", *SEARCH, "--set", "device=cuda",
                               "--out", os.path.join(out, "gpu-search")]),
        "nsys": (True, 300, ["nsys", "profile", "--trace", "cuda,nvtx", "--force-overwrite", "true", "-o",
                             os.path.join(out, "gpu-search-nsys"), PY, "-m", "engine.cli", "search", *SEARCH,
                             "--set", "device=cuda", "--set", "warmup_epochs=0.05", "--set", "search_epochs=0.05",
                             "--set", "growth_epochs=0", "--set", "optimize_epochs=0", "--nvtx",
                             "--out", os.path.join(out, "gpu-nsys-run")]),
    }


def run_part(name: str, needs_gpu: bool, limit: int, cmd: list[str], gpu: bool) -> dict:
    if needs_gpu and not gpu:
        print(f"[{name}] no GPU: skipped (needs CUDA; not measured)", flush=True)
        return {"part": name, "status": "no GPU", "seconds": None}
    if cmd[0] == "nsys" and shutil.which("nsys") is None:
        print(f"[{name}] nsys not on PATH: skipped", flush=True)
        return {"part": name, "status": "no nsys", "seconds": None}
    print(f"[{name}] {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    try:
        code = subprocess.run(cmd, cwd=ROOT, timeout=limit).returncode
        status = "ok" if code == 0 else f"failed (exit {code})"
    except subprocess.TimeoutExpired:
        status = f"timed out ({limit}s)"
    return {"part": name, "status": status, "seconds": round(time.perf_counter() - t0, 1)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="bench/results")
    p.add_argument("--only", default=None, help="comma-separated parts (default: all)")
    args = p.parse_args()
    import torch
    gpu = torch.cuda.is_available()
    os.makedirs(args.out, exist_ok=True)
    table = parts(args.out)
    names = args.only.split(",") if args.only else list(table)
    unknown = [n for n in names if n not in table]
    if unknown:
        raise SystemExit(f"gpu_check: unknown part(s) {', '.join(unknown)}; choose from {', '.join(table)}")
    if not gpu:
        print("gpu_check: no GPU on this machine: the CPU-possible parts run, the others say 'no GPU'", flush=True)
    rows = [run_part(n, *table[n], gpu=gpu) for n in names]
    step = os.path.join(args.out, "gpu-step.json")
    if gpu and os.path.exists(step):
        with open(step) as f:
            for r in json.load(f)["records"]:
                rows.append({"part": f"step {r['phase']} {r['variant']}", "status": f"{r['it_s']} it/s, "
                             f"{r['host_reads_it']} host reads/it, {r['recompiles']} recompiles", "seconds": None})
    common.print_table(rows, ["part", "status", "seconds"], title="\nGPU check")
    common.write_json(os.path.join(args.out, "gpu-summary.json"), rows, bench="gpu-check", gpu=gpu)
    return 1 if any(r["status"].startswith(("failed", "timed out")) for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
