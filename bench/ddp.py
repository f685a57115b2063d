"""Data-parallel throughput: 1 rank x T threads against N ranks x T/N threads on the same cores.

    python bench/ddp.py --preset fashion-mnist --json bench/results/ddp.json
    python bench/ddp.py --preset smoke --steps 8             # a quick look

Each layout runs the preset's warmup, search and optimize phases, shortened (`--steps` weight steps per supernet
epoch, `--optimize-subset` training images for the optimize epoch), the ranks launched by torchrun
(`python -m torch.distributed.run`, gloo on CPUs). Throughput is the whole job's: rank 0's images per
second (from its metrics.jsonl) times the number of ranks, since every rank trains on its own shard at the
same pace. Scaling efficiency = (N-rank throughput) / (1-rank throughput): the share of the cores' work the
extra ranks keep once they synchronize every step (on a 2-core CPU the cores are not added, they are
split, so efficiency near 1 means the all-reduce costs little; below 1, it costs).

The N-rank layouts: the engine's defaults (`grad_sync=allreduce`: one flattened all_reduce per step;
`eval_sharding=shard`: each rank evaluates its share of the val split), then `grad_sync=ddp`
(DistributedDataParallel, find_unused_parameters for the supernet) and `eval_sharding=full` (every rank
evaluates the whole val split). eval_s: the seconds of the warmup and search epochs' val evaluations.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile

from common import print_table, write_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHASES = ("warmup", "search", "optimize")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_layout(preset: str, ranks: int, threads: int, steps: int, subset: int, work: str,
               extra: tuple[str, ...] = ()) -> dict:
    out = os.path.join(work, f"r{ranks}")
    shutil.rmtree(out, ignore_errors=True)
    sets = [f"steps_per_epoch={steps}", "growth_epochs=0", "optimize_epochs=1", f"train_subset={subset}",
            "device=cpu", *extra]
    cli = ["-m", "engine.cli", "search", "--preset", preset, "--out", out, "--checkpoint-every", "100000",
           *sum((["--set", s] for s in sets), [])]
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}", "--master_port", str(_free_port())] \
        if ranks > 1 else [sys.executable]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    r = subprocess.run(launcher + cli, cwd=ROOT, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"ddp bench: {ranks} rank(s) failed:\n{r.stderr[-3000:]}")
    with open(os.path.join(out, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    row = {"ranks": ranks, "threads_per_rank": threads, "settings": " ".join(extra) or "defaults"}
    for phase in PHASES:
        rec = next(x for x in records if x.get("phase") == phase)
        row[f"{phase}_img_s"] = rec["images_s"] * ranks
    row["eval_s"] = round(sum(x.get("eval_s", 0.0) for x in records if x.get("phase") in ("warmup", "search")), 2)
    return row


VARIANTS = ((), ("grad_sync=ddp",), ("eval_sharding=full",))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="fashion-mnist")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--threads", type=int, default=2, help="threads of the single rank (split among the ranks)")
    p.add_argument("--steps", type=int, default=60, help="weight steps per supernet epoch (per rank)")
    p.add_argument("--optimize-subset", type=int, default=8192, help="training images of the optimize epoch")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.threads % args.ranks:
        raise SystemExit(f"ddp bench: --threads {args.threads} does not split among --ranks {args.ranks}")
    work = tempfile.mkdtemp(prefix="asose-ddp-")
    try:
        # the single rank runs twice as many steps per epoch, so both layouts train on the same images
        rows = [run_layout(args.preset, 1, args.threads, args.steps * args.ranks, args.optimize_subset, work)]
        for extra in VARIANTS:
            rows.append(run_layout(args.preset, args.ranks, args.threads // args.ranks, args.steps,
                                   args.optimize_subset, work, extra))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for row in rows[1:]:
        for phase in PHASES:
            row[f"{phase}_efficiency"] = round(row[f"{phase}_img_s"] / rows[0][f"{phase}_img_s"], 3)
    print_table(rows, ["ranks", "threads_per_rank", "settings"] + [f"{ph}_img_s" for ph in PHASES]
                + [f"{ph}_efficiency" for ph in PHASES] + ["eval_s"], title=f"data-parallel throughput, {args.preset}")
    if args.json:
        write_json(args.json, rows, args=vars(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
