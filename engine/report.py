"""`aso-se report RUN`: a run directory drawn as one page a person looks at.

    RUN/report/index.html       self-contained (figures embedded as PNG; opens from disk, no server)
    RUN/report/curves.{png,svg}        losses, accuracies, learning rate, temperature and entropy over all epochs,
                                       phase boundaries and growth events marked
    RUN/report/architecture.{png,svg}  per-edge op probabilities (softmax of the logits) at the end of each
                                       supernet epoch, normal and reduction cell
    RUN/report/sampling.{png,svg}      mean entropy over the epochs and the sampled-op histogram of the search
    RUN/report/cost.{png,svg}          with a cost term (config `cost`): accuracy against the derived genotype's
                                       cost over the search, the target, and the trained network
    RUN/report/cell_{normal,reduce}.{png,svg,dot}   the derived cells (inputs c_{k-2}, c_{k-1}, the nodes, one
                                       op per edge, the concat), in the DARTS style

The cells are drawn with matplotlib, not graphviz: the layout of a 4-node cell is fixed (inputs, nodes in
order, output), so graphviz's layout engine buys nothing, and a system package (`dot`) would be one more thing a
fresh machine must install before a report can be written. The graphviz source is written beside each drawing
(`cell_*.dot`) for anyone who wants graphviz's rendering: `dot -Tpdf cell_normal.dot -o cell_normal.pdf`.

Works on a finished run, an unfinished one (what metrics.jsonl holds so far) and a resumed one (metrics.jsonl
is truncated to the checkpoint on resume, so it never holds an epoch twice).
"""
from __future__ import annotations

import base64
import html
import json
import os

import numpy as np
import torch

from .arch import ArchState
from .checkpoint import load_checkpoint
from .genotype import Genotype
from .errors import AsoseError, DataError
from .ops import PRIMITIVES

CELL_TYPES = ("normal", "reduce")
PHASE_COLORS = {"warmup": "#dde7f3", "search": "#f6e3cf", "growth": "#e2f0dc", "optimize": "#eeeeee"}
OP_COLORS = {"none": "#cccccc", "max_pool_3x3": "#8da0cb", "avg_pool_3x3": "#a6cee3", "skip_connect": "#6f6f6f",
             "sep_conv_3x3": "#fc8d62", "sep_conv_5x5": "#e5734a", "dil_conv_3x3": "#66c2a5",
             "dil_conv_5x5": "#3f9f82"}


# ------------------------------------------------------------------------------------------ reading a run
def read_run(run_dir: str) -> dict:
    """config.json, metrics.jsonl (every complete line), genotype.json and final.json when they exist."""
    metrics = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(metrics):
        raise DataError(f"{run_dir}: no metrics.jsonl: not a run directory (or a run stopped before its first "
                        f"epoch); point aso-se report at the --out folder of a search")
    records = []
    with open(metrics) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                raise DataError(f"{metrics}: line {n} is not JSON: the file is damaged; resume the run "
                                f"(--resume rewrites metrics.jsonl from its checkpoint) or remove the line") from None
    if not any("epoch" in r for r in records):
        raise DataError(f"{metrics}: no epoch finished yet; write the report once the first epoch has ended")

    def optional(name):
        path = os.path.join(run_dir, name)
        if not os.path.isfile(path):
            return None
        try:
            with open(path) as f:
                return json.load(f)
        except json.JSONDecodeError:
            raise DataError(f"{path}: not JSON: the file is damaged") from None
    genotype = optional("genotype.json")
    return {"dir": run_dir, "config": optional("config.json") or {}, "final": optional("final.json"),
            "genotype": Genotype.from_json(genotype, os.path.join(run_dir, "genotype.json")) if genotype else None,
            "epochs": [r for r in records if "epoch" in r and "event" not in r],
            "growth": [r for r in records if "event" in r]}


# ------------------------------------------------------------------------------------------ figures
def read_gradients(run_dir: str) -> ArchState | None:
    """The architecture steps' gradient sums (ArchState: each logit's drift) from the run's last checkpoint; None
    where it holds none (written before 2026-12-06, a run without architecture steps, or no checkpoint)."""
    path = os.path.join(run_dir, "checkpoints", "last.pt")
    if not os.path.isfile(path):
        return None
    counters = load_checkpoint(path).get("arch_counters") or {}
    if "grad_sum" not in counters:
        return None
    try:
        state = ArchState(counters["grad_sum"].shape[1])
        state.load_gradient_sums(counters)
    except (AttributeError, IndexError, KeyError, RuntimeError, TypeError) as e:
        raise DataError(f"{path}: damaged gradient sums in arch_counters ({e}); rerun the search") from None
    return state


