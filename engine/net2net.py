"""Net2Net transforms: function-preserving deeper and wider supernets, and optimizer state carried across.

    grow_depth(net, position)   insert a residual normal cell: s[o] <- s[o] + scale * cell(s[a], s[b]) with
                                scale = 0, so the network computes exactly what it did; the cell then learns
    grow_width(net, factor)     every cell's C -> about factor * C (Net2WiderNet): new channels replicate old
                                ones, consumers divide their weights by the replication count, BatchNorm
                                statistics and affine parameters and depthwise filters are copied

Channel maps are block-wise over the two halves of C (`widen_map`): FactorizedReduce builds its output from
two half-width convs, and every producer feeding a cell's nodes shares one map, so the halves must stay
halves. Width growth builds a new network and returns, for every old parameter, its new tensor and the
transform that produced it: `transfer_optimizer_state` applies the same transforms to momentum buffers.
The growth event around these (policy, preservation check, recompilation) is engine/growth.py.
"""
from __future__ import annotations

import copy
import dataclasses
import math

import torch
from torch import nn

from .network import CellSpec, Network
from .ops import DilConv, FactorizedReduce, Identity, PoolBN, ReLUConvBN, SepConv, Zero


# -------------------------------------------------------------------------------------------- depth
def stage_positions(spec) -> list[int]:
    """Candidate insertion positions: the end of each stage (before each reduction cell, and the end)."""
    positions = [i for i, c in enumerate(spec.cells) if c.reduction and i > 0] + [len(spec.cells)]
    return sorted(set(positions))


def choose_depth_position(spec) -> int:
    """The end of the stage with the fewest cells (the deepest such stage on ties)."""
    bounds = [0] + [i for i, c in enumerate(spec.cells) if c.reduction] + [len(spec.cells)]
    stages = []
    for lo, hi in zip(bounds, bounds[1:]):
        if hi > lo:
            stages.append((hi - lo, -hi, hi))
    return min(stages)[2]


