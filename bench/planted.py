"""Does the search find what is there to find? The planted-task protocol (engine/data/planted.py).

    python bench/planted.py --task planted-lag --table --json bench/results/planted-lag-table.json
    python bench/planted.py --task planted-lag --search-seeds 0,1,2,3,4,5 --shuffled-seeds 0,1,2 --random 20 \
        --json bench/results/planted-lag.json
    python bench/planted.py --task planted-polarity --cells --json bench/results/planted-polarity-cells.json
    # the protocol on two cores: two processes of one thread share --work (each takes the searches and
    # trainings no other one holds), then the same command without --shard collects the table from --work
    OMP_NUM_THREADS=1 python bench/planted.py --task planted-lag --shard 0/2 & \
    OMP_NUM_THREADS=1 python bench/planted.py --task planted-lag --shard 1/2; wait
    python bench/planted.py --task planted-lag --json bench/results/planted-lag.json
    python bench/planted.py --quick        # what the test suite runs: one task, one search, a few genotypes

A planted task is one whose answer is known: only one op family tells its two classes apart. Three questions:
- `--table`, the task itself: homogeneous genotypes (every edge one op), one per op, trained with the recipe
  for every --train-seeds seed. The planted family must beat every other op by >= 5 points and by more than
  10 pooled training-seed sds, or the task is redesigned.
- `--cells`, where in the network the family is needed: each family op in one cell type and skip_connect in
  the other. The protocol scores the cell types that alone solve the task (SCORED): on planted-polarity max
  pools in the reduction cells do (98-99%) and in the normal cell do not (52%), so there a normal-cell share
  would count edges that cannot matter. A new task's entry is set from its --cells table before any search.
- the search, on the real labels (--search-seeds) and on shuffled ones (--shuffled-seeds, the RLNAS control):
  per search, the share of the scored cells' edges (SCORED; both cell types' shares are kept) whose derived
  op is in the planted family, against the shares of --random genotypes from the space (`Genotype.random`,
  the sampler of bench/search_quality.py); how decided the final distributions are (each derived edge's
  probability, its top-1 / top-2 margin); the searched genotypes trained with the recipe against the random
  ones.
- pass: every real-label search above the random shares' 90th percentile (a sign test: 6 of 6 is p = 0.016)
  and their mean accuracy more than 2 random sds above the random mean; on shuffled labels at most 1 of 3
  searches above that percentile.
The preset's derivation has no skip or parameter-free cap (`planted`: max_skip=-1): a capped share would
be the cap's, not the search's. Searches and trainings are kept in --work (bench/search_quality.py's cache),
so an interrupted protocol continues where it stopped.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

import numpy as np

from common import print_table, write_json
from search_quality import parse_shard, search, search_dir, summarize, train, unless_busy

from engine import report
from engine.genotype import CELL_TYPES, Genotype, num_edges
from engine.ops import PRIMITIVES
from engine.cli import TRAIN_ONLY
from engine.config import preset
from engine.data.planted import PLANTED
from engine.errors import AsoseError

QUICK = dict(task="planted-lag", random=3, search_seeds="0", shuffled_seeds="", train_seeds="0", epochs=1.0,
             overrides=["synthetic_train=512", "synthetic_test=256", "warmup_epochs=0.5", "search_epochs=1"])
OPS = [op for op in PRIMITIVES if op != "none"]
# The cell types whose derived edges a task's protocol scores: those where the family alone solves the task
# (--cells; docs/planted-tasks.md). On planted-lag convolutions in either cell type do, so both are pooled.
# planted-polarity-near: max pools in the reduction cells alone reach 99.3%, in the normal cell alone 77.6% (chance
# 48.7%), as far from chance as the reduction cells' sep3 on planted-lag-checker (76.6%): pooled, by that precedent.
SCORED = {"planted-lag": ("normal", "reduce"), "planted-lag-checker": ("normal", "reduce"),
          "planted-polarity": ("reduce",), "planted-polarity-near": ("normal", "reduce")}


def scored_share(genotype: Genotype, family, cells) -> float:
    """The share of the edges of `cells` (cell types, pooled; each has the same number of edges) whose op is in
    `family`."""
    share = genotype.share(family)
    return statistics.fmean(share[t] for t in cells)


def homogeneous(op: str, nodes: int = 4) -> Genotype:
    """Every edge `op`: node 0 reads both cell inputs, node j the two states before it (j - 1 and j + 1 in
    state numbers), so the longest path through a cell is `nodes` ops, as in a DARTS cell."""
    pairs = [(op, 0), (op, 1)] + [(op, s) for j in range(1, nodes) for s in (j - 1, j + 1)]
    concat = list(range(2, 2 + nodes))
    return Genotype(pairs, concat, list(pairs), list(concat))


def decided_for(family, probabilities: dict[str, list[list[float]]], p_min: float = 0.5) -> dict[str, int]:
    """Per cell type, the edges (all of them, derived or not) whose most likely op is in `family` at
    probability >= p_min (0.5: four times uniform): where the search has made up its mind for the family."""
    out = {}
    for t in CELL_TYPES:
        rows = probabilities[t]
        out[t] = sum(1 for row in rows if PRIMITIVES[max(range(len(row)), key=row.__getitem__)] in family
                     and max(row) >= p_min)
    return out


def curriculum_end(cfg, run_dir: str, family, cells) -> dict | None:
    """A search with a curriculum (config `curriculum`), as it stood at the curriculum's last epoch, read from its
    run directory's records: the genotype its probabilities then gave (the run's derivation rule), that genotype's
    share of `family` in `cells`, and the supernet's val accuracy on the curriculum's data. Beside the final
    share it says whether the task's own data moved the search, or the easier data had found it all."""
    if not cfg.curriculum:
        return None
    last = [r for r in report.read_run(run_dir)["epochs"] if r.get("data") == cfg.curriculum and "probs" in r][-1]
    g = Genotype.from_probabilities(last["probs"], cfg.nodes, **cfg.derivation_caps())
    return {"global_epoch": last["global_epoch"], "genotype": str(g), "share": scored_share(g, family, cells),
            "val_acc": last["val_acc"]}


