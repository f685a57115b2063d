"""The genotype: what a search ends with, and the DARTS derivation that turns edge probabilities into it.

A cell has `nodes` intermediate nodes; node j reads both cell inputs and every earlier node, so its edges are
numbered by `edge_index`, the order the architecture's logits rows (engine/arch.py) and the network's edges
(engine/network.py) share. `Genotype.from_probabilities` is the one derivation rule: the `derive` phase of the
architecture, the run's genotype.json and the bench all call it, so the `none` exclusion and the skip and
parameter-free caps are read and changed in one place.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import torch

from .errors import ConfigError
from .ops import PARAMETER_FREE, PRIMITIVES

CELL_TYPES = ("normal", "reduce")
NONE = PRIMITIVES.index("none")
SKIP = PRIMITIVES.index("skip_connect")

def num_edges(nodes: int) -> int:
    """DARTS cell: node j (0-based) has 2 + j incoming edges (both cell inputs and every earlier node)."""
    return sum(2 + j for j in range(nodes))


def edge_index(node: int, source: int) -> int:
    """Index of the edge from state `source` (0, 1 = cell inputs, 2.. = nodes) into intermediate node `node`."""
    return sum(2 + j for j in range(node)) + source


@dataclass
class Genotype:
    """DARTS genotype: per node, two (op, input) pairs; inputs 0, 1 are the cell inputs, 2.. the nodes."""
    normal: list[tuple[str, int]]
    normal_concat: list[int]
    reduce: list[tuple[str, int]]
    reduce_concat: list[int]

    @classmethod
    def from_probabilities(cls, probs: dict[str, torch.Tensor], nodes: int = 4,
                           max_skip: int | None = None, max_skip_reduce: int | None = None,
                           max_param_free: int | None = None,
                           max_param_free_reduce: int | None = None) -> "Genotype":
        """The DARTS rule: for each node keep the two incoming edges whose best non-`none` weight is largest,
        and on each the best non-`none` op. `max_skip` caps skip_connect in the normal cell (P-DARTS): while
        there are more, the chosen skip with the smallest weight is ruled out on its edge and the cell is
        derived again, so that edge falls back to its best other op (or loses its place to another edge).
        `max_skip_reduce` does the same in the reduction cell. `max_param_free` caps the parameter-free ops
        (pools and skip_connect) of the normal cell the same way: the weakest chosen one is ruled out first;
        `max_param_free_reduce` those of the reduction cell."""
        parsed = {}
        free = [PRIMITIVES.index(op) for op in PARAMETER_FREE if op != "none"]
        for t in CELL_TYPES:
            caps = [(max_skip if t == "normal" else max_skip_reduce, [SKIP]),
                    (max_param_free if t == "normal" else max_param_free_reduce, free)]
            rows = probs[t].tolist() if isinstance(probs[t], torch.Tensor) else probs[t]
            p = [[-1.0 if k == NONE else float(v) for k, v in enumerate(row)] for row in rows]
            best_op = lambda e: max(range(len(p[e])), key=p[e].__getitem__)  # noqa: E731 (first of ties)
            while True:
                pairs, edges = [], []
                for node in range(nodes):
                    scored = [(max(p[edge_index(node, s)]), s) for s in range(2 + node)]
                    best = sorted(scored, key=lambda r: (-r[0], r[1]))[:2]
                    for _, s in sorted(best, key=lambda r: r[1]):
                        e = edge_index(node, s)
                        pairs.append((PRIMITIVES[best_op(e)], s))
                        edges.append(e)
                over = None
                for cap, ops in caps:
                    chosen = [(e, PRIMITIVES.index(op)) for (op, _), e in zip(pairs, edges)
                              if PRIMITIVES.index(op) in ops]
                    if cap is not None and len(chosen) > cap:
                        over = min(chosen, key=lambda c: (p[c[0]][c[1]], c[0]))
                        break
                if over is None:
                    break
                p[over[0]][over[1]] = -1.0
            parsed[t] = pairs
        concat = list(range(2, 2 + nodes))
        return cls(parsed["normal"], concat, parsed["reduce"], list(concat))

    @classmethod
    def random(cls, rng: np.random.Generator, nodes: int = 4, free_share: float | None = None) -> "Genotype":
        """A genotype drawn uniformly from the space the search derives from: per node, two distinct inputs
        among the states before it, and on each an op other than `none` (the random-architecture baseline
        of Li & Talwalkar 2019 and Yang et al. 2020). With `free_share`, each edge is parameter-free with that
        probability (else a convolution), uniform within the group: networks across the space's cost range."""
        ops = [op for op in PRIMITIVES if op != "none"]
        groups = ([op for op in ops if op in PARAMETER_FREE], [op for op in ops if op not in PARAMETER_FREE])

        def draw() -> str:
            if free_share is None:
                return ops[int(rng.integers(len(ops)))]
            group = groups[0] if rng.random() < free_share else groups[1]
            return group[int(rng.integers(len(group)))]
        cells = {}
        for t in CELL_TYPES:
            pairs = []
            for node in range(nodes):
                for src in sorted(int(s) for s in rng.choice(2 + node, size=2, replace=False)):
                    pairs.append((draw(), src))
            cells[t] = pairs
        concat = list(range(2, 2 + nodes))
        return cls(cells["normal"], concat, cells["reduce"], list(concat))

    @classmethod
    def across_costs(cls, rng: np.random.Generator, n: int, nodes: int = 4) -> list["Genotype"]:
        """n random genotypes spread over the space's cost range: the k-th has each edge parameter-free with
        probability k / (n - 1), from all convolutions to none. The baseline that covers the costs a cost-targeted
        search reaches, which uniform draws (about 3 of 7 ops parameter-free) leave out."""
        return [cls.random(rng, nodes, free_share=float(share)) for share in np.linspace(0.0, 1.0, n)]

    def share(self, ops) -> dict[str, float]:
        """Share of each cell type's edges that carry one of `ops` (e.g. a planted task's op family)."""
        return {t: sum(op in ops for op, _ in getattr(self, t)) / len(getattr(self, t)) for t in CELL_TYPES}

    def param_free_fraction(self) -> dict[str, float]:
        """Share of each cell type's edges that carry a parameter-free op (pooling, skip_connect): 1.0 is the
        collapse DARTS users report (AutoDL-Projects#58, PC-DARTS#21)."""
        return self.share(PARAMETER_FREE)

    def decidedness(self, probabilities: dict[str, list[list[float]]]) -> dict[str, list[dict]]:
        """Per cell type and derived edge (this genotype's order): the edge's index, its op's probability, the best
        other op (neither `none`) with its probability, and the margin between the two (negative where a cap
        chose an op below another)."""
        out = {}
        for t in CELL_TYPES:
            rows = []
            for k, (op, src) in enumerate(getattr(self, t)):
                e = edge_index(k // 2, src)
                p, chosen = probabilities[t][e], PRIMITIVES.index(op)
                second = max((i for i in range(len(p)) if i not in (NONE, chosen)), key=lambda i: p[i])
                rows.append({"op": op, "input": src, "edge": e, "p": round(p[chosen], 4),
                             "second": PRIMITIVES[second], "p_second": round(p[second], 4),
                             "margin": round(p[chosen] - p[second], 4)})
            out[t] = rows
        return out

    def to_json(self) -> dict:
        return {"normal": [list(x) for x in self.normal], "normal_concat": self.normal_concat,
                "reduce": [list(x) for x in self.reduce], "reduce_concat": self.reduce_concat}

    @classmethod
    def from_json(cls, data: dict, source: str = "genotype") -> "Genotype":
        try:
            fields = {}
            for t in CELL_TYPES:
                pairs = [(str(op), int(i)) for op, i in data[t]]
                for k, (op, i) in enumerate(pairs):
                    if op not in PRIMITIVES or op == "none":
                        raise ValueError(f"unknown op {op!r} in {t}")
                    if not 0 <= i < 2 + k // 2:
                        raise ValueError(f"{t} pair {k} reads state {i}, which does not exist yet")
                if len(pairs) % 2:
                    raise ValueError(f"{t} has {len(pairs)} pairs; need two per node")
                fields[t] = pairs
                fields[f"{t}_concat"] = [int(i) for i in data[f"{t}_concat"]]
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"{source}: not a DARTS genotype ({e}); expected "
                              f'{{"normal": [[op, input], ...], "normal_concat": [2, 3, 4, 5], "reduce": ..., '
                              f'"reduce_concat": ...}}') from None
        return cls(**fields)

    @classmethod
    def load(cls, path: str) -> "Genotype":
        try:
            with open(path) as f:
                data = json.load(f)
        except OSError as e:
            raise ConfigError(f"{path}: cannot read genotype ({e.strerror})") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        if isinstance(data, dict) and "genotype" in data and "normal" not in data:
            data = data["genotype"]  # final.json / checkpoint-style wrappers
        return cls.from_json(data, path)

    @property
    def nodes(self) -> int:
        return len(self.normal) // 2

    def __str__(self) -> str:
        short = {"max_pool_3x3": "max3", "avg_pool_3x3": "avg3", "skip_connect": "skip", "sep_conv_3x3": "sep3",
                 "sep_conv_5x5": "sep5", "dil_conv_3x3": "dil3", "dil_conv_5x5": "dil5"}

        def cell(pairs):
            return " | ".join(" ".join(f"{short.get(op, op)}({i})" for op, i in pairs[2 * n:2 * n + 2])
                              for n in range(len(pairs) // 2))
        return f"normal: {cell(self.normal)}  //  reduce: {cell(self.reduce)}"
