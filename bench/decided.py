"""How decided is a search, and do two searches decide alike?

    python bench/decided.py runs/fashion-mnist
    python bench/decided.py RUN_SEED0 RUN_SEED1 SHUFFLED_SEED0 --json bench/results/decided.json

Each RUN is a search's run directory: its genotype.json (the derived genotype, with the run's own caps) and the
last record of its metrics.jsonl that holds the op probabilities. Per run and cell type it prints:
- the derived edges whose op is not skip_connect, and how many of them have probability >= 2/8, twice uniform
  over the 8 ops (issue 29's bar for the main job), with the range of those probabilities;
- the smallest top-1 / top-2 margin over the derived edges (`Genotype.decidedness`), and the mean
  entropy of every edge's distribution (ln 8 = 2.079 is uniform).
Then, for every pair of runs and cell type: the correlation of their per-edge probabilities of skip_connect
(what the supernet learns first), and on how many of the 14 edges their most likely convolution is the same
(chance: 14 / 4 = 3.5), with the correlation of the convolutions' probabilities, each edge's centred on its mean.
Pair a seed with another seed for consistency, and with a shuffled-label run (`--set shuffle_labels=true`) for
what the labels add.

Where the run's checkpoint (checkpoints/last.pt) holds the architecture gradients' sums (engine/arch.py
ArchState.drift; runs of 2026-12-06 on; the run report's table "How decided the derived cells are" is the same
reading), each derived edge also gets its drift z: how consistently the architecture steps pushed the chosen op's
logit up, alone (`z`) and against the best other op's (`z_vs_second`, the contrast behind the top-1 / top-2
margin). Independent noise gives z about N(0, 1); a shuffled-label run (the control) shows what the search makes
of noise. The summary counts the derived non-skip ops whose z_vs_second is at least 2: margins a consistent push,
not the walk, put there. A second table, "what the data pushed", reads every edge: each convolution against each
other one (rms z and the share beyond |z| 2: noise gives 1 and 4.6%), and skip, max pool and avg pool against each
convolution (the shares above 2 and below -2). A consistent push can be the task's or the supernet's own (an op
trained more wins more; memorising shuffled labels favours parameters): seeds and controls tell which.

`--op OP` adds one row per run for that op: its mean probability per cell type at the end, on how many derived
edges it sits, the search epochs' last training accuracy (sampled architectures) and best and last val accuracy
(the most likely architecture), beside the run's `logit_prior`, `arch_lr`, `arch_start_epochs` and
`shuffle_labels`: how far a search moves toward an op it was or was not started near
(docs/planted-tasks.md, "How near the answer must a search start?").
"""
from __future__ import annotations

import argparse
import itertools
import sys

from common import print_table, write_json  # (puts the project on sys.path)
import numpy as np
import torch

from engine import report
from engine.arch import ArchState
from engine.errors import AsoseError
from engine.genotype import CELL_TYPES, Genotype
from engine.ops import PARAMETER_FREE, PRIMITIVES

UNIFORM = 1 / len(PRIMITIVES)
CONVS = [i for i, op in enumerate(PRIMITIVES) if op != "none" and op not in PARAMETER_FREE]
SKIP = PRIMITIVES.index("skip_connect")


def read_run(run: str) -> tuple[Genotype, dict[str, np.ndarray], dict]:
    """The run's derived genotype, its last recorded op probabilities (cell type -> edges x ops) and the whole
    record engine/report.py's `read_run` read them from (config, epochs)."""
    try:
        record = report.read_run(run)
        probs = next((r["probs"] for r in reversed(record["epochs"]) if r.get("probs")), None)
        if record["genotype"] is None or probs is None:
            raise ValueError("no genotype.json" if record["genotype"] is None else "no record holds op probabilities")
        return record["genotype"], {t: np.array(probs[t], dtype=float) for t in CELL_TYPES}, record
    except (ValueError, KeyError, TypeError, AsoseError) as e:
        raise AsoseError(f"{run}: not a finished search's run directory ({e.__class__.__name__}: {e}); pass one "
                         f"that `aso-se search` wrote (genotype.json and metrics.jsonl)") from None


FREE = {"skip_connect": "skip", "max_pool_3x3": "max3", "avg_pool_3x3": "avg3"}  # PARAMETER_FREE but `none`