def percentile90(values: list[float]) -> float:
    return float(np.percentile(values, 90))


def sign_test(above: int, n: int) -> float:
    """One-sided: P(at least `above` of `n` above the median) if the search were a coin (p = 0.5)."""
    return sum(math.comb(n, k) for k in range(above, n + 1)) / 2 ** n


def trained(recipe, name: str, genotype: Genotype, seeds, work) -> dict:
    """The genotype's test accuracy over the training seeds: mean, sd and each seed's."""
    accs = [train(recipe, name, genotype, s, work)["test_acc"] for s in seeds]
    return {"test_acc": statistics.fmean(accs), "sd": statistics.stdev(accs) if len(accs) > 1 else 0.0,
            "per_seed": accs}


def split(normal: str, reduce: str, nodes: int = 4) -> Genotype:
    """The homogeneous normal cell of one op and the homogeneous reduction cell of another."""
    n, r = homogeneous(normal, nodes), homogeneous(reduce, nodes)
    return Genotype(n.normal, n.normal_concat, r.reduce, r.reduce_concat)


def cells(cfg, recipe, family, seeds, work) -> list[dict]:
    """Each family op in one cell type with skip_connect in the other, and skip_connect everywhere."""
    rows = []
    pairs = [("skip_connect", "skip_connect")]
    pairs += [p for op in family for p in ((op, "skip_connect"), ("skip_connect", op))]
    for normal, reduce in pairs:
        name = "homogeneous-skip_connect" if normal == reduce else f"cells-{normal}-{reduce}"
        rows.append({"normal": normal, "reduce": reduce,
                     **trained(recipe, name, split(normal, reduce, cfg.nodes), seeds, work)})
    return rows


