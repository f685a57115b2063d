"""What the real compiler makes of the mixed_sum kernels, on any machine (no GPU needed): both kernels are
compiled for each target with `triton.compile` and an explicit GPUTarget, the PTX is assembled with
`ptxas -v` (Triton's bundled one, else the one on PATH), and the table gives registers, spills, shared
memory and the forward's global loads (128-bit vs scalar).

    python bench/ptxas.py --json bench/results/ptxas.json
"""
from __future__ import annotations

import argparse
import os

import common  # noqa: F401  (puts the repo on sys.path)

os.environ.pop("TRITON_INTERPRET", None)  # the compiler needs the real language, not the interpreter

from kernels.mixed_sum import compile_for, find_ptxas, ptxas_report  # noqa: E402

COLUMNS = ["kernel", "target", "registers", "spill_stores", "spill_loads", "smem_bytes", "global_loads", "loads_128bit"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--capabilities", default="80,90")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    ptxas = find_ptxas()
    if ptxas is None:
        raise SystemExit("bench/ptxas.py: error: no ptxas (Triton's bundled one is missing and none is on PATH)")
    records = []
    for cap in (int(c) for c in args.capabilities.split(",")):
        for name, kernel in compile_for(cap).items():
            try:
                rep = ptxas_report(kernel.asm["ptx"], cap, ptxas)
            except RuntimeError as e:
                raise SystemExit(f"bench/ptxas.py: error: {e}")
            records.append({"kernel": name, **{k: rep[k] for k in COLUMNS[1:]}})
    common.print_table(records, COLUMNS, title=f"mixed_sum kernels (fp32, K=8) assembled by {ptxas} -v")
    common.write_json(args.json, records, bench="ptxas")


if __name__ == "__main__":
    main()