def decided_edges(genotype: Genotype, probabilities: dict[str, list[list[float]]],
                  state: ArchState | None = None) -> dict[str, list[dict]]:
    """`Genotype.decidedness`'s rows (per derived edge: op, p, the next op, its p, the margin), each with the
    chosen op's drift z alone and against the next op (`z`, `z_vs_second`) where `state` holds the run's
    gradient sums: whether the data, and not a random walk, put the margin there."""
    rows = genotype.decidedness(probabilities)
    if state is None:
        return rows
    against = torch.zeros(len(CELL_TYPES), state.grad_sum.shape[1], dtype=torch.long)
    for i, t in enumerate(CELL_TYPES):
        for r in rows[t]:   # a node reads two different inputs: no edge is derived twice
            against[i, r["edge"]] = PRIMITIVES.index(r["second"])
    alone, versus = state.drift().tolist(), state.drift(against).tolist()
    for i, t in enumerate(CELL_TYPES):
        for r in rows[t]:
            c = PRIMITIVES.index(r["op"])
            r["z"], r["z_vs_second"] = round(alone[i][r["edge"]][c], 2), round(versus[i][r["edge"]][c], 2)
    return rows


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    # reproducible SVG ids; text kept as text (searchable, and the tests read the cells' ops from it)
    plt.rcParams.update({"svg.hashsalt": "aso-se", "svg.fonttype": "none", "font.size": 9})
    return plt


def _save(fig, out: str, name: str) -> list[str]:
    paths = []
    for ext in ("png", "svg"):
        path = os.path.join(out, f"{name}.{ext}")
        fig.savefig(path, dpi=110, bbox_inches="tight", **({"metadata": {"Date": None}} if ext == "svg" else {}))
        paths.append(path)
    _plt().close(fig)
    return paths


def _phases(ax, epochs: list[dict], growth: list[dict], label: bool) -> None:
    """Shaded phase spans, growth events as dotted lines."""
    spans: list[list] = []
    for r in epochs:
        x = r["global_epoch"]
        if spans and spans[-1][0] == r["phase"]:
            spans[-1][2] = x
        else:
            spans.append([r["phase"], x, x])
    for phase, a, b in spans:
        ax.axvspan(a - 0.5, b + 0.5, color=PHASE_COLORS.get(phase, "#f4f4f4"), zorder=0, lw=0)
        if label:   # narrow spans (one epoch, or half of one) get their name upright so neighbours never overlap
            narrow = b - a < 2
            ax.text((a + b) / 2, 1.01, phase, transform=ax.get_xaxis_transform(), ha="center", va="bottom",
                    fontsize=7 if narrow else 8, rotation=90 if narrow else 0)
    for g in growth:
        ax.axvline(g["global_epoch"] + 0.5, color="#5a5a5a", ls=":", lw=1)
        if label:
            ax.text(g["global_epoch"] + 0.5, 0.02, f" {g['event']}", transform=ax.get_xaxis_transform(), fontsize=7,
                    rotation=90, va="bottom", color="#5a5a5a")


