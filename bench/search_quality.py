"""Does the search help? Searched genotypes against random ones from the same space, trained identically.

    python bench/search_quality.py --preset fashion-mnist --random 8 --search-seeds 0,1 --epochs 1 \
        --genotype bench/genotypes/fashion-mnist-before-issue-11.json --json bench/results/search_quality.json
    python bench/search_quality.py --quick      # synthetic data, tiny network: what the test suite runs

The protocol of Yang et al. 2020 ("NAS evaluation is frustratingly hard") and Li & Talwalkar 2019, in small:
- N genotypes drawn uniformly from the space the search derives from (`Genotype.random`: per node two distinct
  inputs, ops other than `none`), seeded by --random-seed;
- with --random-spread N, N more across the space's cost range (`Genotype.across_costs`, kind 'spread'): the
  random genotypes at the costs a cost-targeted search reaches, for bench/cost_plane.py's front;
- the genotypes found by S search runs of the preset (its warmup, search and growth phases, one run per seed
  in --search-seeds), and any --genotype FILE (a finished run's genotype.json or final.json, e.g. `make run`'s);
- every one trained from a fresh init with one recipe: the preset's optimize phase for --epochs epochs, with
  the --train-set overrides, once per training seed in --train-seeds.
Printed and written (JSON): per architecture the test accuracy (mean over training seeds), parameters and
train time; then the random mean +- sd, each searched genotype's rank among the random ones (1 = better than
all of them) and its relative improvement RI = 100 x (acc_searched - mean_random) / mean_random.

Every finished search and training is kept in --work as one JSON file keyed by its full config, so an
interrupted protocol continues where it stopped. The key does not hold the CPU thread count, which moves float
results (one and two threads differ by up to half a point): each record notes its threads, and the table says so
when the records it uses were computed with different counts. `--shard K/N` runs N processes on one --work: each claims
the next search or training no other live process holds (a .claim file beside the record; a killed process's
claim is taken over), so the shards balance however much of the work is cached. Run the shards side by side,
then once without --shard to collect the table (it waits for work a shard still holds). `--import FILE` enters
the trainings of an earlier run's --json file into --work (when its recipe is this run's), so a recorded
protocol gains training seeds on a machine without its --work.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import socket
import statistics
import sys
import time

import numpy as np
import torch

from common import print_table, write_json

from engine.build import load_data, optimize_spec
from engine.genotype import CELL_TYPES, Genotype
from engine.cli import TRAIN_ONLY
from engine.config import Config, preset
from engine.cost import cost_table
from engine.errors import AsoseError
from engine.latency import load_table
from engine.trainer import Trainer

QUICK = dict(preset="smoke", random=3, search_seeds="0", train_seeds="0", epochs=1.0, train_set=[])


def _key(*parts) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:12]


POLL_S = 10.0  # how often a process waiting for another one's search or training looks for its record


class Busy(Exception):
    """The record is being computed by another live process (its claim file names it)."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _claim(path: str) -> str | None:
    """Take `path`.claim for this process: None when taken, else who holds it ("host pid"). A claim of a
    process that no longer runs on this host (a killed shard) is taken over; one from another host is not."""
    claim, me = path + ".claim", f"{socket.gethostname()} {os.getpid()}"
    for _ in range(3):
        try:
            fd = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                with open(claim) as f:
                    holder = f.read().strip()
            except FileNotFoundError:  # released just now: try again
                continue
            host, _, pid = holder.partition(" ")
            if host == socket.gethostname() and pid.isdigit() and not _alive(int(pid)):
                try:
                    os.unlink(claim)  # stale
                except FileNotFoundError:
                    pass
                continue
            return holder or "a process still writing its claim"
        with os.fdopen(fd, "w") as f:
            f.write(me)
        return None
    return "another process (its claim keeps changing)"


def _stored(path: str) -> dict | None:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _store(path: str, record: dict) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(record, f, indent=1)
    os.replace(path + ".tmp", path)  # a reader never sees half a record


def _record_path(work: str, name: str, key: str) -> str:
    return os.path.join(work, f"{name}-{key}.json")


def _run_dir(work: str, name: str, key: str) -> str:
    """Where the run behind the record of `_record_path` keeps its files (metrics.jsonl, checkpoints)."""
    return os.path.join(work, f"{name}-{key}")


