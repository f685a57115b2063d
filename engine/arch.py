"""Architecture manager: the logits, how each phase turns them into edge weights, the temperature and the
statistics.

One logits tensor (edges, ops) per cell type ("normal", "reduce"), shared by every cell of that type.
Per phase (`sample`):
    warmup            one-hot skip_connect, constant: no gradient reaches the logits
    search / growth   Gumbel-softmax at temperature tau; hard (straight-through: value one-hot, gradient
                      of the soft sample) by default, soft on request
    argmax            every edge at its most likely op, constant: the architecture the search currently
                      believes in (the val metric during search)
    derive            the genotype's edges, one-hot, constant: the DARTS derivation (two edges per node,
                      skip cap) of the final network
A step asks for weights once; the op indices each edge must execute reach the host here, in one transfer, so
the mixed ops never synchronize per edge. The loop draws a search iteration's samples ahead (`prefetch`: the
next weight step's and, when one follows, the architecture step's, both cell types, in one small tensor)
and copies their routing to pinned host memory without blocking, behind an event: one host read per search
iteration, taken when the weight step needs it. `sample` takes the next drawn sample (drawing one itself
when none is waiting), so both paths consume the Gumbel generator in the same order.

The derivation rule itself (two edges per node, the caps) is engine/genotype.py's; `genotype()` and the
`derive` phase call it.
"""
from __future__ import annotations

import collections
import math
from dataclasses import dataclass

import torch
from torch import nn

from .errors import ConfigError
from .genotype import CELL_TYPES, NONE, SKIP, Genotype, edge_index, num_edges
from .ops import PRIMITIVES

PHASES = ("warmup", "search", "growth", "optimize")


@dataclass
class CellWeights:
    """What one cell type executes in one step."""
    weights: torch.Tensor                 # (E, K): multiplies the executed outputs; may carry grad to logits
    active: list[tuple[int, ...]]         # per edge, the op indices to execute (empty: the edge adds nothing)
    unit: bool = False                    # exact one-hot and constant: outputs need no multiply


@dataclass
class _Drawn:
    """One step's sample, drawn ahead: its weights on the device and where its routing sits in the transfer."""
    phase: str
    grad: bool
    weights: dict[str, torch.Tensor]     # cell type -> (E, K)
    transfer: "_Transfer"
    rows: int                            # first row of this sample in the transfer (normal, then reduce)