def curves(run: dict, out: str) -> list[str]:
    plt = _plt()
    epochs, growth = run["epochs"], run["growth"]
    x = [r["global_epoch"] for r in epochs]

    def series(key):
        return [r.get(key) if r.get(key) is not None else float("nan") for r in epochs]
    fig, axes = plt.subplots(2, 2, figsize=(11, 6.5), sharex=True)
    (loss, acc), (lr, tau) = axes
    for key, name in (("train_loss", "train"), ("val_loss", "val"), ("arch_loss", "arch step")):
        loss.plot(x, series(key), marker="o", ms=3, label=name)
    loss.set_ylabel("loss (log scale)")
    loss.set_yscale("log")
    for key, name in (("train_acc", "train"), ("val_acc", "val"), ("arch_acc", "arch step")):
        acc.plot(x, [100 * v for v in series(key)], marker="o", ms=3, label=name)
    if run["final"] is not None:
        acc.axhline(100 * run["final"]["test_acc"], color="k", lw=1, ls="--",
                    label=f"test {100 * run['final']['test_acc']:.2f}%")
    acc.set_ylabel("accuracy (%)")
    lr.plot(x, series("lr"), marker="o", ms=3, color="#555")
    lr.set_ylabel("learning rate (at the epoch's end)")
    tau.plot(x, series("tau"), marker="o", ms=3, label="temperature", color="#d95f02")
    tau.set_ylabel("temperature")
    ent = tau.twinx()
    # the op distribution is fixed once the genotype is derived: its entropy is drawn for the supernet phases only
    entropy = [v if r["phase"] != "optimize" else float("nan") for v, r in zip(series("mean_entropy"), epochs)]
    ent.plot(x, entropy, marker="s", ms=3, label="mean entropy", color="#1b9e77")
    ent.set_ylabel("mean entropy of the op distribution")
    for i, ax in enumerate(axes.flat):
        _phases(ax, epochs, growth, label=i < 2)
        ax.grid(alpha=0.3)
    for ax in (loss, acc):
        ax.legend(fontsize=8)
    tau.legend(handles=[h for h in tau.get_lines() + ent.get_lines() if not h.get_label().startswith("_")],
               fontsize=8, loc="upper right")
    for ax in (lr, tau):
        ax.set_xlabel("epoch (all phases)")
    fig.suptitle(f"{os.path.basename(os.path.abspath(run['dir']))}: training curves", y=1.02)
    return _save(fig, out, "curves")


def architecture(run: dict, out: str) -> list[str] | None:
    """Heatmaps of the op probabilities per edge, at the end of each supernet epoch (at most 6 shown)."""
    snaps = [r for r in run["epochs"] if r.get("probs")]
    if not snaps:
        return None
    if len(snaps) > 6:
        snaps = [snaps[round(i * (len(snaps) - 1) / 5)] for i in range(6)]
    plt = _plt()
    fig, axes = plt.subplots(2, len(snaps), figsize=(2.3 * len(snaps) + 1.5, 7.5), squeeze=False)
    edges = len(snaps[0]["probs"]["normal"])
    labels = [f"{dst} <- " + (f"${src}$" if src.startswith("c_") else src) for dst, src in _edge_names(edges)]
    top = max(max(max(row) for row in r["probs"][t]) for r in snaps for t in CELL_TYPES)
    image = None
    for col, r in enumerate(snaps):
        for row, t in enumerate(CELL_TYPES):
            ax = axes[row][col]
            image = ax.imshow(r["probs"][t], vmin=0, vmax=top, cmap="viridis", aspect="auto")
            ax.set_xticks(range(len(PRIMITIVES)), [_short(p) for p in PRIMITIVES], rotation=90, fontsize=7)
            ax.set_yticks(range(edges), labels if col == 0 else [""] * edges, fontsize=7)
            if row == 0:
                ax.set_title(f"{r['phase']} {r['epoch']}/{r['epochs']}", fontsize=8)
            if col == 0:
                ax.set_ylabel(f"{t} cell: edge (node<-input)")
    fig.colorbar(image, ax=axes, shrink=0.6, label="softmax(logits)")
    fig.suptitle("architecture: op probability per edge at the end of each supernet epoch")
    return _save(fig, out, "architecture")


def drift(run: dict, out: str) -> list[str] | None:
    """Heatmaps of the last supernet epoch's drift z per edge and op (engine/arch.py ArchState.drift): how
    consistently the architecture steps pushed each logit up (red) or down (blue). |z| <= 2 is what a random
    walk of as many steps gives, so those cells are drawn pale: a probability there moved by noise."""
    last = next((r for r in reversed(run["epochs"]) if r.get("drift")), None)
    if last is None:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(9.5, 5.2), squeeze=False)
    edges = len(last["drift"]["normal"])
    labels = [f"{dst} <- " + (f"${src}$" if src.startswith("c_") else src) for dst, src in _edge_names(edges)]
    image = None
    for col, t in enumerate(CELL_TYPES):
        z = np.array(last["drift"][t], dtype=float)
        ax = axes[0][col]
        image = ax.imshow(np.clip(z, -5, 5), vmin=-5, vmax=5, cmap="RdBu_r", aspect="auto",
                          alpha=np.where(np.abs(z) > 2, 1.0, 0.35))
        for (e, k), v in np.ndenumerate(z):
            if abs(v) > 2:
                ax.text(k, e, f"{v:.0f}", ha="center", va="center", fontsize=6)
        ax.set_xticks(range(len(PRIMITIVES)), [_short(p) for p in PRIMITIVES], rotation=90, fontsize=7)
        ax.set_yticks(range(edges), labels if col == 0 else [""] * edges, fontsize=7)
        ax.set_title(f"{t} cell", fontsize=9)
    fig.colorbar(image, ax=axes, shrink=0.6, label="drift z (clipped at 5)")
    fig.suptitle(f"what the data pushed: each logit's drift z over {last.get('arch_grad_steps', '?')} architecture "
                 f"steps, to {last['phase']} {last['epoch']}/{last['epochs']} (pale: |z| <= 2, a random walk's)",
                 fontsize=9)
    return _save(fig, out, "drift")


