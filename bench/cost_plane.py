"""The accuracy-cost plane: searched genotypes under a cost target against random ones, trained alike.

    python bench/cost_plane.py --results bench/results/cost-macs-2026-12-05.json \
        --results bench/results/cost-latency-2026-12-05.json --handmade bench/results/handmade_cnn-1ep-20k.json \
        --json bench/results/cost-plane-2026-12-05.json --figure bench/results/cost-plane-2026-12-05

Reads bench/search_quality.py results files (run with --latency-table, so every row has its MACs and table
latency; the searches' cost settings are in each file's `search_set`), and for every distinct genotype measures
the latency of its whole network (engine/latency.py `steady_ms`, eval mode, `--batch`, `--threads`). The random
genotypes are the uniform ones (kind 'random') and, when the files have them (search_quality --random-spread),
those across the cost range (kind 'spread'). Then per cost (MACs, measured latency):
- lines of accuracy against log cost, least squares: over the uniform random genotypes ('uniform') and over all
  random genotypes ('all'); each with the cost range it was fitted on, since a line says nothing outside it
  (uniform draws keep about 3 edges in 7 parameter-free, so they never reach the costs a tight target asks for);
- per searched genotype: its cost as a share of the uniform random mean, its accuracy above or below each line
  and whether its cost lies inside that line's range, and the random genotypes (all of them) that dominate it
  (higher accuracy and lower cost);
- the random genotypes' Pareto front (all of them).
The figure draws both planes: random genotypes, their front and line, the searched ones by cost metric, the main
job's genotype (trained with the same recipe) and the hand-made CNN (bench/handmade_cnn.py trained on the same
images for the same epochs, with its own optimizer recipe; --handmade is its --json file, one per seed).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

from common import print_table, write_json  # (puts the project on sys.path)
import numpy as np
import torch

from engine.build import load_data, optimize_spec
from engine.config import Config
from engine.cost import macs as count_macs
from engine.genotype import Genotype
from engine.latency import forward_fn, network_fn, steady_ms
from engine.network import count_parameters

RANDOM = {"random": "random", "spread": "random across the cost range"}   # kind -> group
COSTS = (("macs", "multiply-accumulates per image"), ("measured_ms", "measured latency, ms"))
SCALE = {"macs": 1e-6, "measured_ms": 1.0}   # the figure's axes: millions of MACs, ms


def read_rows(paths: list[str]) -> tuple[list[dict], Config]:
    """Every row of the files, each searched one named after its file's cost metric; random rows once."""
    rows, seen, recipe = [], set(), None
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        recipe = data["protocol"]["recipe"]
        sets = dict(kv.split("=", 1) for kv in data["protocol"]["search_set"])
        metric = sets.get("cost", "off")
        label = metric if metric == "off" else f"{metric} <= {float(sets['cost_target']):.4g}"
        for r in data["records"]:
            if r["kind"] in RANDOM:
                if r["name"] in seen:
                    continue
                seen.add(r["name"])
                rows.append(dict(r, group=RANDOM[r["kind"]]))
            elif r["name"].startswith("search"):
                rows.append(dict(r, name=f"{label}:{r['name']}", group=f"searched, cost={label}"))
            elif r["name"] not in seen:             # a --genotype file: the main job's
                seen.add(r["name"])
                rows.append(dict(r, group="main job"))
    return rows, Config.from_json(recipe, "recipe")


def fit(rows: list[dict], cost: str) -> tuple[float, float]:
    """(intercept, slope) of accuracy against ln(cost), least squares."""
    x = np.log([r[cost] for r in rows])
    y = np.array([r["test_acc"] for r in rows])
    slope, intercept = np.polyfit(x, y, 1)
    return float(intercept), float(slope)


def front(rows: list[dict], cost: str) -> list[dict]:
    """The rows no other row beats in both accuracy and cost, by increasing cost."""
    out = [r for r in rows if not any(o[cost] <= r[cost] and o["test_acc"] >= r["test_acc"] and
                                      (o[cost] < r[cost] or o["test_acc"] > r["test_acc"]) for o in rows)]
    return sorted(out, key=lambda r: r[cost])


