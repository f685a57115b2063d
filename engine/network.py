"""Supernet and derived network: stem, DARTS cells with explicit input wiring, global pool, classifier.

States are numbered: state 0 is the stem's output and each ordinary cell appends one. A cell names the two
states it reads by index (`inputs`), so cells can be inserted later without touching the others: an
inserted cell is *residual*, it refines an existing state in place, `s[o] <- s[o] + scale * cell(s[a], s[b])`,
with `scale` (one per channel) starting at zero, so the network's function is unchanged at insertion.

The whole structure is a `NetSpec` (plain data): checkpoints store it, and `Network(spec)` rebuilds a grown
network exactly. A derived network is the same spec plus a genotype: each node keeps its two chosen edges.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import nn

from .arch import CellWeights
from .genotype import CELL_TYPES, Genotype, edge_index
from .mixed import MixedOp
from .ops import PRIMITIVES, FactorizedReduce, Identity, ReLUConvBN, grad_in_layout, make_op, zeros_like_layout


@dataclass
class CellSpec:
    c: int                      # channels of each intermediate node; the cell outputs nodes * c
    reduction: bool             # stride 2 on the edges from the cell inputs
    inputs: tuple[int, int]     # state indices read as s0, s1
    output: int                 # state index written (a new one, or an existing one if residual)
    residual: bool = False      # inserted by growth: adds scale * output to the state instead of appending

    @property
    def cell_type(self) -> str:
        return "reduce" if self.reduction else "normal"


@dataclass
class NetSpec:
    in_channels: int
    num_classes: int
    stem_channels: int
    stem_stride: int = 1
    nodes: int = 4
    cells: list[CellSpec] = field(default_factory=list)
    gated: bool = True          # supernet: the ops warmup does not train start with a zero output scale
                                # (ops.gate_output); older checkpoints, written before the field, were gated

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "NetSpec":
        cells = [CellSpec(**{**c, "inputs": tuple(c["inputs"])}) for c in data["cells"]]
        return cls(**{**data, "cells": cells})

    def state_shapes(self) -> list[tuple[int, int]]:
        """(channels, reduction level) of every state, in index order."""
        states = [(self.stem_channels, 0)]
        for c in self.cells:
            level = max(states[c.inputs[0]][1], states[c.inputs[1]][1]) + int(c.reduction)
            shape = (self.nodes * c.c, level)
            if c.residual:
                if states[c.output] != shape:
                    raise ValueError(f"residual cell writes {shape} into state {c.output} of shape {states[c.output]}")
            else:
                if c.output != len(states):
                    raise ValueError(f"cell writes state {c.output}, expected the next index {len(states)}")
                states.append(shape)
        return states


def darts_spec(in_channels: int, num_classes: int, c: int = 16, layers: int = 8, nodes: int = 4,
               stem_multiplier: int = 3, stem_stride: int = 1, gated: bool = True) -> NetSpec:
    """DARTS layout: `layers` cells, reduction cells at 1/3 and 2/3 of the depth (channels doubled there);
    cell k reads the outputs of the two cells before it (the stem stands in for missing ones)."""
    if layers < 1:
        raise ValueError("layers must be >= 1")
    reductions = {layers // 3, 2 * layers // 3} if layers >= 3 else set()
    cells, c_cur = [], c
    for k in range(layers):
        reduction = k in reductions
        if reduction:
            c_cur *= 2
        cells.append(CellSpec(c_cur, reduction, (max(k - 1, 0), k), k + 1))
    return NetSpec(in_channels, num_classes, stem_multiplier * c, stem_stride, nodes, cells, gated)


class Cell(nn.Module):
    """Preprocessing of the two inputs to c channels (FactorizedReduce when s0 is at a finer scale), the
    nodes, and the concatenation of the nodes. Subclasses define the edges."""

    def __init__(self, spec: CellSpec, in0: tuple[int, int], in1: tuple[int, int], nodes: int, affine: bool):
        super().__init__()
        self.spec = spec
        self.nodes = nodes
        (c0, level0), (c1, level1) = in0, in1
        if level0 > level1 or level1 - level0 > 1:
            raise ValueError(f"cell inputs at levels {level0}, {level1}: s0 must be at s1's scale or one finer")
        self.pre0 = FactorizedReduce(c0, spec.c, affine) if level0 < level1 else ReLUConvBN(c0, spec.c, 1, 1, 0, affine)
        self.pre1 = ReLUConvBN(c1, spec.c, 1, 1, 0, affine)
        # zero-init per-channel scale of an inserted (residual) cell: the insertion preserves the function
        self.scale = nn.Parameter(torch.zeros(nodes * spec.c)) if spec.residual else None

    def _stride(self, source: int) -> int:
        return 2 if self.spec.reduction and source < 2 else 1

    def _node_shape(self, s1: torch.Tensor) -> tuple[int, ...]:
        n, c, h, w = s1.shape
        s = 2 if self.spec.reduction else 1
        return (n, c, (h + s - 1) // s, (w + s - 1) // s)

    @staticmethod
    def _sum(terms: list[torch.Tensor]) -> torch.Tensor:
        out = terms[0]
        for t in terms[1:]:
            out = out + t
        return out


class SearchCell(Cell):
    def __init__(self, spec, in0, in1, nodes, affine: bool = False, gated: bool = True):
        super().__init__(spec, in0, in1, nodes, affine)
        self.edges = nn.ModuleList(MixedOp(spec.c, self._stride(src), affine, gate=gated)
                                   for node in range(nodes) for src in range(2 + node))

    def forward(self, s0, s1, weights: CellWeights | None = None, dense: torch.Tensor | None = None):
        states = [self.pre0(s0), self.pre1(s1)]
        for node in range(self.nodes):
            terms = []
            for src in range(2 + node):
                e = edge_index(node, src)
                if dense is not None:
                    terms.append(self.edges[e].dense(states[src], dense[e]))
                    continue
                y = self.edges[e](states[src], weights.weights[e], weights.active[e], weights.unit)
                if y is not None:
                    terms.append(y)
            states.append(self._sum(terms) if terms else zeros_like_layout(states[1], self._node_shape(states[1])))
        return torch.cat(states[2:], dim=1)


def edge_key(pairs: list[tuple[str, int]], i: int) -> str:
    """The module name of genotype pair `i`: its supernet edge index, and when both pairs of its node read
    the same state (hand-written DARTS genotypes may), that index and the pair's place in the node."""
    node, src = i // 2, pairs[i][1]
    twin = pairs[i ^ 1][1] if (i ^ 1) < len(pairs) else None
    return str(edge_index(node, src)) if twin != src else f"{edge_index(node, src)}_{i % 2}"