def sampling(run: dict, out: str) -> list[str] | None:
    epochs = run["epochs"]
    hist = next((r["histogram"] for r in reversed(epochs) if r.get("histogram")), None)
    plt = _plt()
    fig, (ent, bars) = plt.subplots(1, 2, figsize=(11, 3.6))
    ent.plot([r["global_epoch"] for r in epochs], [r.get("mean_entropy") for r in epochs], marker="o", ms=3)
    _phases(ent, epochs, run["growth"], label=True)
    ent.set_xlabel("epoch (all phases)")
    ent.set_ylabel("mean entropy")
    ent.grid(alpha=0.3)
    if hist:
        width = 0.4
        for k, t in enumerate(CELL_TYPES):
            counts = [hist[t].get(p, 0) for p in PRIMITIVES]
            bars.bar([i + (k - 0.5) * width for i in range(len(PRIMITIVES))], counts, width, label=t)
        bars.set_xticks(range(len(PRIMITIVES)), [_short(p) for p in PRIMITIVES], rotation=45)
        bars.set_ylabel("times sampled (search and growth)")
        bars.legend(fontsize=8)
    else:
        bars.text(0.5, 0.5, "no search epoch yet", ha="center", va="center", transform=bars.transAxes)
        bars.set_axis_off()
    return _save(fig, out, "sampling")


def cost_figure(run: dict, out: str) -> list[str] | None:
    """Accuracy against the derived genotype's cost: per supernet epoch (val accuracy, the cost the term's table
    gives the genotype derived then, and the expected cost), the target, and the trained network's test accuracy
    at its cost. Drawn when the run searched with a cost term (config `cost`)."""
    points = [r for r in run["epochs"] if r.get("cost") and r["phase"] != "optimize"]
    if not points:
        return None
    from .cost import fmt
    metric, target = points[-1]["cost"]["metric"], points[-1]["cost"]["target"]
    plt = _plt()
    fig, (acc, cost) = plt.subplots(1, 2, figsize=(10, 3.8))
    xs = [r["cost"]["derived"] for r in points]
    acc.plot(xs, [100 * (r.get("val_acc") or float("nan")) for r in points], marker="o", ms=4, color="#555",
             label="derived genotype after each supernet epoch (val accuracy)")
    for r in points:
        acc.annotate(f"{r['phase'][0]}{r['epoch']}", (r["cost"]["derived"], 100 * (r.get("val_acc") or 0)),
                     fontsize=7, xytext=(3, 3), textcoords="offset points")
    final = run["final"]
    if final and final.get("cost"):
        at = final.get(metric, final["cost"]["derived"])     # params and MACs of the trained network, counted
        acc.scatter([at], [100 * final["test_acc"]], marker="*", s=120, color="#d95f02",
                    zorder=3, label=f"trained network: test {100 * final['test_acc']:.2f}%")
    acc.axvline(target, color="k", ls="--", lw=1, label=f"target {fmt(metric, target)}")
    acc.set_xlabel(f"cost of the derived genotype ({metric})")
    acc.set_ylabel("accuracy (%)")
    acc.legend(fontsize=7)
    x = [r["global_epoch"] for r in points]
    cost.plot(x, [r["cost"]["derived"] for r in points], marker="o", ms=3, label="derived genotype")
    cost.plot(x, [r["cost"]["expected"] for r in points], marker="s", ms=3, label="expected (the term's quantity)")
    cost.axhline(target, color="k", ls="--", lw=1, label="target")
    cost.set_xlabel("epoch (supernet phases)")
    cost.set_ylabel(metric)
    cost.legend(fontsize=7)
    for ax in (acc, cost):
        ax.grid(alpha=0.3)
    fig.suptitle(f"{os.path.basename(os.path.abspath(run['dir']))}: accuracy and cost", y=1.02)
    return _save(fig, out, "cost")