def plane(rows: list[dict], handmade: dict | None, cost: str) -> dict:
    """One cost's lines, front and per-genotype verdicts (see the module's docstring)."""
    pools = {"uniform": [r for r in rows if r["group"] == "random"],
             "all": [r for r in rows if r["group"] in RANDOM.values()]}
    if len(pools["all"]) == len(pools["uniform"]):
        del pools["all"]                      # no spread rows: the one line
    elif len(pools["uniform"]) < 2:
        del pools["uniform"]                  # spread rows alone (search_quality --random 0): no uniform line
    if len(next(iter(pools.values()))) < 2:
        raise SystemExit("cost_plane: the results files hold fewer than 2 random genotypes; a line needs 2 or more")
    lines = {}
    for which, pool in pools.items():
        a, b = fit(pool, cost)
        lines[which] = {"intercept": a, "slope_per_ln": b, "n": len(pool),
                        "range": [min(r[cost] for r in pool), max(r[cost] for r in pool)]}
    random = pools.get("all") or pools["uniform"]
    mean = statistics.fmean(r[cost] for r in pools.get("uniform") or random)
    out = {"lines": lines, "random_mean": mean, "front": [r["name"] for r in front(random, cost)], "rows": {}}
    for r in rows + ([handmade] if handmade else []):
        if r["group"] in RANDOM.values():
            continue
        out["rows"][r["name"]] = {
            "cost": r[cost], "share_of_random_mean": r[cost] / mean, "test_acc": r["test_acc"],
            "above": {w: r["test_acc"] - (ln["intercept"] + ln["slope_per_ln"] * np.log(r[cost]))
                      for w, ln in lines.items()},
            "inside": {w: ln["range"][0] <= r[cost] <= ln["range"][1] for w, ln in lines.items()},
            "dominated_by": [o["name"] for o in random if o[cost] < r[cost] and o["test_acc"] > r["test_acc"]]}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--results", action="append", required=True, help="a search_quality --json file, repeatable")
    p.add_argument("--handmade", action="append", default=[], help="a handmade_cnn.py --json file, repeatable")
    p.add_argument("--batch", type=int, default=1, help="images per forward pass for the measured latency")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    p.add_argument("--figure", default=None, help="write FIGURE.png and FIGURE.svg")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    rows, recipe = read_rows(args.results)
    data = load_data(recipe)
    spec, hw = optimize_spec(recipe, data), tuple(data.image_shape[1:])
    device = torch.device("cpu")
    genotypes = {r["name"]: Genotype.from_json(r["genotype_json"]) for r in rows}
    fns = {name: network_fn(spec, g, hw, args.batch, device, True) for name, g in genotypes.items()}
    handmade = None
    if args.handmade:
        from handmade_cnn import handmade_cnn
        net = handmade_cnn(data.image_shape[0], data.num_classes)
        accs = []
        for path in args.handmade:
            with open(path) as f:
                accs.append(json.load(f)["records"][-1]["test_acc"] / 100)
        handmade = {"name": "hand-made CNN", "group": "hand-made CNN", "test_acc": statistics.fmean(accs),
                    "per_seed": accs, "params": count_parameters(net), "macs": count_macs(net, (1, *data.image_shape))}
        fns[handmade["name"]] = forward_fn(net, (args.batch, *data.image_shape), device, True)
    timed = steady_ms(fns, device)
    for r in rows + ([handmade] if handmade else []):
        r["measured_ms"] = round(timed[r["name"]], 4)

    report = {"costs": {cost: plane(rows, handmade, cost) for cost, _ in COSTS}}

    table = [{"name": r["name"], "group": r["group"], "test_acc": 100 * r["test_acc"], "params": r["params"],
              "macs_M": r["macs"] / 1e6, "table_ms": r.get("latency_ms"), "measured_ms": r["measured_ms"]}
             for r in rows + ([handmade] if handmade else [])]
    print_table(table, ["name", "group", "test_acc", "params", "macs_M", "table_ms", "measured_ms"],
                title=f"accuracy and cost ({recipe.optimize_epochs:g} epoch(s), latency at batch {args.batch}, "
                      f"{args.threads} thread(s))")
    for cost, label in COSTS:
        c = report["costs"][cost]
        print(f"\n{label}: uniform random mean {c['random_mean']:.4g}")
        for which, line in c["lines"].items():
            print(f"  line over {which} random (n={line['n']}, cost {line['range'][0]:.4g}-{line['range'][1]:.4g}): "
                  f"acc = {100 * line['intercept']:.2f} {100 * line['slope_per_ln']:+.3f} x ln(cost) (points)")
        for name, s in c["rows"].items():
            off = ", ".join(f"{100 * s['above'][w]:+.2f} off the {w} line{'' if s['inside'][w] else ' (outside it)'}"
                            for w in c["lines"])
            print(f"  {name:<22} {100 * s['share_of_random_mean']:5.1f}% of the random mean cost, {off}, "
                  f"dominated by {len(s['dominated_by'])} random")
    if args.figure:
        draw(rows, handmade, report, args.figure, args.batch)
    write_json(args.json, table, protocol={"results": args.results, "handmade": args.handmade, "batch": args.batch,
                                           "threads": args.threads}, report=report)
    return 0