def _cached(work: str, name: str, key: str, compute, busy: str = "wait") -> dict:
    """The record stored under work/<name>-<key>.json, computed (and stored atomically) when missing. Before
    computing, the process claims the record (work/<name>-<key>.json.claim), so processes sharing --work never
    compute one record twice; when another live process holds the claim, busy="skip" raises Busy and
    busy="wait" waits for that process's record."""
    path = _record_path(work, name, key)
    said = False
    while True:
        record = _stored(path)
        if record is not None:
            return record
        holder = _claim(path)
        if holder is None:
            break
        if busy == "skip":
            raise Busy(holder)
        if not said:
            print(f"search_quality: waiting for {name}, which {holder} is computing (its claim: {path}.claim)",
                  flush=True)
            said = True
        time.sleep(POLL_S)
    try:
        record = _stored(path)  # finished by another process between the look and the claim
        if record is not None:
            return record
        record = compute(_run_dir(work, name, key))
        _store(path, record)
        return record
    finally:
        os.unlink(path + ".claim")


def _log(prefix: str):
    return lambda msg: print(f"[{prefix}] {msg}", flush=True)


def search(cfg: Config, seed: int, work: str, busy: str = "wait") -> dict:
    """The genotype one search run of `cfg` finds (its warmup, search and growth phases, no optimize), with
    the final architecture probabilities it was derived from (so other derivation rules need no new search)."""
    c = _search_config(cfg, seed)

    def run(run_dir: str) -> dict:
        shutil.rmtree(run_dir, ignore_errors=True)
        trainer = Trainer(c, run_dir, log=_log(f"search seed {seed}"))
        final = trainer.run()
        return {"seed": seed, "genotype": final["genotype"], "search_s": final["wall_s"],
                "threads": torch.get_num_threads(),
                "probabilities": {t: trainer.arch.probabilities(t).tolist() for t in CELL_TYPES}}
    return _cached(work, f"search-seed{seed}", _key(c.to_json()), run, busy)


def _search_config(cfg: Config, seed: int) -> Config:
    return cfg.override([f"seed={seed}", "optimize_epochs=0"])


def search_dir(cfg: Config, seed: int, work: str) -> str:
    """The run directory (metrics.jsonl, checkpoints) that `search` keeps the search of `cfg` and `seed` in."""
    return _run_dir(work, f"search-seed{seed}", _key(_search_config(cfg, seed).to_json()))


def rederive(cfg: Config, found: dict, variant: list[str]) -> Genotype:
    """The genotype a search record's final probabilities give under the derivation caps of `cfg` with the
    `variant` overrides (e.g. ["max_param_free_reduce=2"])."""
    c = cfg.override(variant)
    return Genotype.from_probabilities(found["probabilities"], c.nodes, **c.derivation_caps())


def train(cfg: Config, name: str, genotype: Genotype, seed: int, work: str, busy: str = "wait") -> dict:
    """Test accuracy of `genotype` trained from a fresh init with the recipe `cfg` and training seed `seed`."""
    c = cfg.override([f"seed={seed}"])

    def run(run_dir: str) -> dict:
        shutil.rmtree(run_dir, ignore_errors=True)
        final = Trainer(c, run_dir, genotype=genotype, log=_log(f"{name} seed {seed}")).run()
        return {"test_acc": final["test_acc"], "params": final["params"], "train_s": final["wall_s"],
                "threads": torch.get_num_threads()}
    return _cached(work, *_train_record(cfg, name, genotype, seed), run, busy)


def _train_record(cfg: Config, name: str, genotype: Genotype, seed: int) -> tuple[str, str]:
    """The name and key that `train` keeps a training's record under in --work."""
    return f"train-{name}-seed{seed}", _key(cfg.override([f"seed={seed}"]).to_json(), genotype.to_json())


def read_results(path: str, recipe: Config) -> list[dict]:
    """The rows of an earlier run's results file (`--json`), each with its genotype, training seeds and source,
    checked to be trained with `recipe`."""
    try:
        with open(path) as f:
            data = json.load(f)
        theirs, seeds = data["protocol"]["recipe"], data["protocol"]["train_seeds"]
        rows = [dict(r, genotype=Genotype.from_json(r["genotype_json"], path), seeds=seeds, source=path)
                for r in data["records"]]
    except (OSError, ValueError, KeyError, TypeError, AsoseError) as e:
        raise AsoseError(f"--import {path}: not a search_quality results file ({e.__class__.__name__}: {e}); "
                         f"pass a file that search_quality --json wrote") from None
    ours = json.loads(json.dumps(recipe.to_json()))
    # a field added to Config after the file was written did not exist for its run: it is not a difference
    theirs = {**{k: v for k, v in ours.items() if k not in theirs}, **theirs}
    if theirs != ours:
        diff = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
        raise AsoseError(f"--import {path}: its recipe differs from this run's in {', '.join(diff)}; import a "
                         f"file of the same --preset, --set, --train-set and --epochs")
    return rows