def grow_depth(net: Network, position: int) -> Network:
    """Insert a residual normal cell before cell `position` (0 < position <= len(cells)), in place."""
    spec = net.spec
    if not 0 < position <= len(spec.cells):
        raise ValueError(f"position must be in 1..{len(spec.cells)}, got {position}")
    prev = cur = 0
    for c in spec.cells[:position]:
        if not c.residual:
            prev, cur = cur, c.output
    shapes = spec.state_shapes()
    channels, _ = shapes[cur]
    new = CellSpec(channels // spec.nodes, False, (prev, cur), cur, residual=True)
    new_spec = dataclasses.replace(spec, cells=spec.cells[:position] + [new] + spec.cells[position:])
    new_spec.state_shapes()  # validates the wiring
    ref = next(net.parameters())
    cell = net.make_cell(new, shapes).to(ref.device, ref.dtype)
    if _is_channels_last(net):
        cell = cell.to(memory_format=torch.channels_last)
    net.cells.insert(position, cell)
    net.spec = new_spec
    return net


def _is_channels_last(net: Network) -> bool:
    w = net.stem[0].weight
    return w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()


# -------------------------------------------------------------------------------------------- width
def widen_map(c_old: int, c_new: int) -> torch.Tensor:
    """New channel -> old channel, block-wise over the halves: old channels keep their place in their half,
    new ones replicate the half's channels round-robin."""
    h_old, h_new = c_old // 2, c_new // 2
    half = torch.tensor([j if j < h_old else (j - h_old) % h_old for j in range(h_new)])
    return torch.cat([half, half + h_old])


def _counts(mapping: torch.Tensor, size: int) -> torch.Tensor:
    return torch.bincount(mapping, minlength=size).to(torch.float32)


@dataclasses.dataclass
class _Map:
    """A channel map for a tensor dimension: new index -> old index, and replication counts of old ones."""
    index: torch.Tensor
    counts: torch.Tensor

    @classmethod
    def of(cls, index: torch.Tensor, old_size: int) -> "_Map":
        return cls(index, _counts(index, old_size))

    @classmethod
    def identity(cls, size: int) -> "_Map":
        return cls.of(torch.arange(size), size)


class _Plan:
    """Pairs (old tensor, new tensor, transform); `apply` fills the new network and yields the transforms."""

    def __init__(self):
        self.items: list[tuple[torch.Tensor, torch.Tensor, callable]] = []

    def add(self, old: torch.Tensor, new: torch.Tensor, fn) -> None:
        self.items.append((old, new, fn))

    def conv(self, old: nn.Conv2d, new: nn.Conv2d, in_map: _Map, out_map: _Map) -> None:
        """Dense conv: outputs replicated, inputs divided by their replication count."""
        i = in_map.index.to(old.weight.device)
        o = out_map.index.to(old.weight.device)
        div = in_map.counts.to(old.weight.device)[i].view(1, -1, 1, 1)
        self.add(old.weight, new.weight, lambda t: t[o][:, i] / div.to(t.dtype))

    def depthwise(self, old: nn.Conv2d, new: nn.Conv2d, m: _Map) -> None:
        idx = m.index.to(old.weight.device)
        self.add(old.weight, new.weight, lambda t: t[idx])

    def bn(self, old: nn.BatchNorm2d, new: nn.BatchNorm2d, m: _Map) -> None:
        idx = m.index.to(old.running_mean.device)
        for name in ("running_mean", "running_var"):
            self.add(getattr(old, name), getattr(new, name), lambda t: t[idx])
        self.add(old.num_batches_tracked, new.num_batches_tracked, lambda t: t.clone())
        if old.affine:
            self.add(old.weight, new.weight, lambda t: t[idx])
            self.add(old.bias, new.bias, lambda t: t[idx])

    def vector(self, old: torch.Tensor, new: torch.Tensor, m: _Map) -> None:
        idx = m.index.to(old.device)
        self.add(old, new, lambda t: t[idx])

    def linear_in(self, old: nn.Linear, new: nn.Linear, m: _Map) -> None:
        i = m.index.to(old.weight.device)
        div = m.counts.to(old.weight.device)[i].view(1, -1)
        self.add(old.weight, new.weight, lambda t: t[:, i] / div.to(t.dtype))
        self.add(old.bias, new.bias, lambda t: t.clone())

    def same(self, old: nn.Module, new: nn.Module) -> None:
        for (_, a), (_, b) in zip(old.state_dict(keep_vars=True).items(), new.state_dict(keep_vars=True).items()):
            self.add(a, b, lambda t: t.clone())

    def apply(self) -> None:
        with torch.no_grad():
            for old, new, fn in self.items:
                value = fn(old.detach())
                if value.shape != new.shape:
                    raise RuntimeError(f"width transform produced {tuple(value.shape)} for {tuple(new.shape)}")
                new.copy_(value)


def _op(plan: _Plan, old: nn.Module, new: nn.Module, in_map: _Map, g: _Map) -> None:
    """One op (or preprocessing) mapping `in_map` channels to the cell's C (map g)."""
    if isinstance(old, (Zero, Identity)):
        return
    if isinstance(old, ReLUConvBN):
        plan.conv(old[1], new[1], in_map, g)
        plan.bn(old[2], new[2], g)
    elif isinstance(old, FactorizedReduce):
        half_new, half_old = len(g.index) // 2, len(g.counts) // 2
        first = _Map.of(g.index[:half_new], half_old)
        second = _Map.of(g.index[half_new:] - half_old, half_old)
        plan.conv(old.conv_1, new.conv_1, in_map, first)
        plan.conv(old.conv_2, new.conv_2, in_map, second)
        plan.bn(old.bn, new.bn, g)
    elif isinstance(old, SepConv):
        _op(plan, old[0], new[0], in_map, g)
        _op(plan, old[1], new[1], g, g)
    elif isinstance(old, DilConv):
        plan.depthwise(old[1], new[1], in_map)
        plan.conv(old[2], new[2], in_map, g)
        plan.bn(old[3], new[3], g)
    elif isinstance(old, PoolBN):
        plan.bn(old[1], new[1], g)
    else:
        raise TypeError(f"grow_width does not know how to widen {type(old).__name__}")


def grow_width(net: Network, factor: float) -> tuple[Network, list]:
    """A new network with every cell's C widened by `factor` (rounded to even), computing what `net` does.
    Returns (network, transforms): transforms = [(old tensor, new tensor, fn)] for optimizer state."""
    if not net.is_supernet:
        raise ValueError("grow_width widens the supernet (growth happens during search)")
    spec = net.spec
    new_cells, maps, state_maps = [], [], [_Map.identity(spec.stem_channels)]
    for c in spec.cells:
        c_new = max(c.c + 2, 2 * math.ceil(c.c * factor / 2))
        if c.residual:  # writes into an existing state: it must use that state's channel layout
            owner = next(i for i, o in enumerate(spec.cells) if not o.residual and o.output == c.output)
            c_new, g = new_cells[owner].c, maps[owner]
        else:
            g = _Map.of(widen_map(c.c, c_new), c.c)
        new_cells.append(dataclasses.replace(c, c=c_new))
        maps.append(g)
        if not c.residual:
            blocks = torch.cat([b * c.c + g.index for b in range(spec.nodes)])
            state_maps.append(_Map.of(blocks, spec.nodes * c.c))
    new_spec = dataclasses.replace(spec, cells=new_cells)
    ref = next(net.parameters())
    wide = Network(new_spec, net.genotype).to(ref.device, ref.dtype)
    if _is_channels_last(net):
        wide = wide.to(memory_format=torch.channels_last)
    plan = _Plan()
    plan.same(net.stem, wide.stem)
    for old, new, c, g in zip(net.cells, wide.cells, spec.cells, maps):
        a, b = c.inputs
        _op(plan, old.pre0, new.pre0, state_maps[a], g)
        _op(plan, old.pre1, new.pre1, state_maps[b], g)
        for old_edge, new_edge in zip(old.edges, new.edges):
            for old_op, new_op in zip(old_edge.ops, new_edge.ops):
                _op(plan, old_op, new_op, g, g)
        if c.residual:
            plan.vector(old.scale, new.scale, state_maps[c.output])
    plan.linear_in(net.classifier, wide.classifier, state_maps[-1])
    plan.apply()
    return wide, plan.items


def transfer_optimizer_state(old_opt: torch.optim.Optimizer, new_opt: torch.optim.Optimizer,
                             transforms: list | None = None) -> None:
    """Carry optimizer state to the new parameters: the same tensor keeps its state, a widened one gets its
    state through the weight's transform (momentum replicated and divided alongside), a new one starts
    empty. Per-group step counts and hyperparameters carry over, so the schedule continues."""
    by_new = {id(new): (old, fn) for old, new, fn in (transforms or [])}
    for group in new_opt.param_groups:
        for p in group["params"]:
            old, fn = by_new.get(id(p), (p, None))
            state = old_opt.state.get(old)
            if not state:
                continue
            new_opt.state[p] = {k: (fn(v) if fn is not None and torch.is_tensor(v) and v.shape == old.shape else
                                    v.clone() if torch.is_tensor(v) else copy.deepcopy(v))
                                for k, v in state.items()}
