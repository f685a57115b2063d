"""What a derived network costs, edge by edge, and the architecture step's cost term (`CostTerm`).

A derived network's cost is a fixed part (stem, each cell's input preprocessing, classifier) plus one term per
chosen edge, which depends only on the op, the cell it sits in (channels, resolution) and whether the edge
strides. So a table per cell type, `table[t][e][k]`, the cost of op k on edge e summed over every cell of type
t, gives any genotype's cost as `fixed + sum of its edges' entries`, and the expected cost of the search's
edge distributions as a sum of probabilities times entries (differentiable in the probabilities). Parameters
and multiply-accumulates are exact from the shapes (`cost_table`); latency is measured (engine/latency.py).

Multiply-accumulates are counted by `torch.utils.flop_counter` (convolutions and the classifier; a FLOP
counted there is half a multiply-accumulate), for one image at the network's input size. Pooling, BatchNorm
and additions are not in that count, as in the papers that report MACs.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from .genotype import CELL_TYPES, NONE, Genotype, edge_index, num_edges
from .network import NetSpec, Network, count_parameters
from .ops import PRIMITIVES, make_op

METRICS = ("params", "macs")


def macs(module: torch.nn.Module, shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of one forward pass of `module` (eval mode) on a zero input of `shape`."""
    was = module.training
    module.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(torch.zeros(shape))
    module.train(was)
    return counter.get_total_flops() // 2