def enter_imported(imported: list[dict], recipe: Config, name: str, genotype: Genotype, work: str) -> int:
    """Store the imported trainings of `genotype` in `work` where `train` looks them up for `name`; returns how
    many were new. A file before per_seed_train_s gives every seed its mean time."""
    new = 0
    for row in (r for r in imported if r["genotype"] == genotype):
        times = row.get("per_seed_train_s") or [row["train_s"]] * len(row["seeds"])
        for seed, acc, train_s in zip(row["seeds"], row["per_seed"], times):
            path = _record_path(work, *_train_record(recipe, name, genotype, seed))
            if not os.path.exists(path):
                _store(path, {"test_acc": acc, "params": row["params"], "train_s": train_s,
                              "imported_from": row["source"]})
                new += 1
    return new


def summarize(random_accs: list[float], searched: dict[str, float]) -> dict:
    """Random mean and sample sd; per searched genotype its rank among the random ones, its gap in random sds
    and its relative improvement over the random mean (Yang et al. 2020)."""
    mean = statistics.fmean(random_accs)
    sd = statistics.stdev(random_accs) if len(random_accs) > 1 else 0.0
    out = {"random_mean": mean, "random_sd": sd, "random_n": len(random_accs), "searched": {}}
    for name, acc in searched.items():
        out["searched"][name] = {
            "test_acc": acc, "rank": 1 + sum(r > acc for r in random_accs), "of": len(random_accs) + 1,
            "sds_above_mean": (acc - mean) / sd if sd > 0 else None,
            "ri": 100.0 * (acc - mean) / mean, "beats_mean_by_one_sd": acc > mean + sd}
    return out


def genotype_costs(recipe: Config, latency_table: str | None = None):
    """A function giving a genotype's multiply-accumulates per image (exact, on the recipe's network) and, with
    a latency table of that network, its predicted latency in ms (engine/cost.py, engine/latency.py)."""
    data = load_data(recipe)
    spec, hw = optimize_spec(recipe, data), tuple(data.image_shape[1:])
    table = cost_table(spec, hw)
    lat = load_table(latency_table, spec, hw) if latency_table else None

    def costs(g: Genotype) -> dict:
        out = {"macs": table.of(g)["macs"]}
        if lat is not None:
            out["latency_ms"] = round(lat.of(g)["latency"], 4)
        return out
    return costs


def parse_shard(text: str | None, prog: str = "search_quality") -> tuple[int, int]:
    """--shard K/N as (K, N); (0, 1) without it. Shards claim work, they do not split it by position: K only
    names the process in its output."""
    if text is None:
        return 0, 1
    try:
        k, n = (int(v) for v in text.split("/"))
        if not 0 <= k < n:
            raise ValueError
    except ValueError:
        raise SystemExit(f"{prog}: --shard {text!r}: expected K/N with 0 <= K < N, e.g. 0/2") from None
    return k, n