def contrasts(state: ArchState) -> dict[str, dict]:
    """Per cell type, over all its edges: the drift z of every convolution against every other (6 pairs an
    edge: rms and share beyond |z| 2), and of skip_connect, max_pool_3x3 and avg_pool_3x3 each against each
    convolution (shares above 2 and below -2). Noise alone gives each z about N(0, 1): rms 1, 2.3% above 2 and
    2.3% below -2. What the data decide shows as more."""
    edges = state.grad_sum.shape[1]
    # every op against each convolution b on every edge, both cell types: [b] -> (cell types, edges, ops)
    vs = {b: state.drift(torch.full((len(CELL_TYPES), edges), b)).numpy() for b in CONVS}
    conv = np.concatenate([vs[b][:, :, a] for a, b in itertools.combinations(CONVS, 2)], axis=1)
    out = {t: {"conv_pairs": int(conv.shape[1]), "conv_rms": float(np.sqrt((conv[i] ** 2).mean())),
               "conv_beyond_2": float((np.abs(conv[i]) > 2).mean())} for i, t in enumerate(CELL_TYPES)}
    for op, name in FREE.items():
        free = np.concatenate([vs[b][:, :, PRIMITIVES.index(op)] for b in CONVS], axis=1)
        for i, t in enumerate(CELL_TYPES):
            out[t][f"{name}_up"], out[t][f"{name}_down"] = float((free[i] > 2).mean()), float((free[i] < -2).mean())
    return out


def run_summary(genotype: Genotype, probs: dict[str, np.ndarray], grads: ArchState | None = None) -> dict[str, dict]:
    """Per cell type: the derived non-skip ops' probabilities, how many are at twice uniform, the smallest
    margin and the mean entropy; with `grads` (the run's gradient sums), each derived edge's drift z
    (engine/report.py `decided_edges`) and how many non-skip ops hold their margin at z_vs_second >= 2."""
    decided = report.decided_edges(genotype, {t: probs[t].tolist() for t in CELL_TYPES}, grads)
    drift = grads is not None
    out = {}
    for t in CELL_TYPES:
        edges = decided[t]
        non_skip = [e for e in edges if e["op"] != "skip_connect"]
        ps = [e["p"] for e in non_skip]
        zs = [e["z_vs_second"] for e in non_skip] if drift else []
        p = np.clip(probs[t], 1e-12, 1.0)
        out[t] = {"non_skip": len(ps), "at_twice_uniform": sum(v >= 2 * UNIFORM for v in ps),
                  "p_min": min(ps, default=None), "p_max": max(ps, default=None),
                  "margin_min": min(e["margin"] for e in decided[t]),
                  "mean_entropy": float(np.mean(-(p * np.log(p)).sum(axis=1))),
                  "z_vs_second_at_2": sum(z >= 2 for z in zs) if drift else None,
                  "z_vs_second_min": min(zs, default=None), "z_vs_second_max": max(zs, default=None),
                  "edges": edges}
    return out


def op_summary(run: str, genotype: Genotype, probs: dict[str, np.ndarray], record: dict, op: str) -> dict:
    """One run's row of `--op` (read_run's genotype, probabilities and record): the op's mean probability and
    derived edges per cell type, the search epochs' accuracies and the config fields that start or steer the
    search."""
    cfg, epochs = record["config"], [r for r in record["epochs"] if r.get("probs")]
    k = PRIMITIVES.index(op)
    val = [r["val_acc"] for r in epochs if r.get("val_acc") is not None]
    row = {"run": run, "logit_prior": cfg.get("logit_prior") or "-", "arch_lr": cfg.get("arch_lr"),
           "arch_start": cfg.get("arch_start_epochs"), "shuffled": cfg.get("shuffle_labels"), "epochs": len(epochs),
           "train_acc": epochs[-1].get("train_acc") if epochs else None,
           "val_best": max(val, default=None), "val_last": val[-1] if val else None}
    for t in CELL_TYPES:
        row[f"p_{t}"] = float(probs[t][:, k].mean())
        row[f"derived_{t}"] = sum(1 for o, _ in getattr(genotype, t) if o == op)
    return row


def agreement(a: np.ndarray, b: np.ndarray) -> dict:
    """Two runs' distributions of one cell type (edges x ops): skip's per-edge correlation, and the
    convolutions': same most likely one on how many edges, and their centred probabilities' correlation."""
    ca, cb = a[:, CONVS], b[:, CONVS]
    centred = [(c - c.mean(axis=1, keepdims=True)).ravel() for c in (ca, cb)]
    return {"skip_corr": _corr(a[:, SKIP], b[:, SKIP]),
            "same_top_conv": int((ca.argmax(axis=1) == cb.argmax(axis=1)).sum()), "edges": len(a),
            "conv_corr": _corr(*centred)}