def _edge_names(edges: int) -> list[tuple[int, str]]:
    names, node = [], 0
    while len(names) < edges:
        for src in range(node + 2):
            names.append((node, _input_name(src)))
        node += 1
    return names[:edges]


def _input_name(src: int) -> str:
    return {0: "c_{k-2}", 1: "c_{k-1}"}.get(src, str(src - 2))


def _short(op: str) -> str:
    return op.replace("_conv_", "").replace("_pool_", "pool").replace("skip_connect", "skip").replace("3x3", "3") \
        .replace("5x5", "5")


def cell_dot(genotype: Genotype, cell_type: str) -> str:
    """The cell as graphviz source, in the style of DARTS's visualize.py."""
    pairs = getattr(genotype, cell_type)
    concat = getattr(genotype, f"{cell_type}_concat")
    nodes = len(pairs) // 2
    lines = [f"digraph {cell_type} {{", "  rankdir=LR;",
             '  node [style="rounded,filled", shape=rect, fontname=helvetica, penwidth=2, height=0.5];',
             '  edge [fontname=times, fontsize=16];',
             '  "c_{k-2}" [fillcolor=darkseagreen2];', '  "c_{k-1}" [fillcolor=darkseagreen2];']
    lines += [f'  "{i}" [fillcolor=lightblue];' for i in range(nodes)]
    lines.append('  "c_{k}" [fillcolor=palegoldenrod];')
    for j, (op, src) in enumerate(pairs):
        lines.append(f'  "{_input_name(src)}" -> "{j // 2}" [label="{op}", fillcolor=gray];')
    lines += [f'  "{c - 2}" -> "c_{{k}}" [fillcolor=gray];' for c in concat]
    lines.append("}")
    return "\n".join(lines) + "\n"