def table(cfg, recipe, family, seeds, work) -> tuple[list[dict], dict]:
    rows = []
    for op in OPS:
        rows.append({"op": op, "planted": op in family,
                     **trained(recipe, f"homogeneous-{op}", homogeneous(op, cfg.nodes), seeds, work)})
    inside = [r for r in rows if r["planted"]]
    outside = [r for r in rows if not r["planted"]]
    pooled = math.sqrt(statistics.fmean(r["sd"] ** 2 for r in rows)) if len(seeds) > 1 else 0.0
    worst_in, best_out = min(r["test_acc"] for r in inside), max(r["test_acc"] for r in outside)
    family_mean = statistics.fmean(r["test_acc"] for r in inside)
    gap = family_mean - best_out
    verdict = {"family_mean": family_mean, "worst_planted_op": worst_in, "best_other_op": best_out,
               "gap": gap, "worst_gap": worst_in - best_out, "pooled_seed_sd": pooled,
               "gap_in_sds": gap / pooled if pooled > 0 else None,
               "confirmed": gap >= 0.05 and pooled > 0 and gap > 10 * pooled}
    return rows, verdict


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--task", default="planted-lag", choices=sorted(PLANTED))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override of the planted preset, for the searches and the recipe")
    p.add_argument("--search-set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for the searches only (a remedy under test): the trainings stay cached")
    p.add_argument("--table", action="store_true", help="the homogeneous-genotype table only")
    p.add_argument("--cells", action="store_true", help="the family in one cell type at a time, skip in the other")
    p.add_argument("--random", type=int, default=20)
    p.add_argument("--random-seed", type=int, default=0)
    p.add_argument("--search-seeds", default="0,1,2,3,4,5")
    p.add_argument("--shuffled-seeds", default="0,1,2")
    p.add_argument("--train-seeds", default="0,1")
    p.add_argument("--epochs", type=float, default=None, help="training epochs (default: the preset's)")
    p.add_argument("--work", default="runs/planted")
    p.add_argument("--shard", default=None,
                   help="K/N: process K of N sharing --work (the protocol, not --table or --cells): it runs every "
                        "search and training no other process holds, then stops; run the command again without "
                        "--shard to collect the table")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.quick:
        for k, v in QUICK.items():
            setattr(args, k, v)
    shard, shards = parse_shard(args.shard, "planted")
    if shards > 1 and (args.table or args.cells):
        raise SystemExit("planted: --shard splits the protocol's searches and trainings; run --table and --cells "
                         "without it")
    seeds = lambda text: [int(s) for s in text.split(",") if s.strip()]  # noqa: E731
    family = PLANTED[args.task][1]
    try:
        cfg = preset("planted").override([f"dataset={args.task}", *args.overrides])
        epochs = cfg.optimize_epochs if args.epochs is None else args.epochs
        recipe = cfg.override(TRAIN_ONLY + [f"optimize_epochs={epochs}"])
        searched = cfg.override(args.search_set)
        work = os.path.join(args.work, args.task)
        os.makedirs(work, exist_ok=True)
        train_seeds = seeds(args.train_seeds)
        protocol = {"task": args.task, "family": list(family), "overrides": args.overrides,
                    "search_set": args.search_set, "epochs": epochs, "train_seeds": train_seeds,
                    "recipe": recipe.to_json(),
                    "command": " ".join(["python", "bench/planted.py", *(argv if argv is not None else sys.argv[1:])])}
        if args.table:
            rows, verdict = table(cfg, recipe, family, train_seeds, work)
            print_table([{**r, "test_acc": 100 * r["test_acc"], "sd": 100 * r["sd"]} for r in rows],
                        ["op", "planted", "test_acc", "sd"], title=f"{args.task}: homogeneous genotypes, "
                        f"{epochs:g} epoch(s), training seeds {train_seeds}")
            print(f"planted family {'+'.join(family)}: {100 * verdict['family_mean']:.2f}% against the best other "
                  f"op's {100 * verdict['best_other_op']:.2f}%: gap {100 * verdict['gap']:+.2f} points = "
                  f"{verdict['gap_in_sds'] or 0:.1f} pooled seed sds ({100 * verdict['pooled_seed_sd']:.2f}); "
                  f"worst planted op {100 * verdict['worst_planted_op']:.2f}% -> "
                  f"{'confirmed' if verdict['confirmed'] else 'NOT confirmed'}")
            write_json(args.json, rows, protocol=protocol, verdict=verdict)
            return 0

        if args.cells:
            rows = cells(cfg, recipe, family, train_seeds, work)
            print_table([{**r, "test_acc": 100 * r["test_acc"], "sd": 100 * r["sd"]} for r in rows],
                        ["normal", "reduce", "test_acc", "sd"], title=f"{args.task}: the family in one cell type, "
                        f"{epochs:g} epoch(s), training seeds {train_seeds}")
            scored = SCORED.get(args.task)  # a new task's: set from this table, before any search
            print(f"scored cell types: {', '.join(scored) if scored else 'not set yet (SCORED in bench/planted.py)'}")
            write_json(args.json, rows, protocol=protocol, scored=list(scored or ()))
            return 0

        rng = np.random.default_rng(args.random_seed)
        rows = [{"name": f"random{i}", "kind": "random", "genotype": Genotype.random(rng, cfg.nodes)}
                for i in range(args.random)]
        searches = [(kind, cfg_k, s) for kind, cfg_k, seed_list in
                    (("searched", searched, seeds(args.search_seeds)),
                     ("shuffled", searched.override(["shuffle_labels=true"]), seeds(args.shuffled_seeds)))
                    for s in seed_list]
        # the searches first (the long work), then the trainings; every process takes what no other one holds
        # (bench/search_quality.py's claims), so shards balance and collecting the table below waits only for
        # what another process still holds
        t0 = time.perf_counter()
        for _, cfg_k, s in searches:
            unless_busy(search, cfg_k, s, work)
        for r in rows:
            for ts in train_seeds:
                unless_busy(train, recipe, r["name"], r["genotype"], ts, work)
        for kind, cfg_k, s in searches:
            if kind == "searched":  # waits for a search another process still runs
                g = Genotype.from_json(search(cfg_k, s, work)["genotype"])
                for ts in train_seeds:
                    unless_busy(train, recipe, f"{kind}{s}", g, ts, work)
        if shards > 1:
            print(f"planted: shard {shard}/{shards} done in {time.perf_counter() - t0:.0f}s; run the command again "
                  f"without --shard to collect the table")
            return 0
        for kind, cfg_k, s in searches:
            found, run_dir = search(cfg_k, s, work), search_dir(cfg_k, s, work)
            g = Genotype.from_json(found["genotype"])
            rows.append({"name": f"{kind}{s}", "kind": kind, "genotype": g, "search_s": found["search_s"],
                         "decided": g.decidedness(found["probabilities"]),
                         "decided_family": decided_for(family, found["probabilities"]),
                         "curriculum_end": curriculum_end(cfg_k, run_dir, family, SCORED[args.task]),
                         "run": run_dir})  # its checkpoints: bench/ranking.py's input
        for r in rows:
            r["share"] = r["genotype"].share(family)
            if r["kind"] != "shuffled":  # the control's genotypes are judged by their shares alone
                runs = [train(recipe, r["name"], r["genotype"], s, work) for s in train_seeds]
                r["test_acc"] = statistics.fmean(x["test_acc"] for x in runs)
                r["per_seed"] = [x["test_acc"] for x in runs]
                r["params"] = runs[0]["params"]
    except AsoseError as e:
        print(f"planted: error: {e}", file=sys.stderr)
        return e.exit_code

    if not any(r["kind"] == "random" for r in rows):  # a shard of the searches (--random 0): nothing to judge
        print(f"planted: {len(rows)} search(es) done and cached in {work}; the table needs random genotypes "
              f"(--random N, default 20)")
        return 0
    scored = SCORED[args.task]
    for r in rows:
        r["share_scored"] = scored_share(r["genotype"], family, scored)
    random_share = [r["share_scored"] for r in rows if r["kind"] == "random"]
    p90 = percentile90(random_share)
    for r in rows:
        r["above_p90"] = r["share_scored"] > p90
        if "decided" in r:
            derived = [e for t in CELL_TYPES for e in r["decided"][t]]
            r["min_margin"] = min(e["margin"] for e in derived)
            r["min_p"] = min(e["p"] for e in derived)
            r["family_edges"] = sum(r["decided_family"].values())
    real = [r for r in rows if r["kind"] == "searched"]
    shuffled = [r for r in rows if r["kind"] == "shuffled"]
    random_accs = [r["test_acc"] for r in rows if r["kind"] == "random"]
    acc = summarize(random_accs, {r["name"]: r["test_acc"] for r in real})
    mean_real = statistics.fmean(r["test_acc"] for r in real) if real else None
    sds = (mean_real - acc["random_mean"]) / acc["random_sd"] if real and acc["random_sd"] > 0 else None
    n_above = sum(r["above_p90"] for r in real)
    verdict = {"scored_cells": list(scored), "random_share_p90": p90,
               "random_share_mean": statistics.fmean(random_share),
               "real_above_p90": n_above, "real_n": len(real), "sign_test_p": sign_test(n_above, len(real)),
               "shuffled_above_p90": sum(r["above_p90"] for r in shuffled), "shuffled_n": len(shuffled),
               "family_edges_real": [r["family_edges"] for r in real],
               "family_edges_shuffled": [r["family_edges"] for r in shuffled],
               "curriculum_end_share_real": [(r["curriculum_end"] or {}).get("share") for r in real],
               "curriculum_end_share_shuffled": [(r["curriculum_end"] or {}).get("share") for r in shuffled],
               "random_acc_mean": acc["random_mean"], "random_acc_sd": acc["random_sd"],
               "searched_acc_mean": mean_real, "searched_sds_above_random": sds}
    verdict["passes"] = bool(real) and n_above == len(real) and sds is not None and sds > 2 \
        and verdict["shuffled_above_p90"] <= max(1, len(shuffled) // 3)
    for r in rows:
        r["genotype_json"], r["genotype"] = r["genotype"].to_json(), str(r["genotype"])
        r["share_normal"], r["share_reduce"] = r["share"]["normal"], r["share"]["reduce"]
    print_table([{**r, "test_acc": None if r.get("test_acc") is None else 100 * r["test_acc"]} for r in rows],
                ["name", "kind", "share_normal", "share_reduce", "share_scored", "above_p90", "family_edges", "min_p",
                 "min_margin", "test_acc"],
                title=f"{args.task}: planted family {'+'.join(family)}, {epochs:g} training epoch(s), seeds "
                      f"{train_seeds}")
    print(f"random shares of the scored cells ({'+'.join(scored)}): mean {verdict['random_share_mean']:.3f}, "
          f"90th percentile {p90:.3f}")
    print(f"real labels: {n_above}/{len(real)} searches above it (sign test p = {verdict['sign_test_p']:.4f}); "
          f"shuffled labels: {verdict['shuffled_above_p90']}/{len(shuffled)}")
    print(f"edges decided for the family (top op in it at p >= 0.5, of {2 * num_edges(cfg.nodes)} per search): "
          f"real {verdict['family_edges_real']}, shuffled {verdict['family_edges_shuffled']}")
    if searched.curriculum:
        share = lambda rs: [round(r["curriculum_end"]["share"], 3) for r in rs]  # noqa: E731
        print(f"at the curriculum's end ({searched.curriculum}, epoch {searched.curriculum_epochs}) the shares were: "
              f"real {share(real)}, shuffled {share(shuffled)}")
    if sds is not None:
        print(f"accuracy: searched {100 * mean_real:.2f}% against random {100 * acc['random_mean']:.2f} +- "
              f"{100 * acc['random_sd']:.2f}% ({sds:+.2f} random sds)")
    print(f"-> {'passes' if verdict['passes'] else 'does NOT pass'}")
    write_json(args.json, rows, protocol=protocol, verdict=verdict, accuracy=acc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