class _Transfer:
    """The routing of one prefetch on its way to the host: indices (hard) or soft weights, (2 * steps, E) or
    (2 * steps, E, K), copied non-blocking into pinned memory behind an event on CUDA. `rows()` is the one host
    read: it waits for the event (long passed when the host gets there) and reads the copy once."""

    def __init__(self, routing: torch.Tensor):
        if routing.is_cuda:
            self.host = torch.empty(routing.shape, dtype=routing.dtype, pin_memory=True)
            self.host.copy_(routing, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host, self.event = routing, None
        self._rows = None

    def rows(self) -> list:
        if self._rows is None:
            if self.event is not None:
                self.event.synchronize()
            self._rows = self.host.tolist()   # the transfer's one host read
        return self._rows


class ArchState:
    """Counters a run logs: non-finite fallbacks and repaired logit rows (device tensors, so counting never
    makes the host wait; reading them is a host read, done at epoch ends), the op-selection histogram of
    the sampled ops (host lists, filled from the indices the host reads anyway to route the step), and the
    architecture gradient's running sums per logit (`add_gradients`, `drift`)."""

    def __init__(self, edges: int):
        self.counts = torch.zeros(2, dtype=torch.int64)   # nan_events, repaired_rows
        self.histogram: dict[str, list[int]] = {t: [0] * len(PRIMITIVES) for t in CELL_TYPES}
        # per cell type, edge and op, the logits' gradients summed over every applied architecture step, and per
        # edge their sum of outer products (ops x ops): the drift of any contrast between two ops follows
        # (`drift`). float64: thousands of small terms
        k = len(PRIMITIVES)
        self.grad_sum = torch.zeros(len(CELL_TYPES), edges, k, dtype=torch.float64)
        self.grad_outer = torch.zeros(len(CELL_TYPES), edges, k, k, dtype=torch.float64)
        self.grad_steps = torch.zeros((), dtype=torch.int64)

    def to(self, device) -> "ArchState":
        self.counts = self.counts.to(device)
        self.grad_sum, self.grad_outer = self.grad_sum.to(device), self.grad_outer.to(device)
        self.grad_steps = self.grad_steps.to(device)
        return self

    def add_gradients(self, grads: list[torch.Tensor], ok: torch.Tensor) -> None:
        """Count one architecture step's logit gradients (one per cell type, CELL_TYPES' order; the cost term's
        included where the search has one, averaged over the ranks in data-parallel runs) where `ok` (a device
        bool: the step was applied); on the device, no host read."""
        g = torch.where(ok, torch.stack([x.detach() for x in grads]).to(self.grad_sum.dtype), 0.0)
        self.grad_sum += g
        self.grad_outer += g.unsqueeze(-1) * g.unsqueeze(-2)
        self.grad_steps += ok.to(self.grad_steps.dtype)

    def gradient_sums(self) -> dict:
        """The gradient sums as a checkpoint keeps them (host tensors and an int: one host read)."""
        return {"grad_sum": self.grad_sum.cpu(), "grad_outer": self.grad_outer.cpu(), "grad_steps": int(self.grad_steps)}

    def load_gradient_sums(self, saved: dict) -> None:
        """Put back what `gradient_sums` gave (a checkpoint's `arch_counters`); raises RuntimeError, TypeError or
        KeyError where the saved sums are damaged or of another shape."""
        self.grad_sum.copy_(saved["grad_sum"])
        self.grad_outer.copy_(saved["grad_outer"])
        self.grad_steps.fill_(saved["grad_steps"])

    def drift(self, against: torch.Tensor | None = None) -> torch.Tensor:
        """Per cell type, edge and op: how consistently the architecture steps pushed the logit up,
        z = -sum(g) / sqrt(sum(g^2)) (0 where no gradient arrived); with `against` (op indices, cell type x
        edge), the same for the logit's difference from that op's, g_op - g_against: how consistently the data
        pushed one op above the other. When the steps' gradients are independent noise of mean 0, z is about
        N(0, 1) however many steps ran; a steady push of signal-to-noise ratio r per step gives about
        r * sqrt(steps). With Adam, which scales each step by the gradient's running rms, a logit moved about
        arch_lr * sqrt(steps) * z: |z| <= 2 is a move a random walk makes. Steps with larger gradients (a
        lower Gumbel temperature) weigh more."""
        s, q = self.grad_sum, self.grad_outer
        var = q.diagonal(dim1=-2, dim2=-1)
        if against is not None:
            b = against.to(s.device).long()
            s_b = s.gather(-1, b.unsqueeze(-1))
            q_bb = var.gather(-1, b.unsqueeze(-1))
            q_ab = q.gather(-1, b[..., None, None].expand(*b.shape, q.shape[-2], 1)).squeeze(-1)
            s, var = s - s_b, var + q_bb - 2 * q_ab
        return torch.where(var > 1e-30, -s / var.clamp_min(1e-30).sqrt(), torch.zeros_like(s))

    @property
    def nan_events(self) -> int:
        return int(self.counts[0])

    @nan_events.setter
    def nan_events(self, value: int) -> None:
        self.counts[0] = value

    @property
    def repaired_rows(self) -> int:
        return int(self.counts[1])

    @repaired_rows.setter
    def repaired_rows(self, value: int) -> None:
        self.counts[1] = value


class Architecture(nn.Module):
    def __init__(self, nodes: int = 4, *, init_std: float = 0.5, none_init: float = -2.0, skip_init: float = 1.0,
                 hard: bool = True, skip_threshold: float = 0.0, dominant_threshold: float = 1.0,
                 keep_threshold: float = 1.0, max_skip: int | None = None, max_skip_reduce: int | None = None,
                 max_param_free: int | None = None, max_param_free_reduce: int | None = None,
                 prior: dict[str, dict[int, float]] | None = None, seed: int = 0):
        super().__init__()
        self.nodes = nodes
        self.edges = num_edges(nodes)
        self.init_std, self.none_init, self.skip_init = init_std, none_init, skip_init
        self.prior = prior or {}  # cell type -> {op index: added to that op's initial logit} (parse_logit_prior)
        self.hard = hard
        self.max_skip = max_skip  # cap on skip_connect in the derived normal cell (None: no cap)
        self.max_skip_reduce = max_skip_reduce  # ... and in the derived reduction cell
        self.max_param_free = max_param_free  # cap on parameter-free ops (pools, skip) in the derived normal cell
        self.max_param_free_reduce = max_param_free_reduce  # ... and in the derived reduction cell
        self.skip_threshold, self.dominant_threshold, self.keep_threshold = skip_threshold, dominant_threshold, keep_threshold
        g = torch.Generator().manual_seed(seed)
        self.logits = nn.ParameterDict({t: nn.Parameter(self._init_logits(t, g)) for t in CELL_TYPES})
        self.tau = 1.0
        self.skip_bias = 0.0
        self.state = ArchState(self.edges)
        self._warmup: CellWeights | None = None
        self._drawn: collections.deque[_Drawn] = collections.deque()   # samples prefetched for the next steps

    def _apply(self, fn, recurse=True):
        """`.to(device)` moves the counters with the logits (and drops samples drawn on the old device)."""
        out = super()._apply(fn, recurse)
        self.state.counts = fn(self.state.counts)
        device = self.logits[CELL_TYPES[0]].device  # the sums stay float64 whatever dtype the logits take
        self.state.grad_sum = self.state.grad_sum.to(device)
        self.state.grad_outer = self.state.grad_outer.to(device)
        self.state.grad_steps = self.state.grad_steps.to(device)
        self._warmup = None
        self._drawn.clear()
        return out

    def _init_logits(self, cell_type: str, generator: torch.Generator | None = None) -> torch.Tensor:
        """N(0, init_std) on the cell type's prior row, with `none` pushed down and `skip_connect` up free of
        noise, so `none` cannot dominate the start."""
        x = torch.randn(self.edges, len(PRIMITIVES), generator=generator) * self.init_std
        x[:, [NONE, SKIP]] = 0.0
        return x + self._prior_row(cell_type, x)

    # ------------------------------------------------------------------------------------------ weights
    def sample(self, phase: str, *, grad: bool = False, generator: torch.Generator | None = None) -> dict[str, CellWeights]:
        """Edge weights for one step. `grad=True` (architecture steps) keeps the graph to the logits.
        Search and growth samples read the ops to route on the host in one transfer for both cell types;
        warmup weights are a cached constant (no read)."""
        if phase == "warmup":
            if self._warmup is None:
                index = torch.full((self.edges,), SKIP, device=self.logits["normal"].device)
                self._warmup = self._one_hot_index(index, [(SKIP,)] * self.edges)
            return dict.fromkeys(CELL_TYPES, self._warmup)
        if phase == "derive":
            return self.derived_weights()
        if phase == "argmax":
            index = torch.stack([self.logits[t].detach().argmax(1) for t in CELL_TYPES])
            rows = index.tolist()                                      # one host read
            return {t: self._one_hot_index(index[i], [() if k == NONE else (k,) for k in rows[i]])
                    for i, t in enumerate(CELL_TYPES)}
        if phase not in ("search", "growth"):
            raise ValueError(f"no supernet weights for phase {phase!r}")
        if not self._drawn:
            self.prefetch(phase, [(grad, self.tau, self.skip_bias)], generator)
        d = self._drawn.popleft()
        if (d.phase, d.grad) != (phase, grad):
            raise RuntimeError(f"a sample drawn for a {d.phase} {'architecture' if d.grad else 'weight'} step was "
                               f"asked for by a {phase} {'architecture' if grad else 'weight'} step")
        rows = d.transfer.rows()[d.rows:d.rows + len(CELL_TYPES)]
        if not self.hard:  # soft: the transferred weights decide the skipping
            return {t: CellWeights(d.weights[t], self._thresholded(r)) for t, r in zip(CELL_TYPES, rows)}
        out = {}
        for t, idx in zip(CELL_TYPES, rows):
            hist = self.state.histogram[t]
            for k in idx:
                hist[k] += 1
            out[t] = CellWeights(d.weights[t], [() if k == NONE else (k,) for k in idx], unit=not grad)
        return out

    def prefetch(self, phase: str, plans: list[tuple[bool, float, float]],
                 generator: torch.Generator | None = None) -> None:
        """Draw the samples of the next steps now, in the order the steps will ask for them: `plans` holds per
        step (grad, tau, skip_bias). Their routing (both cell types of every step) goes to the host in one
        non-blocking transfer; the steps' `sample` calls take them in order. The logits must not change
        before the last of them is taken (weight steps do not touch them)."""
        drawn = [(grad, {t: self._gumbel(t, grad, generator, tau, bias) for t in CELL_TYPES})
                 for grad, tau, bias in plans]
        routing = torch.stack([d[t][1] if self.hard else d[t][0].detach() for _, d in drawn for t in CELL_TYPES])
        transfer = _Transfer(routing)
        for i, (grad, d) in enumerate(drawn):
            self._drawn.append(_Drawn(phase, grad, {t: d[t][0] for t in CELL_TYPES}, transfer, len(CELL_TYPES) * i))

    @property
    def pending(self) -> int:
        """Samples drawn ahead and not yet taken (none may be left at a checkpoint: the generator's state
        saved there would be past them)."""
        return len(self._drawn)

    def _one_hot_index(self, index: torch.Tensor, active: list[tuple[int, ...]]) -> CellWeights:
        """One-hot weights from a device index (E,), built on the device; `active` the host's copy of it."""
        logits = self.logits["normal"]
        w = torch.zeros(self.edges, len(PRIMITIVES), device=logits.device, dtype=logits.dtype)
        return CellWeights(w.scatter_(1, index.to(w.device)[:, None], 1.0), active, unit=True)

    def _one_hot(self, choice: list[int | None], cell_type: str) -> CellWeights:
        """One-hot weights from a host list (None: the edge is not in the cell, all-zero row)."""
        logits = self.logits[cell_type]
        w = torch.zeros(self.edges, len(PRIMITIVES), dtype=logits.dtype)
        for e, k in enumerate(choice):
            if k is not None:
                w[e, k] = 1.0
        active = [() if k is None or k == NONE else (k,) for k in choice]
        return CellWeights(w.to(logits.device), active, unit=True)

    def _gumbel(self, cell_type: str, grad: bool, generator: torch.Generator | None, tau: float, skip_bias: float):
        """(weights, hard index or None) on the device at temperature `tau` with `skip_bias` on skip_connect's
        logit; no host read."""
        logits = self.logits[cell_type]
        if not grad:
            logits = logits.detach()
        # Non-finite rows fall back to skip_connect. Sanitize *before* the softmax: a where() after it would
        # still send 0 * NaN = NaN back through the softmax's Jacobian.
        finite = torch.isfinite(logits).all(dim=1, keepdim=True)                       # (E, 1)
        safe = torch.where(finite, logits, torch.zeros_like(logits))
        if skip_bias:
            safe = safe + self._skip_bias_row(safe, skip_bias)
        # Gumbel(0, 1) = -log(Exp(1)); clamping keeps log away from 0 (and exponential_ can return 0 on CUDA).
        u = torch.empty_like(safe).exponential_(generator=generator).clamp_(min=torch.finfo(safe.dtype).tiny)
        soft = torch.softmax((safe - u.log()) / tau, dim=1)
        bad = ~finite | ~torch.isfinite(soft).all(dim=1, keepdim=True)
        skip_row = torch.zeros_like(soft)
        skip_row[:, SKIP] = 1.0
        soft = torch.where(bad, skip_row, soft)
        self.state.counts[0] += bad.sum()
        if not self.hard:
            return soft, None
        index = soft.argmax(dim=1)
        hard = torch.zeros_like(soft).scatter_(1, index[:, None], 1.0)
        w = hard - soft.detach() + soft if grad else hard   # straight-through: value one-hot, grad of soft
        return w, index

    @staticmethod
    def _skip_bias_row(like, bias: float):
        row = torch.zeros_like(like[:1])
        row[0, SKIP] = bias
        return row

    def _thresholded(self, rows: list[list[float]]) -> list[tuple[int, ...]]:
        """Dominant-op skipping, on the host's copy of the soft weights: drop ops below skip_threshold; if the
        top weight reaches dominant_threshold, run only it plus ops above keep_threshold. `none` never runs
        (its output is 0)."""
        active = []
        for row in rows:
            top = max(range(len(row)), key=row.__getitem__)
            if row[top] >= self.dominant_threshold:
                ks = [k for k, v in enumerate(row) if k == top or v > self.keep_threshold]
            else:
                ks = [k for k, v in enumerate(row) if v > self.skip_threshold]
            active.append(tuple(k for k in ks if k != NONE))
        return active

    def derived_weights(self) -> dict[str, CellWeights]:
        return self.genotype_weights(self.genotype())

    def genotype_weights(self, geno: Genotype) -> dict[str, CellWeights]:
        """One-hot edge weights that fix the supernet to `geno` (any genotype of this cell space: the derived
        one, or one whose shared-weight accuracy a ranking asks for)."""
        out = {}
        for t in CELL_TYPES:
            choice: list[int | None] = [None] * self.edges
            for node in range(self.nodes):
                for op, src in getattr(geno, t)[2 * node: 2 * node + 2]:
                    choice[edge_index(node, src)] = PRIMITIVES.index(op)
            out[t] = self._one_hot(choice, t)
        return out

    # ------------------------------------------------------------------------------------------ upkeep
    @torch.no_grad()
    def repair_(self) -> None:
        """Reset non-finite logit rows to the init prior (after an architecture step), counted; on the device,
        no host read: a step with non-finite gradients is skipped, so this is belt and braces."""
        for t in CELL_TYPES:
            p = self.logits[t]
            bad = ~torch.isfinite(p).all(dim=1, keepdim=True)
            p.copy_(torch.where(bad, self._prior_row(t, p), p))
            self.state.counts[1] += bad.sum()

    def _prior_row(self, cell_type: str, like: torch.Tensor) -> torch.Tensor:
        """(1, K) on `like`'s device (no copy from the host): what the cell type's logits start from before the
        noise, and a repaired row from: `none` and `skip_connect` at their init values, the other ops at 0, plus
        the cell type's `prior`."""
        row = torch.zeros_like(like[:1])
        row[0, NONE], row[0, SKIP] = self.none_init, self.skip_init
        for k, v in self.prior.get(cell_type, {}).items():
            row[0, k] += v
        return row

    def probabilities(self, cell_type: str) -> torch.Tensor:
        """softmax(logits) per edge (no noise, no temperature): the expected architecture."""
        return torch.softmax(self.logits[cell_type].detach().float(), dim=1)

    def statistics(self) -> dict:
        """Per-edge entropy and max weight, mean entropy, op-selection histogram (sampled ops), the logits'
        drift z (ArchState.drift) over the architecture steps so far: one host read."""
        probs = [self.probabilities(t) for t in CELL_TYPES]
        ents = [-(p * p.clamp_min(1e-12).log()).sum(1) for p in probs]
        mean = torch.cat(ents).mean()
        drift = self.state.drift()
        values = torch.cat([*ents, *(p.max(1).values for p in probs), mean[None],
                            self.state.counts.to(mean.dtype), self.state.grad_steps[None].to(mean.dtype),
                            drift.flatten().to(mean.dtype)]).tolist()
        e, k = self.edges, len(PRIMITIVES)
        out = {"tau": self.tau, "nan_events": int(values[4 * e + 1]), "repaired_rows": int(values[4 * e + 2]),
               "arch_grad_steps": int(values[4 * e + 3])}
        z = values[4 * e + 4:]
        for i, t in enumerate(CELL_TYPES):
            out[f"{t}_entropy"] = [round(v, 4) for v in values[i * e:(i + 1) * e]]
            out[f"{t}_max_weight"] = [round(v, 4) for v in values[(2 + i) * e:(3 + i) * e]]
            out[f"{t}_histogram"] = dict(zip(PRIMITIVES, self.state.histogram[t]))
            out[f"{t}_drift"] = [[round(v, 2) for v in z[(i * e + j) * k:(i * e + j + 1) * k]] for j in range(e)]
        out["mean_entropy"] = values[4 * e]
        return out

    def genotype(self) -> "Genotype":
        """The derived genotype: one host read (both cell types' probabilities), derived on the host."""
        rows = torch.stack([self.probabilities(t) for t in CELL_TYPES]).tolist()
        return Genotype.from_probabilities(dict(zip(CELL_TYPES, rows)), self.nodes, self.max_skip,
                                           self.max_skip_reduce, self.max_param_free, self.max_param_free_reduce)


def parse_logit_prior(text: str) -> dict[str, dict[int, float]]:
    """`logit_prior` as the config spells it, "reduce:max_pool_3x3=2,sep_conv_5x5=-1" (a cell type, normal, reduce
    or both, then op=value pairs; "normal:...;reduce:..." for both types; no cell type: both), as the
    Architecture takes it: cell type -> {op index: value added to that op's initial logit on every edge}."""
    out: dict[str, dict[int, float]] = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        cells, _, pairs = part.rpartition(":")
        types = CELL_TYPES if cells.strip() in ("", "both") else (cells.strip(),)
        if types[0] not in CELL_TYPES:
            raise ConfigError(f"logit_prior {part!r}: unknown cell type {cells.strip()!r}; choose normal, reduce "
                              "or both, e.g. reduce:max_pool_3x3=2")
        for pair in filter(None, (q.strip() for q in pairs.split(","))):
            op, eq, value = pair.partition("=")
            if op.strip() not in PRIMITIVES:
                raise ConfigError(f"logit_prior {pair!r}: unknown op {op.strip()!r}; choose one of "
                                  f"{', '.join(PRIMITIVES)}")
            try:
                v = float(value)
            except ValueError:
                raise ConfigError(f"logit_prior {pair!r}: expected op=number, e.g. max_pool_3x3=2") from None
            if not eq or not math.isfinite(v):
                raise ConfigError(f"logit_prior {pair!r}: expected op=number, e.g. max_pool_3x3=2")
            for t in types:
                out.setdefault(t, {})[PRIMITIVES.index(op.strip())] = v
    return out


# --------------------------------------------------------------------------------------- temperature
def temperature(step: int, total: int, tau_start: float, tau_end: float, kind: str = "exp") -> float:
    """Annealing from tau_start to tau_end over `total` units (architecture steps for "exp", epochs for
    "linear"); clamped at both ends."""
    if total <= 1:
        return tau_end if step >= 1 else tau_start
    frac = min(max(step / (total - 1), 0.0), 1.0)
    if kind == "exp":
        return tau_start * (tau_end / tau_start) ** frac
    if kind == "linear":
        return tau_start + (tau_end - tau_start) * frac
    raise ConfigError(f"tau_schedule must be 'exp' or 'linear', got {kind!r}")
