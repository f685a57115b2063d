"""The switch from warmup to search, over seeds: val accuracy of the warmup's architecture (all skip_connect)
after its epoch against the argmax architecture's after the first search epoch, with the setting of
tests/test_trainer.py::test_no_collapse_when_search_begins (the preset on 20,000 training images, one warmup
and one search epoch, val on 3,000 images).

    python bench/switch.py --seeds 0,1,2,3 --json bench/results/switch.json
    python bench/switch.py --seeds 0,1,2,3 --set init_std=0.5       # the preset of 2026-11-24
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

from common import print_table, write_json

from engine.config import preset
from engine.errors import AsoseError
from engine.trainer import Trainer

SETTING = ["train_subset=20000", "warmup_epochs=1", "search_epochs=1", "growth_epochs=0", "optimize_epochs=0",
           "eval_samples=3000"]


def switch(cfg, out: str) -> dict:
    Trainer(cfg, out, log=lambda *_: None).run()
    with open(os.path.join(out, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    warm = [r for r in records if r.get("phase") == "warmup"][-1]
    search = [r for r in records if r.get("phase") == "search"][0]
    return {"seed": cfg.seed, "warmup_val": warm["val_acc"], "search_val": search["val_acc"],
            "drop_points": round(100 * (warm["val_acc"] - search["val_acc"]), 2),
            "warmup_train_acc": warm["train_acc"], "search_train_acc": search["train_acc"],
            "param_free": search["param_free"], "genotype": search.get("genotype")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="fashion-mnist")
    p.add_argument("--seeds", default="0,1,2,3")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    rows = []
    try:
        for seed in [int(s) for s in args.seeds.split(",") if s.strip()]:
            cfg = preset(args.preset).override(SETTING + args.overrides + [f"seed={seed}"])
            with tempfile.TemporaryDirectory() as out:
                rows.append(switch(cfg, out))
            print(f"seed {seed}: val {100 * rows[-1]['warmup_val']:.2f} -> {100 * rows[-1]['search_val']:.2f}%",
                  flush=True)
    except AsoseError as e:
        print(f"switch: error: {e}", file=sys.stderr)
        return e.exit_code
    print_table(rows, ["seed", "warmup_val", "search_val", "drop_points", "warmup_train_acc", "search_train_acc"],
                title=f"the switch, {args.preset} {' '.join(args.overrides)}")
    write_json(args.json, rows, setting=SETTING, overrides=args.overrides, preset=args.preset)
    return 0


if __name__ == "__main__":
    sys.exit(main())