def cell_figure(genotype: Genotype, cell_type: str, out: str) -> list[str]:
    """The derived cell drawn with matplotlib: inputs left, nodes in order, the concat output right."""
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch
    plt = _plt()
    pairs = getattr(genotype, cell_type)
    concat = getattr(genotype, f"{cell_type}_concat")
    nodes = len(pairs) // 2
    pos = {"c_{k-2}": (0.0, 1.5), "c_{k-1}": (0.0, -1.5)}
    for i in range(nodes):  # a staircase: every edge runs left to right, few cross
        pos[str(i)] = (2.6 * (i + 1), 1.5 - 3.0 * i / max(nodes - 1, 1))
    pos["c_{k}"] = (2.6 * (nodes + 1), 0.0)
    fig, ax = plt.subplots(figsize=(2.4 * nodes + 4, 4.6))
    fills = {"c_{k-2}": "#c1ebc1", "c_{k-1}": "#c1ebc1", "c_{k}": "#eee8aa"}
    for name, (x, y) in pos.items():
        ax.add_patch(FancyBboxPatch((x - 0.42, y - 0.22), 0.84, 0.44, boxstyle="round,pad=0.05",
                                    fc=fills.get(name, "#add8e6"), ec="k", lw=1.5, zorder=3))
        ax.text(x, y, f"${name}$" if name.startswith("c_") else name, ha="center", va="center", zorder=4,
                fontsize=11)

    def arrow(a, b, rad, color, lw=1.6, ls="-"):
        (x0, y0), (x1, y1) = pos[a], pos[b]
        p0, p2 = (x0 + 0.45, y0), (x1 - 0.45, y1)
        ax.add_patch(FancyArrowPatch(p0, p2, connectionstyle=f"arc3,rad={rad}", arrowstyle="-|>",
                                     mutation_scale=12, lw=lw, color=color, ls=ls, zorder=2))
        return p0, p2
    for j, (op, src) in enumerate(pairs):
        rad = 0.15 if j % 2 == 0 else -0.15
        color = OP_COLORS.get(op, "#444")
        (x0, y0), (x2, y2) = arrow(_input_name(src), str(j // 2), rad, color)
        # matplotlib's arc3 is the quadratic Bezier through the chord's midpoint offset by rad x (dy, -dx);
        # the label sits at t = 0.7, near the node the op feeds
        cx, cy = (x0 + x2) / 2 + rad * (y2 - y0), (y0 + y2) / 2 - rad * (x2 - x0)
        t = 0.7
        lx = (1 - t) ** 2 * x0 + 2 * (1 - t) * t * cx + t ** 2 * x2
        ly = (1 - t) ** 2 * y0 + 2 * (1 - t) * t * cy + t ** 2 * y2
        ax.text(lx, ly, op, ha="center", va="center", fontsize=8, zorder=5,
                bbox=dict(boxstyle="round,pad=0.2", fc="white", ec=color, lw=1.2, alpha=0.95))
    for c in concat:
        arrow(str(c - 2), "c_{k}", 0.0, "#c4c4c4", lw=1.0, ls="--")  # the concat
    xs, ys = zip(*pos.values())
    ax.set_xlim(min(xs) - 0.8, max(xs) + 0.8)
    ax.set_ylim(min(ys) - 0.9, max(ys) + 0.9)
    ax.set_axis_off()
    ax.set_title(f"{cell_type} cell", fontsize=11)
    paths = _save(fig, out, f"cell_{cell_type}")
    dot = os.path.join(out, f"cell_{cell_type}.dot")
    with open(dot, "w") as f:
        f.write(cell_dot(genotype, cell_type))
    return paths + [dot]


# ------------------------------------------------------------------------------------------ the page
def _decided_section(run: dict, run_dir: str, genotype: Genotype | None) -> str | None:
    """How decided the derived cells are: per derived edge its op's probability against the next op's and, from
    the checkpoint's gradient sums, the drift z of that margin. None without a genotype or probabilities."""
    probs = next((r["probs"] for r in reversed(run["epochs"]) if r.get("probs")), None)
    if genotype is None or probs is None:
        return None
    note = ""
    try:
        state = read_gradients(run_dir)
    except AsoseError as e:
        state, note = None, f" (no drift: {e})"
    if state is None and not note:
        has = os.path.isfile(os.path.join(run_dir, "checkpoints", "last.pt"))
        note = f" (no drift: {'the checkpoint holds no gradient sums' if has else 'no checkpoints/last.pt'})"
    names = _edge_names(len(probs[CELL_TYPES[0]]))
    rows = [{"cell": t, "edge": f"{names[r['edge']][0]} <- {names[r['edge']][1]}", **r}
            for t, cell in decided_edges(genotype, probs, state).items() for r in cell]
    held = [r for r in rows if r["op"] != "skip_connect" and r.get("z_vs_second", -1) >= 2]
    twice = [r for r in rows if r["op"] != "skip_connect" and r["p"] >= 2 / len(PRIMITIVES)]
    free = sum(r["op"] != "skip_connect" for r in rows)
    summary = (f"Of the {free} derived ops other than skip_connect, {len(twice)} have p >= {2 / len(PRIMITIVES):.2f} "
               f"(twice uniform)" + ("" if state is None else
                                    f" and {len(held)} hold their margin over the next op at drift z >= 2 (a random "
                                    f"walk stays within 2)") + f".{note}")
    cols = ["cell", "edge", "op", "p", "second", "p_second", "margin"] + ([] if state is None else ["z", "z_vs_second"])
    return f"<h2>How decided the derived cells are</h2><p>{html.escape(summary)}</p>" + _table(rows, cols)


def _table(rows: list[dict], columns: list[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(c)))}</td>" for c in columns) + "</tr>"
                   for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, (dict, list)):
        return json.dumps(v)
    return str(v)


def _kv(d: dict) -> str:
    return _table([{"field": k, "value": v} for k, v in d.items()], ["field", "value"])


def _img(path: str, alt: str) -> str:
    with open(path, "rb") as f:
        data = base64.b64encode(f.read()).decode()
    svg = os.path.basename(path)[:-4] + ".svg"
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'
            f'<figcaption>{html.escape(alt)} (<a href="{svg}">SVG</a>)</figcaption></figure>')


