"""The supernet's own ranking: does a search's shared-weight network order architectures as training them does?

    python bench/ranking.py --checkpoint RUN/checkpoints/last.pt --results bench/results/planted-lag.json \
        --json bench/results/ranking-planted-lag.json
    python bench/ranking.py --checkpoint runs/fashion-mnist/checkpoints/growth.pt \
        --results bench/results/search_quality-2026-12-04-3ep-4seeds.json --samples 5000

Every genotype of a protocol's results file (bench/planted.py or bench/search_quality.py `--json`: each record's
genotype and its standalone test accuracy, trained from scratch with the protocol's recipe) is evaluated with
the search's shared weights: the supernet of `--checkpoint` fixed to that genotype (one-hot edge weights,
`Architecture.genotype_weights`), on the val split (`--split`), twice: with the BatchNorm statistics the
search left, and with them re-estimated for that genotype alone on the first `--bn-batches` training batches
(the same ones for every genotype), restored afterwards. Kendall's tau-b and Spearman's rho between the
shared-weight accuracies and the standalone ones are printed with a bootstrap 95% interval (genotypes
resampled, `--bootstrap` times, seeded). Sciuto et al. (ICLR 2020) measured tau 0.195 in the DARTS CNN space;
BN re-estimation is the one-shot habit that raised such correlations in later work.

`--checkpoint` is repeatable: each search's supernet is ranked on its own (`per_checkpoint` in the JSON), and the
genotypes are ranked again by their mean shared-weight accuracy over the supernets (`correlations`): an ensemble
of searches, which averages out what one supernet's seed gives or takes (a single checkpoint's `correlations`
are its own).
"""
from __future__ import annotations

import argparse
import json
import sys

from common import print_table, write_json  # (puts the project on sys.path)
import numpy as np

from engine.build import load_data
from engine.checkpoint import load_checkpoint
from engine.config import Config
from engine.correlation import kendall_tau_b, spearman
from engine.data import make_loader, make_splits, train_augment
from engine.errors import AsoseError, CheckpointError
from engine.evaluate import supernet_steps
from engine.genotype import Genotype
from engine.steps import Steps


def correlations(shared: np.ndarray, standalone: np.ndarray, boot: int, seed: int = 0) -> dict:
    """tau and rho with bootstrap 95% intervals (genotypes resampled with replacement)."""
    rng = np.random.default_rng(seed)
    out = {"kendall_tau": kendall_tau_b(shared, standalone), "spearman": spearman(shared, standalone)}
    taus, rhos = [], []
    for _ in range(boot):
        idx = rng.integers(0, len(shared), len(shared))
        t, r = kendall_tau_b(shared[idx], standalone[idx]), spearman(shared[idx], standalone[idx])
        if not np.isnan(t):
            taus.append(t)
        if not np.isnan(r):
            rhos.append(r)
    for name, vals in (("kendall_tau", taus), ("spearman", rhos)):
        out[f"{name}_ci95"] = [float(np.percentile(vals, 2.5)), float(np.percentile(vals, 97.5))] if vals else None
    return out


def read_protocol(path: str) -> list[dict]:
    """(name, genotype, standalone test accuracy) of every trained record of a planted or search_quality
    results file."""
    try:
        with open(path) as f:
            data = json.load(f)
        rows = [{"name": r["name"], "genotype": Genotype.from_json(r["genotype_json"], path),
                 "standalone": float(r["test_acc"])}
                for r in data["records"] if r.get("test_acc") is not None]
    except (OSError, ValueError, KeyError, TypeError, AsoseError) as e:
        raise AsoseError(f"--results {path}: not a protocol results file ({e.__class__.__name__}: {e}); pass a "
                         f"file that bench/planted.py or bench/search_quality.py --json wrote") from None
    if len(rows) < 3:
        raise AsoseError(f"--results {path}: {len(rows)} trained genotype(s); a ranking needs at least 3")
    return rows


def supernet(path: str, device: str = "cpu") -> tuple[Config, Steps]:
    """The supernet and architecture a search checkpoint holds (before its optimize phase)."""
    state = load_checkpoint(path)
    cfg = Config.from_json(state["config"], path)
    if state.get("supernet") is None:
        raise CheckpointError(f"{path}: holds no supernet (a training run's checkpoint?); pass a search's "
                              f"checkpoints/last.pt, search.pt or growth.pt")
    return cfg, supernet_steps(state, cfg, device)