class DerivedCell(Cell):
    """Only the genotype's ops, two per node; BatchNorms affine; optional drop-path on non-identity ops."""

    def __init__(self, spec, in0, in1, nodes, genotype: Genotype, affine: bool = True):
        super().__init__(spec, in0, in1, nodes, affine)
        pairs = getattr(genotype, spec.cell_type)
        if len(pairs) != 2 * nodes:
            raise ValueError(f"genotype has {len(pairs) // 2} nodes per cell, the network {nodes}")
        self.pairs = [(op, src) for op, src in pairs]
        self.keys = [edge_key(self.pairs, i) for i in range(len(self.pairs))]
        self.edges = nn.ModuleDict({key: make_op(op, spec.c, self._stride(src), affine)
                                    for key, (op, src) in zip(self.keys, self.pairs)})
        # drop path: on/off is a Python flag (set once, when the run uses it); the keep probability is a device
        # tensor the schedule writes into, so a compiled graph (a CUDA graph) is not re-recorded each epoch
        self.drop_path = False
        self.register_buffer("keep", torch.ones(()), persistent=False)

    def forward(self, s0, s1, weights=None, dense=None):
        states = [self.pre0(s0), self.pre1(s1)]
        for node in range(self.nodes):
            terms = []
            for key, (_, src) in zip(self.keys[2 * node: 2 * node + 2], self.pairs[2 * node: 2 * node + 2]):
                op = self.edges[key]
                y = op(states[src])
                if self.training and self.drop_path and not isinstance(op, Identity):
                    mask = torch.bernoulli(self.keep.to(y.dtype).expand(y.shape[0], 1, 1, 1))
                    y = y * mask / self.keep
                terms.append(y)
            states.append(self._sum(terms))
        return torch.cat(states[2:], dim=1)