STYLE = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222}
img{max-width:100%}table{border-collapse:collapse;margin:.5em 0 1.5em;font-size:90%}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:left;vertical-align:top}th{background:#f3f3f3}
figure{margin:1em 0}figcaption{color:#555;font-size:90%}.cells{display:flex;flex-wrap:wrap;gap:1em}
.cells figure{flex:1 1 100%}"""
# sets data-images="loaded/total" on <body> once the page has loaded: a browser check reads it (tests)
SCRIPT = """window.addEventListener('load',function(){var i=document.images,n=0;for(var k=0;k<i.length;k++)
{if(i[k].complete&&i[k].naturalWidth>0)n++;}document.body.setAttribute('data-images',n+'/'+i.length);});"""


def write_report(run_dir: str, out: str | None = None) -> str:
    """Write RUN/report/ (or `out`) and return the path of its index.html."""
    run = read_run(run_dir)
    out = out or os.path.join(run_dir, "report")
    os.makedirs(out, exist_ok=True)
    parts = [f"<h1>ASO-SE run {html.escape(os.path.basename(os.path.abspath(run_dir)))}</h1>"]
    final, epochs = run["final"], run["epochs"]
    last = epochs[-1]
    state = ("finished: " + f"test accuracy {100 * final['test_acc']:.2f}%, {final['params']:,} parameters, "
             f"{final['wall_s']:.0f} s") if final else (f"unfinished: {len(epochs)} epoch(s) so far, the last "
                                                        f"{last['phase']} {last['epoch']}/{last['epochs']}")
    parts.append(f"<p>{html.escape(state)}</p>")
    parts.append("<h2>Training</h2>" + _img(curves(run, out)[0], "training curves over all phases"))
    genotype = run["genotype"] or (Genotype.from_json(final["genotype"]) if final else None)
    if genotype is not None:
        parts.append("<h2>Derived cells</h2><p>" + html.escape(str(genotype)) + '</p><div class="cells">'
                     + "".join(_img(cell_figure(genotype, t, out)[0], f"{t} cell") for t in CELL_TYPES) + "</div>")
    arch = architecture(run, out)
    if arch:
        parts.append("<h2>Architecture during the search</h2>" + _img(arch[0], "op probabilities per edge"))
    pushed = drift(run, out)
    if pushed:
        parts.append(_img(pushed[0], "drift z of each logit over the architecture steps"))
    decided = _decided_section(run, run_dir, genotype)
    if decided:
        parts.append(decided)
    parts.append(_img(sampling(run, out)[0], "mean entropy and sampled-op histogram"))
    if run["growth"]:
        cols = ["global_epoch", "event", "params_before", "params_after", "max_abs_diff", "grow_s", "recompiles",
                "recompile_s"]
        parts.append("<h2>Growth events</h2>" + _table(run["growth"], cols))
    compile_rows = [{"phase": r["phase"], "epoch": r["epoch"], "compiles": r.get("compiles"),
                     "recompiles": r.get("recompiles"), "compile_s": r.get("compile_s")} for r in epochs]
    parts.append("<h2>Compilation</h2>" + _table(compile_rows, ["phase", "epoch", "compiles", "recompiles",
                                                                   "compile_s"]))
    if final and final.get("compile_per_rank"):
        parts.append(_table([{"rank": i, **c} for i, c in enumerate(final["compile_per_rank"])],
                            ["rank", "compiles", "recompiles", "compile_s"]))
    costs = cost_figure(run, out)
    if costs:
        parts.append("<h2>Accuracy and cost</h2>" + _img(costs[0], "accuracy against the derived network's cost"))
    epoch_cols = ["phase", "epoch", "train_loss", "train_acc", "val_acc", "arch_acc", "lr", "tau", "mean_entropy",
                  "params", "it_s", "elapsed_s"]
    parts.append("<h2>Epochs</h2>" + _table(epochs, epoch_cols))
    if final:
        parts.append("<h2>Final record</h2>" + _kv({k: v for k, v in final.items() if k != "genotype"}))
    parts.append("<h2>Config</h2>" + _kv(run["config"]))
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>ASO-SE report</title><style>{STYLE}</style>"
            f"<script>{SCRIPT}</script></head><body>{''.join(parts)}</body></html>")
    index = os.path.join(out, "index.html")
    tmp = index + ".tmp"
    with open(tmp, "w") as f:
        f.write(page)
    os.replace(tmp, index)
    return index