STYLE = {"random": dict(c="0.55", marker="o", s=22),
         RANDOM["spread"]: dict(facecolors="none", edgecolors="0.35", marker="o", s=22),
         "main job": dict(c="tab:purple", marker="*", s=120),
         "hand-made CNN": dict(c="black", marker="s", s=40)}
SEARCHED = {"macs": "tab:red", "latency": "tab:blue", "params": "tab:green", "off": "tab:orange"}


def style(group: str, seen: dict) -> dict:
    """Fixed styles for the reference groups; searched groups take their metric's colour and a marker of their own."""
    if group in STYLE:
        return STYLE[group]
    metric = group.split("cost=", 1)[-1].split(" ")[0]
    markers = ("^", "v", "D", "P", "X")
    seen.setdefault(metric, []).append(group)
    return dict(c=SEARCHED.get(metric, "tab:orange"), marker=markers[(len(seen[metric]) - 1) % len(markers)], s=55)


def draw(rows: list[dict], handmade: dict | None, report: dict, out: str, batch: int) -> None:
    from engine.report import _plt, _save
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    points = rows + ([handmade] if handmade else [])
    random = [r for r in rows if r["group"] in RANDOM.values()]
    for ax, (cost, label) in zip(axes, COSTS):
        k = SCALE[cost]
        seen: dict = {}
        for group in dict.fromkeys(r["group"] for r in points):
            sel = [r for r in points if r["group"] == group]
            ax.scatter([k * r[cost] for r in sel], [100 * r["test_acc"] for r in sel], label=group, zorder=3,
                       **style(group, seen))
        f = front(random, cost)
        ax.step([k * r[cost] for r in f], [100 * r["test_acc"] for r in f], where="post", c="0.55", lw=1,
                label="random: Pareto front")
        for which, line in report["costs"][cost]["lines"].items():   # each drawn over the costs it was fitted on
            xs = np.geomspace(*line["range"], 50)
            ax.plot(k * xs, 100 * (line["intercept"] + line["slope_per_ln"] * np.log(xs)), c="0.3", lw=1,
                    ls="--" if which == "all" else ":", label=f"line over {which} random ({line['n']})")
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(plt.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.tick_params(axis="x", which="minor", labelsize=7)
        ax.set_xlabel(("millions of " + label) if cost == "macs" else label + f" (batch {batch}, CPU)")
        ax.set_ylabel("test accuracy, %")
        ax.grid(alpha=0.3, which="both")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="lower center", ncol=4, bbox_to_anchor=(0.5, -0.12))
    fig.tight_layout()
    _save(fig, os.path.dirname(out) or ".", os.path.basename(out))


if __name__ == "__main__":
    sys.exit(main())