class Network(nn.Module):
    """`genotype=None`: the supernet (every edge a MixedOp); otherwise the derived network."""

    def __init__(self, spec: NetSpec, genotype: Genotype | None = None):
        super().__init__()
        self.spec = spec
        self.genotype = genotype
        self.stem = nn.Sequential(
            nn.Conv2d(spec.in_channels, spec.stem_channels, 3, stride=spec.stem_stride, padding=1, bias=False),
            nn.BatchNorm2d(spec.stem_channels))
        shapes = spec.state_shapes()
        self.cells = nn.ModuleList(self.make_cell(c, shapes) for c in spec.cells)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(shapes[-1][0], spec.num_classes)

    @property
    def is_supernet(self) -> bool:
        return self.genotype is None

    def make_cell(self, c: CellSpec, shapes: list[tuple[int, int]]) -> Cell:
        in0, in1 = shapes[c.inputs[0]], shapes[c.inputs[1]]
        if self.genotype is None:
            return SearchCell(c, in0, in1, self.spec.nodes, gated=self.spec.gated)
        return DerivedCell(c, in0, in1, self.spec.nodes, self.genotype)

    def forward(self, x: torch.Tensor, sample: dict[str, CellWeights] | None = None,
                dense: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """x: (N, C_in, H, W) -> logits (N, classes). The supernet needs `sample` (from
        `Architecture.sample`) or `dense` ((E, K) weights per cell type, every op on every edge)."""
        states = [self.stem(x)]
        for cell in self.cells:
            spec = cell.spec
            kind = spec.cell_type
            y = cell(states[spec.inputs[0]], states[spec.inputs[1]],
                     None if sample is None else sample[kind], None if dense is None else dense[kind])
            if spec.residual:
                states[spec.output] = states[spec.output] + cell.scale.view(1, -1, 1, 1) * y
            else:
                states.append(y)
        return self.classifier(self.pool(grad_in_layout(states[-1])).flatten(1))

    def set_drop_path(self, prob: float) -> None:
        """Drop each non-identity op's output with probability `prob` in training (written into the cells'
        device tensors: no recompile when it changes)."""
        for cell in self.cells:
            if isinstance(cell, DerivedCell):
                cell.drop_path = True
                cell.keep.fill_(1.0 - prob)


def scale_spec(spec: NetSpec, channels: int) -> NetSpec:
    """`spec` with the first cell at `channels` and every other width (stem, later cells) scaled alike, kept
    even: a derived network trained wider than the supernet it was searched in (DARTS: search at C=16,
    train at C=36). Growth's inserted cells and the wiring stay as they are."""
    f = channels / spec.cells[0].c
    even = lambda c: max(2, 2 * round(c * f / 2))  # noqa: E731  (factorized reductions split channels in two)
    cells = [dataclasses.replace(c, c=even(c.c)) for c in spec.cells]
    return dataclasses.replace(spec, stem_channels=max(1, round(spec.stem_channels * f)), cells=cells)


def same_network(a: NetSpec, b: NetSpec) -> bool:
    """The same derived network (the supernet's gates are not part of it)."""
    return dataclasses.replace(a, gated=True) == dataclasses.replace(b, gated=True)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def derived_spec(spec: NetSpec, stem_stride: int | None = None, channels: int | None = None) -> NetSpec:
    """The derived network's spec: the supernet's, at another stem stride and width when asked."""
    if stem_stride is not None:
        spec = dataclasses.replace(spec, stem_stride=stem_stride)
    if channels is not None and channels != spec.cells[0].c:
        spec = scale_spec(spec, channels)
    return spec


def derive(supernet: Network, genotype: Genotype, transfer: bool = True, stem_stride: int | None = None,
           open_gates: bool = True, channels: int | None = None) -> Network:
    """Build the derived network of `genotype` on the supernet's (possibly grown) spec. With `transfer`,
    the stem, preprocessing, classifier and each chosen op start from the supernet's weights (non-affine
    search BatchNorms become affine ones with weight 1, bias 0: the same function). `stem_stride` trains
    the derived network at another resolution than the search ran at; every weight keeps its shape.
    `open_gates` resets the output scales of gated ops to 1 (see `_open_gates`); without it the derived
    network computes exactly what the supernet computes at the genotype. `channels` (fresh init only) trains
    the derived network at another width (`scale_spec`)."""
    spec = derived_spec(supernet.spec, stem_stride, channels)
    if transfer and spec.cells[0].c != supernet.spec.cells[0].c:
        raise ValueError("a derived network of another width than the supernet cannot take its weights")
    net = Network(spec, genotype).to(next(supernet.parameters()).device)
    if not transfer:
        return net
    source = supernet.state_dict()
    target = net.state_dict()
    for name in target:
        parts = name.split(".")
        if parts[0] == "cells" and parts[2] == "edges":  # cells.i.edges.<key>.<op> <- cells.i.edges.e.ops.k.<op>
            cell = net.cells[int(parts[1])]
            pair = cell.keys.index(parts[3])
            op, state = cell.pairs[pair]
            src = ".".join(parts[:3] + [str(edge_index(pair // 2, state)), "ops", str(PRIMITIVES.index(op))]
                           + parts[4:])
        else:
            src = name
        if src in source and source[src].shape == target[name].shape:
            target[name] = source[src].clone()
    net.load_state_dict(target)
    if open_gates:
        _open_gates(net)
    return net


def _open_gates(net: Network) -> None:
    """The supernet starts every op warmup did not train with its final BatchNorm scale at 0 and opens it as
    the op learns (ops.gate_output); how far it opened is a search-time artifact. The derived network starts
    those scales at 1, as a fresh affine BatchNorm would (measured after 1 epoch on Fashion-MNIST: 88.5% test
    accuracy, against 83.0% keeping the scales and 86.9% from fresh weights)."""
    from .ops import final_batchnorm
    with torch.no_grad():
        for cell in net.cells:
            for (op_name, _), op in zip(cell.pairs, (cell.edges[k] for k in cell.keys)):
                bn = final_batchnorm(op)
                if op_name != "skip_connect" and bn is not None and bn.affine:
                    bn.weight.fill_(1.0)


__all__ = ["CELL_TYPES", "Cell", "CellSpec", "DerivedCell", "NetSpec", "Network", "SearchCell",
           "count_parameters", "darts_spec", "derive", "derived_spec", "edge_key", "scale_spec"]