def shared_accuracies(steps: Steps, genotypes: list[Genotype], evaluate, calibrate, bn_batches: int) -> list[dict]:
    """Per genotype: val accuracy and loss with the search's BN statistics and with them re-estimated for it
    alone."""
    bn = {k: v.clone() for k, v in steps.net.state_dict().items() if "running_" in k or "num_batches" in k}
    out = []
    for g in genotypes:
        sample = steps.arch.genotype_weights(g)
        plain_loss, plain = steps.evaluate(evaluate, sample=sample)
        steps.recalibrate_bn(calibrate, bn_batches, sample=sample)
        recal_loss, recal = steps.evaluate(evaluate, sample=sample)
        steps.net.load_state_dict(bn, strict=False)   # the next genotype starts from the search's statistics
        out.append({"shared": plain, "shared_bn": recal, "shared_loss": plain_loss, "shared_bn_loss": recal_loss})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, action="append",
                   help="a search's checkpoint (last.pt, search.pt, growth.pt); repeatable: an ensemble")
    p.add_argument("--results", required=True, help="bench/planted.py or bench/search_quality.py --json file")
    p.add_argument("--split", default="val", choices=("val", "test"))
    p.add_argument("--samples", type=int, default=0, help="evaluate on the first N images of the split (0: all)")
    p.add_argument("--bn-batches", type=int, default=20)
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    try:
        rows = read_protocol(args.results)
        for r in rows:
            r["per_checkpoint"] = []
        used = []   # the calibration batches each supernet had: --bn-batches, or all its training split holds
        for path in args.checkpoint:
            accs, n = ranked_by(path, [r["genotype"] for r in rows], args)
            used.append(n)
            for r, acc in zip(rows, accs):
                r["per_checkpoint"].append(acc)
    except AsoseError as e:
        print(f"ranking: error: {e}", file=sys.stderr)
        return e.exit_code
    for r in rows:   # the mean over the supernets (one checkpoint: its own figures)
        r.update({k: float(np.mean([a[k] for a in r["per_checkpoint"]])) for k in r["per_checkpoint"][0]})
    standalone = np.array([r["standalone"] for r in rows])

    def against_standalone(accs: list[dict]) -> dict:
        return {key: correlations(np.array([a[key] for a in accs]), standalone, args.bootstrap)
                for key in ("shared", "shared_bn")}
    result = against_standalone(rows)
    # one checkpoint: its own figures are the mean's, bootstrapped once
    per_checkpoint = [{"checkpoint": path, "bn_batches_used": used[i],
                       **(result if len(args.checkpoint) == 1 else against_standalone([r["per_checkpoint"][i]
                                                                                      for r in rows]))}
                      for i, path in enumerate(args.checkpoint)]
    which = args.checkpoint[0] if len(args.checkpoint) == 1 else f"the mean over {len(args.checkpoint)} supernets"
    print_table([{"name": r["name"], "standalone": 100 * r["standalone"], "shared": 100 * r["shared"],
                  "shared_bn": 100 * r["shared_bn"]} for r in rows], ["name", "standalone", "shared", "shared_bn"],
                title=f"{len(rows)} genotypes: standalone test accuracy against the supernet's {args.split} accuracy "
                      f"({which})")
    batches = "/".join(str(n) for n in sorted(set(used)))
    labels = (("shared", "search's BN statistics"), ("shared_bn", f"BN re-estimated ({batches} batches)"))
    if len(args.checkpoint) > 1:
        for c in per_checkpoint:
            print(f"{c['checkpoint']}:")
            report(c, labels, args.bootstrap, "  ")
        print(f"ranked by the mean over the {len(args.checkpoint)} supernets:")
    report(result, labels, args.bootstrap)
    for r in rows:
        r["genotype"] = str(r["genotype"])
    write_json(args.json, rows, checkpoint=args.checkpoint, results=args.results, split=args.split,
               samples=args.samples, bn_batches=args.bn_batches, bn_batches_used=used, correlations=result,
               per_checkpoint=per_checkpoint)
    return 0


def ranked_by(path: str, genotypes: list[Genotype], args) -> tuple[list[dict], int]:
    """The shared-weight accuracies of `genotypes` in the supernet of checkpoint `path`, on its own split, and
    how many training batches re-estimated BN (--bn-batches, or fewer where the split holds fewer)."""
    cfg, steps = supernet(path)
    dataset = load_data(cfg)
    splits = make_splits(dataset, cfg.val_fraction, cfg.seed)
    x, y = splits[args.split]
    if args.samples:
        x, y = x[:args.samples], y[:args.samples]
    augment = train_augment(dataset)
    evaluate = make_loader("tensor", x, y, cfg.eval_batch_size, train=False, augment=augment, seed=cfg.seed)
    tx, ty = splits["train"]
    # the same training batches for every genotype (in order, not augmented): their statistics differ only by
    # the architecture
    calibrate = make_loader("tensor", tx, ty, cfg.batch_size, train=False, augment=augment, seed=cfg.seed)
    return shared_accuracies(steps, genotypes, evaluate, calibrate, args.bn_batches), min(args.bn_batches,
                                                                                           len(calibrate))


def report(result: dict, labels, boot: int, indent: str = "") -> None:
    ci = lambda v: "-" if v is None else f"[{v[0]:+.3f}, {v[1]:+.3f}]"  # noqa: E731
    for key, label in labels:
        c = result[key]
        print(f"{indent}{label}: Kendall tau {c['kendall_tau']:+.3f} {ci(c['kendall_tau_ci95'])}, Spearman "
              f"{c['spearman']:+.3f} {ci(c['spearman_ci95'])} (bootstrap 95%, {boot} resamples)")


if __name__ == "__main__":
    sys.exit(main())