@dataclass
class CostTable:
    """`edges[metric][cell_type]`: (edges, ops) nested lists; `fixed[metric]`: what every genotype pays.
    Metrics: "params" and "macs" (`cost_table`, exact), "latency" in ms (engine/latency.py, measured)."""
    spec: NetSpec
    image_hw: tuple[int, int]
    edges: dict[str, dict[str, list[list[float]]]]
    fixed: dict[str, float]
    meta: dict = field(default_factory=dict)   # a measured table's batch, device, machine (engine/latency.py)

    def of(self, genotype: Genotype) -> dict[str, float]:
        """The genotype's cost in each of the table's metrics: fixed part plus its edges' entries."""
        out = dict(self.fixed)
        for t in CELL_TYPES:
            for k, (op, src) in enumerate(getattr(genotype, t)):
                e, o = edge_index(k // 2, src), PRIMITIVES.index(op)
                for m in self.edges:
                    out[m] += self.edges[m][t][e][o]
        return out


def edge_inputs(spec: NetSpec, image_hw: tuple[int, int]):
    """(cell type, edge, channels, stride, input height and width) of every edge of every cell of `spec`, for
    images of `image_hw`: the shape an op on that edge reads."""
    h, w = image_hw
    base = (-(-h // spec.stem_stride), -(-w // spec.stem_stride))   # the stem: 3x3, padding 1
    states = spec.state_shapes()                                     # (channels, reduction level) per state
    for cell in spec.cells:
        level = states[cell.inputs[1]][1]                             # s1's scale; pre0 brings s0 to it
        hw_in = (-(-base[0] // 2 ** level), -(-base[1] // 2 ** level))
        hw_out = (-(-hw_in[0] // 2), -(-hw_in[1] // 2)) if cell.reduction else hw_in
        for node in range(spec.nodes):
            for src in range(2 + node):
                stride = 2 if cell.reduction and src < 2 else 1
                yield cell.cell_type, edge_index(node, src), cell.c, stride, hw_in if src < 2 else hw_out


def empty_edges(spec: NetSpec, metrics) -> dict:
    return {m: {t: [[0] * len(PRIMITIVES) for _ in range(num_edges(spec.nodes))] for t in CELL_TYPES}
            for m in metrics}


def cost_table(spec: NetSpec, image_hw: tuple[int, int]) -> CostTable:
    """Every op's cost on every edge of every cell of `spec` (a derived network's spec: the width and stem
    stride the optimize phase trains), for images of `image_hw`."""
    edges = empty_edges(spec, METRICS)
    memo: dict[tuple, tuple[int, int]] = {}
    for t, e, c, stride, size in edge_inputs(spec, image_hw):
        for o, op in enumerate(PRIMITIVES):
            key = (op, c, stride, size)
            if key not in memo:
                module = make_op(op, c, stride, affine=True)
                memo[key] = (count_parameters(module), macs(module, (1, c, *size)))
            p, m = memo[key]
            edges["params"][t][e][o] += p
            edges["macs"][t][e][o] += m
    table = CostTable(spec, image_hw, edges, {m: 0 for m in METRICS})
    # the fixed part, from one whole network: what it costs minus what its edges cost
    probe = Genotype.random(np.random.default_rng(0), spec.nodes)
    whole = network_cost(spec, probe, image_hw)
    table.fixed = {m: whole[m] - table.of(probe)[m] for m in METRICS}
    return table


def network_cost(spec: NetSpec, genotype: Genotype, image_hw: tuple[int, int]) -> dict[str, int]:
    """The parameters and multiply-accumulates of the whole derived network, counted directly."""
    net = Network(spec, genotype)
    return {"params": count_parameters(net), "macs": macs(net, (1, spec.in_channels, *image_hw))}


def cheapest(table: CostTable, metric: str) -> float:
    """The least a genotype of the table's space can cost: per node, the two edges whose cheapest op (not
    `none`) costs least."""
    total = table.fixed[metric]
    nodes = table.spec.nodes
    for t in CELL_TYPES:
        rows = table.edges[metric][t]
        for node in range(nodes):
            best = sorted(min(v for k, v in enumerate(rows[edge_index(node, s)]) if k != NONE)
                          for s in range(2 + node))
            total += best[0] + best[1]
    return total


def fmt(metric: str, value: float) -> str:
    """A cost for a log line: parameters in thousands, multiply-accumulates in millions, latency in ms."""
    if metric == "params":
        return f"{value / 1e3:,.1f}k params"
    if metric == "macs":
        return f"{value / 1e6:,.2f}M MACs"
    return f"{value:,.3f} ms"


class CostTerm:
    """The architecture step's cost term (config `cost`, `cost_target`, `cost_weight`).

    The penalty is MnasNet's hard constraint (Tan et al. 2019) on the loss, in FBNet's log-ratio form (Wu et
    al. 2019): `cost_weight * max(0, log(cost / target))`: nothing under the target, and over it a pull that
    doubles in strength with each doubling of cost, whatever the metric's unit.

    Its value is the cost of the genotype the derivation would give now (two edges per node, the best op on
    each, no caps: `derived_cost`, on the device), so the pull stops once the derived network fits the target.
    Its gradient is that of the log of the expected cost (straight through): the fixed part plus, per edge, the
    probability-weighted cost of its ops, `none` left out and the others renormalized (the derivation never
    keeps `none`: counting it as free would reward making `none` likely), times the share of its node's edges
    the derivation keeps (two of the 2 + node). A penalty on the expected cost alone went on pulling after the
    derived genotype was under the target, since the expectation keeps mass on the ops not chosen: on
    Fashion-MNIST both searches of a target at 0.52x the random genotypes' mean ended at the cheapest genotype
    of the space, every edge a pool or a skip (docs/cost.md).
    """

    def __init__(self, table: CostTable, metric: str, target: float, weight: float):
        if metric not in table.edges:
            raise ValueError(f"the cost table has no {metric!r} entries")
        self.table, self.metric, self.target, self.weight = table, metric, float(target), float(weight)
        nodes = table.spec.nodes
        keep = [0.0] * num_edges(nodes)
        for node in range(nodes):
            for src in range(2 + node):
                keep[edge_index(node, src)] = 2 / (2 + node)
        self.ops = [k for k in range(len(PRIMITIVES)) if k != NONE]
        self._cache: dict = {}
        self.full = {t: torch.tensor(table.edges[metric][t], dtype=torch.float64)[:, self.ops] for t in CELL_TYPES}
        self.rows = {t: self.full[t] * torch.tensor(keep, dtype=torch.float64)[:, None] for t in CELL_TYPES}

    def expected(self, logits: dict[str, torch.Tensor]) -> torch.Tensor:
        total = None
        for t in CELL_TYPES:
            x = logits[t]
            p = torch.softmax(x[:, self.ops], dim=1)                  # `none` left out
            term = (p * self._on(self.rows, t, x)).sum()
            total = term if total is None else total + term
        return total + self.table.fixed[self.metric]

    def _on(self, tables: dict, t: str, like: torch.Tensor) -> torch.Tensor:
        """`tables[t]` on `like`'s device and dtype, copied there once (no copy from the host in a step)."""
        key = (id(tables), t, like.device, like.dtype)
        if key not in self._cache:
            self._cache[key] = tables[t].to(device=like.device, dtype=like.dtype)
        return self._cache[key]

    @torch.no_grad()
    def derived_cost(self, logits: dict[str, torch.Tensor]) -> torch.Tensor:
        """The cost of the genotype the DARTS rule derives from `logits` (Genotype.from_probabilities without
        its caps), computed on the logits' device: no host read in the step."""
        total = None
        nodes = self.table.spec.nodes
        for t in CELL_TYPES:
            x = logits[t]
            strength, op = torch.softmax(x.float(), dim=1)[:, self.ops].max(dim=1)   # best op that is not `none`
            cost = self._on(self.full, t, x).gather(1, op[:, None]).squeeze(1)
            for node in range(nodes):
                lo = edge_index(node, 0)
                kept = strength[lo:lo + 2 + node].topk(2).indices
                term = cost[lo:lo + 2 + node][kept].sum()
                total = term if total is None else total + term
        return total + self.table.fixed[self.metric]

    def __call__(self, logits: dict[str, torch.Tensor]) -> torch.Tensor:
        expected = self.expected(logits)
        cost = expected * (self.derived_cost(logits).to(expected.dtype) / expected.detach())  # value: derived
        return self.weight * torch.relu(torch.log(cost / self.target))

    def derived(self, genotype: Genotype) -> float:
        return float(self.table.of(genotype)[self.metric])

    def describe(self, seed: int = 0, n: int = 20) -> dict:
        """Where the target lies in the space: the cheapest genotype's cost and the mean of n random ones."""
        rng = np.random.default_rng([seed, 303])
        mean = float(np.mean([self.derived(Genotype.random(rng, self.table.spec.nodes)) for _ in range(n)]))
        return {"metric": self.metric, "target": self.target, "cheapest": cheapest(self.table, self.metric),
                "random_mean": mean}

    def record(self, logits: dict[str, torch.Tensor], genotype: Genotype) -> dict:
        """The epoch's cost record: expected (the term's quantity), the derived genotype's, the target."""
        with torch.no_grad():
            expected = float(self.expected(logits))                  # a host read, at the epoch's end
        return {"metric": self.metric, "expected": round(expected, 4), "derived": round(self.derived(genotype), 4),
                "target": self.target}

    def verdict(self, derived: float) -> str | None:
        """One line when the derived genotype is more than 10% over the target, else None."""
        if derived <= 1.1 * self.target:
            return None
        over = 100 * (derived / self.target - 1)
        return (f"the derived genotype's cost, {fmt(self.metric, derived)}, is {over:.0f}% "
                f"over the target {fmt(self.metric, self.target)}: raise cost_weight or search longer")