def unless_busy(fn, *a) -> None:
    """`fn(*a)` (a `search` or `train`) unless another live process holds its record: a shard's way through
    the work, taking each piece no other process has taken."""
    try:
        fn(*a, busy="skip")
    except Busy:
        pass


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="fashion-mnist")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for the searches and the training recipe")
    p.add_argument("--search-set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for the searches only (e.g. search_epochs=5): the trainings stay cached")
    p.add_argument("--train-set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for the training recipe only (e.g. optimize_channels=24)")
    p.add_argument("--random", type=int, default=8, help="random genotypes (N)")
    p.add_argument("--random-seed", type=int, default=0, help="seed of the random genotypes")
    p.add_argument("--random-spread", type=int, default=0, metavar="N",
                   help="N more random genotypes across the space's cost range (the k-th with each edge "
                        "parameter-free with probability k/(N-1)), kind 'spread': the baseline at the costs a "
                        "cost-targeted search reaches; they stay out of the random mean and sd")
    p.add_argument("--search-seeds", default="0,1", help="comma-separated seeds of the search runs ('' for none)")
    p.add_argument("--genotype", action="append", default=[], metavar="FILE",
                   help="a searched genotype found elsewhere (genotype.json or final.json), repeatable")
    p.add_argument("--derive", action="append", default=[], metavar="KEY=VALUE[,KEY=VALUE]",
                   help="derive each search's genotype again from its final probabilities with these derivation "
                        "caps (e.g. max_param_free_reduce=2): one more searched candidate per search, no new search")
    p.add_argument("--train-seeds", default="0", help="comma-separated training seeds, the same for every genotype")
    p.add_argument("--epochs", type=float, default=1.0, help="training epochs per genotype")
    p.add_argument("--work", default="runs/search-quality", help="where searches and trainings are kept")
    p.add_argument("--shard", default=None,
                   help="K/N: this is process K of N sharing --work: it does every piece of work no other process "
                        "holds, then stops without the table")
    p.add_argument("--quick", action="store_true", help="synthetic data and a tiny network (the test suite's run)")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--latency-table", default=None, metavar="FILE",
                   help="an `aso-se latency` table of the recipe's network: each genotype's predicted latency is "
                        "recorded beside its parameters and multiply-accumulates")
    p.add_argument("--import", dest="imports", action="append", default=[], metavar="FILE",
                   help="an earlier run's --json file: its trainings enter --work as finished, when its recipe is "
                        "this run's, so more --train-seeds extend it without its --work")
    args = p.parse_args(argv)
    if args.quick:
        for k, v in QUICK.items():
            setattr(args, k, v)
    shard, shards = parse_shard(args.shard)
    try:
        base = preset(args.preset).override(args.overrides)
        recipe = base.override(TRAIN_ONLY + [f"optimize_epochs={args.epochs}"] + args.train_set)
        searched_cfg = base.override(args.search_set)
        costs = genotype_costs(recipe, args.latency_table)   # a table for another network stops here, before any work
        search_seeds = [int(s) for s in args.search_seeds.split(",") if s.strip()]
        train_seeds = [int(s) for s in args.train_seeds.split(",") if s.strip()]
        if not train_seeds:
            raise SystemExit("search_quality: --train-seeds needs at least one seed")
        rng = np.random.default_rng(args.random_seed)
        candidates = [(f"random{i}", "random", Genotype.random(rng, base.nodes)) for i in range(args.random)]
        spread = Genotype.across_costs(np.random.default_rng([args.random_seed, 1]), args.random_spread, base.nodes)
        candidates += [(f"spread{i}", "spread", g) for i, g in enumerate(spread)]
        basenames = [os.path.basename(path) for path in args.genotype]
        for i, path in enumerate(args.genotype):  # named after the file (runs' genotype.json files get a number)
            name = os.path.splitext(basenames[i])[0]
            candidates.append((name if basenames.count(basenames[i]) == 1 else f"{name}{i}", "searched",
                               Genotype.load(path)))
        os.makedirs(args.work, exist_ok=True)
        imported = [row for path in args.imports for row in read_results(path, recipe)]
        n = sum(enter_imported(imported, recipe, name, g, args.work) for name, _, g in candidates)
        if args.imports:
            print(f"search_quality: {n} training(s) of {', '.join(args.imports)} entered {args.work}")

        # one list of work, searches first, so shards share searches and trainings alike
        jobs = [("search", seed) for seed in search_seeds]
        jobs += [("train", c, seed) for c in candidates for seed in train_seeds]
        jobs += [("train-searched", seed, ts) for seed in search_seeds for ts in train_seeds]
        variants = [[kv for kv in v.split(",") if kv.strip()] for v in args.derive]
        for v in variants:
            searched_cfg.override(v)  # a wrong key or value fails here, before any work

        def found_candidates(seed: int) -> list[tuple[str, str, Genotype, str]]:
            """Search `seed`'s genotype, then its --derive variants: (name, kind, genotype, name it trains as,
            which is an earlier one's when a variant derives the same genotype)."""
            found = search(searched_cfg, seed, args.work)  # cached when this shard or another already ran it
            out = [(f"search{seed}", "searched", Genotype.from_json(found["genotype"]), f"search{seed}")]
            for v in variants:
                if "probabilities" not in found:
                    raise SystemExit(f"search_quality: the search record of seed {seed} in {args.work} predates "
                                     f"--derive (no probabilities): delete search-seed{seed}-*.json there")
                g = rederive(searched_cfg, found, v)
                name = f"search{seed}+{','.join(v)}"
                out.append((name, "searched", g, next((o[3] for o in out if o[2] == g), name)))
            for _, _, g, as_name in out:
                enter_imported(imported, recipe, as_name, g, args.work)
            return out

        # every process takes each piece of work that no other one holds (claim files in --work), so shards
        # balance however much of the work is already done; a training of a search that another shard is still
        # running waits for it, and collecting the table below waits for what the shards still hold
        t0 = time.perf_counter()
        for job in jobs:
            if job[0] == "search":
                unless_busy(search, searched_cfg, job[1], args.work)
            elif job[0] == "train":
                (name, _, g), seed = job[1], job[2]
                unless_busy(train, recipe, name, g, seed, args.work)
            else:
                for _, _, g, as_name in found_candidates(job[1]):
                    unless_busy(train, recipe, as_name, g, job[2], args.work)
        if shards > 1:
            print(f"shard {shard}/{shards} done in {time.perf_counter() - t0:.0f}s; run again without --shard "
                  f"to collect the table")
            return 0
        candidates = [(name, kind, g, name) for name, kind, g in candidates]
        for seed in search_seeds:
            candidates += found_candidates(seed)
        rows = []
        for name, kind, g, as_name in candidates:
            runs = [train(recipe, as_name, g, seed, args.work) for seed in train_seeds]
            free = g.param_free_fraction()
            rows.append({"name": name, "kind": kind, "test_acc": statistics.fmean(r["test_acc"] for r in runs),
                         "params": runs[0]["params"], "train_s": sum(r["train_s"] for r in runs) / len(runs),
                         "param_free_normal": free["normal"], "param_free_reduce": free["reduce"],
                         "per_seed": [r["test_acc"] for r in runs],
                         "per_seed_train_s": [r["train_s"] for r in runs], "threads": [r.get("threads") for r in runs],
                         **costs(g), "genotype": str(g),
                         "genotype_json": g.to_json()})
    except AsoseError as e:
        print(f"search_quality: error: {e}", file=sys.stderr)
        return e.exit_code

    threads = sorted({t for r in rows for t in r["threads"] if t is not None})
    if len(threads) > 1:
        print(f"search_quality: NOTE: these records were computed with {threads} CPU threads; float sums round "
              f"differently with each, so the same training can differ by up to half a point")
    random_accs = [r["test_acc"] for r in rows if r["kind"] == "random"]
    summary = summarize(random_accs, {r["name"]: r["test_acc"] for r in rows if r["kind"] == "searched"}) \
        if random_accs else None
    for r in rows:
        s = summary["searched"].get(r["name"]) if summary else None
        r["rank"] = f"{s['rank']}/{s['of']}" if s else None
        r["ri"] = round(s["ri"], 3) if s else None
    print_table([{**r, "test_acc": 100 * r["test_acc"]} for r in rows],
                ["name", "kind", "test_acc", "params", "macs", "latency_ms", "train_s", "param_free_normal",
                 "param_free_reduce", "rank", "ri"],
                title=f"search quality: {args.preset}, {args.epochs:g} training epoch(s), training seeds {train_seeds}")
    if summary:
        print(f"random: {100 * summary['random_mean']:.2f} +- {100 * summary['random_sd']:.2f}% "
              f"(n={summary['random_n']})")
        for name, s in summary["searched"].items():
            gap = "-" if s["sds_above_mean"] is None else f"{s['sds_above_mean']:+.2f}"
            print(f"{name}: {100 * s['test_acc']:.2f}%  rank {s['rank']}/{s['of']}  RI {s['ri']:+.3f}  "
                  f"{gap} sd from the random mean  -> {'beats' if s['beats_mean_by_one_sd'] else 'does not beat'} "
                  f"the random mean by one sd")
    write_json(args.json, rows, protocol={
        "preset": args.preset, "overrides": args.overrides, "search_set": args.search_set, "train_set": args.train_set,
        "epochs": args.epochs,
        "random": args.random, "random_spread": args.random_spread, "random_seed": args.random_seed,
        "search_seeds": search_seeds, "train_seeds": train_seeds, "genotype_files": args.genotype, "derive": args.derive,
        "recipe": recipe.to_json(),
        "latency_table": args.latency_table,
        "command": " ".join(["python", "bench/search_quality.py", *(argv if argv is not None else sys.argv[1:])])},
        summary=summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
