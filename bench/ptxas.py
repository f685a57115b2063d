"""What the real compiler makes of the mixed_sum kernels, on any machine (no GPU needed): both kernels are
compiled for each target with `triton.compile` and an explicit GPUTarget, the PTX is assembled with
`ptxas -v` (Triton's bundled one, else the one on PATH), and the table gives registers, spills, shared
memory and the forward's global loads (128-bit vs scalar).

    python bench/ptxas.py --json bench/results/ptxas.json
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import tempfile

import common  # noqa: F401  (puts the repo on sys.path)

os.environ.pop("TRITON_INTERPRET", None)  # the compiler needs the real language, not the interpreter

from kernels.mixed_sum import compile_for  # noqa: E402


def ptxas_path() -> str:
    import triton
    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    found = bundled if os.path.exists(bundled) else shutil.which("ptxas")
    if found is None:
        raise SystemExit("bench/ptxas.py: error: no ptxas (Triton's bundled one is missing and none is on PATH)")
    return found


def assemble(ptxas: str, ptx: str, arch: str) -> tuple[str, str]:
    target = arch + ("a" if arch == "sm_90" and ".target sm_90a" in ptx else "")
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        proc = subprocess.run([ptxas, "-v", f"--gpu-name={target}", src, "-o", os.path.join(tmp, "k.cubin")],
                              capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"bench/ptxas.py: error: ptxas rejected the {arch} kernel: {proc.stderr.strip()[:300]}")
    return target, proc.stdout + proc.stderr


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--capabilities", default="80,90")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    ptxas = ptxas_path()
    records = []
    for cap in (int(c) for c in args.capabilities.split(",")):
        for name, kernel in compile_for(cap).items():
            ptx = kernel.asm["ptx"]
            target, report = assemble(ptxas, ptx, f"sm_{cap}")
            loads = [line for line in ptx.splitlines() if "ld.global" in line]
            wide = [line for line in loads if ".v4.b32" in line or ".v4.f32" in line]
            spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
            records.append({
                "kernel": name, "target": target,
                "registers": int(re.findall(r"Used (\d+) registers", report)[-1]),
                "spill_stores": sum(int(s) for s, _ in spills), "spill_loads": sum(int(ld) for _, ld in spills),
                "smem_bytes": int((re.findall(r"(\d+) bytes smem", report) or ["0"])[-1]),
                "global_loads": len(loads), "loads_128bit": len(wide)})
    common.print_table(records, ["kernel", "target", "registers", "spill_stores", "spill_loads", "smem_bytes",
                                 "global_loads", "loads_128bit"],
                       title=f"mixed_sum kernels (fp32, K=8) assembled by {ptxas} -v")
    common.write_json(args.json, records, bench="ptxas")


if __name__ == "__main__":
    main()