def _corr(x: np.ndarray, y: np.ndarray) -> float | None:
    """Pearson's r; None where either side is constant (a uniform cell has no direction to agree on)."""
    return None if x.std() == 0 or y.std() == 0 else float(np.corrcoef(x, y)[0, 1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", help="search run directories")
    p.add_argument("--op", default=None, choices=PRIMITIVES,
                   help="also print each run's mean probability of this op, its derived edges and accuracies")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    try:
        runs = {run: read_run(run) for run in args.runs}
        grads = {run: report.read_gradients(run) for run in args.runs}
    except AsoseError as e:
        print(f"decided: error: {e}", file=sys.stderr)
        return e.exit_code
    summaries = {run: run_summary(*runs[run][:2], grads[run]) for run in args.runs}
    rows = []
    for run, s in summaries.items():
        for t in CELL_TYPES:
            c = s[t]
            rows.append({"run": run, "cell": t, "non_skip": c["non_skip"], "at_2x_uniform": c["at_twice_uniform"],
                         "p_range": "-" if c["p_min"] is None else f"{c['p_min']:.3f}-{c['p_max']:.3f}",
                         "margin_min": c["margin_min"], "entropy": c["mean_entropy"],
                         "z_at_2": "-" if c["z_vs_second_at_2"] is None else c["z_vs_second_at_2"],
                         "z_range": "-" if c["z_vs_second_min"] is None
                         else f"{c['z_vs_second_min']:+.2f}..{c['z_vs_second_max']:+.2f}"})
    print_table(rows, ["run", "cell", "non_skip", "at_2x_uniform", "p_range", "margin_min", "entropy", "z_at_2",
                       "z_range"],
                title=f"derived edges that are not skip_connect: how many have p >= {2 * UNIFORM:.3f} (twice "
                      f"uniform), and how many hold their margin over the next op at drift z >= 2 (z_range: "
                      f"theirs; '-': no gradient sums in the checkpoint)")
    pushed = {run: contrasts(g) for run, g in grads.items() if g is not None}
    if pushed:
        print_table([{"run": run, "cell": t, **c[t]} for run, c in pushed.items() for t in CELL_TYPES],
                    ["run", "cell", "conv_pairs", "conv_rms", "conv_beyond_2", "skip_up", "skip_down", "max3_up",
                     "max3_down", "avg3_up", "avg3_down"],
                    title="what the data pushed, every edge: drift z of each convolution against each other one (rms, "
                          "share beyond |z| 2); of skip, max pool and avg pool against each convolution (shares above "
                          "2: up, below -2: down). Noise alone: rms 1, 4.6% beyond |z| 2, 2.3% each way")
    pairs = []
    for a, b in itertools.combinations(args.runs, 2):
        for t in CELL_TYPES:
            pairs.append({"a": a, "b": b, "cell": t, **agreement(runs[a][1][t], runs[b][1][t])})
    if pairs:
        print_table([{**r, "same_top_conv": f"{r['same_top_conv']}/{r['edges']}"} for r in pairs],
                    ["a", "b", "cell", "skip_corr", "same_top_conv", "conv_corr"],
                    title="pairs of runs: per-edge p(skip) correlation; edges with the same most likely convolution "
                          f"(chance {pairs[0]['edges'] / len(CONVS):.1f}); convolutions' "
                          f"centred probabilities' correlation")
    extra = {}
    if args.op:
        ops = [op_summary(run, *runs[run], args.op) for run in args.runs]
        print_table(ops, ["run", "logit_prior", "arch_lr", "arch_start", "shuffled", "epochs", "train_acc", "val_best",
                          "val_last", "p_normal", "p_reduce", "derived_normal", "derived_reduce"],
                    title=f"{args.op}: mean probability per cell type at the end (uniform {UNIFORM:.3f}), derived "
                          f"edges (of 8), the search epochs' last train and best / last val accuracy")
        extra = {"op": args.op, "op_rows": ops}
    write_json(args.json, rows, runs=summaries, contrasts=pushed, pairs=pairs, **extra)
    return 0


if __name__ == "__main__":
    sys.exit(main())
