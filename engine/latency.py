"""Latency of every op on every edge, measured on the device the network will run on: a lookup table (FBNet,
Wu et al. 2019; ProxylessNAS, Cai et al. 2019), and its check against whole derived networks.

    aso-se latency --preset fashion-mnist [--device cpu|cuda] [--batch N] [--threads N] [--out FILE] [--check N]

The table has the shape of engine/cost.py's: `edges["latency"][cell_type][edge][op]`, the milliseconds op
`op` takes on edge `edge` summed over every cell of that type (each at its own channels, resolution and
stride), plus a fixed part (stem, each cell's input preprocessing, node sums, classifier). A genotype's
predicted latency is the fixed part plus its edges' entries; the expected latency of the search's edge
distributions is differentiable in the probabilities (`CostTable.expected`).

- Each op is timed alone, in eval mode without autograd, on the derived network's shapes and memory format
  (channels_last on the CPU, as the engine trains), warm (a few untimed calls first): the fastest of several
  rounds' medians, the rounds interleaved over all ops and networks (`steady_ms`: this host slows down in
  bursts). On CUDA each call is timed between synchronizations.
- The fixed part is not timed alone: it is calibrated on `probes` whole networks (random genotypes), as the
  median of their measured latency minus their edges' entries. It absorbs what a per-op sum misses (the
  cell's own additions and concatenation, the Python of the forward).
- `check` measures other whole networks and compares: Spearman's rho and the median relative error.

The file records the machine (engine/machine.py), the thread count, the batch and the network's spec, so a run
can refuse a table measured for another network.
"""
from __future__ import annotations

import json
import statistics
import time

import numpy as np
import torch

from .correlation import spearman
from .cost import CostTable, edge_inputs, empty_edges
from .errors import ConfigError
from .genotype import Genotype
from .machine import machine_info
from .network import NetSpec, Network, same_network
from .ops import PRIMITIVES, make_op

VERSION = 1


def median_ms(fn, device: torch.device, *, repeats: int = 7, min_seconds: float = 0.02) -> float:
    """Median wall time of `fn()` in ms over at least `repeats` calls and `min_seconds`."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    times, start = [], time.perf_counter()
    while len(times) < repeats or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def steady_ms(fns: dict, device: torch.device, rounds: int = 5, warmup: int = 3, progress=None) -> dict:
    """Per key, the fastest of `rounds` medians of `fns[key]()`, in ms. The rounds visit every key in turn, so
    each key's rounds lie seconds apart: a shared host slows down in bursts (measured on the 2-core CPU
    machine: the same network at 4.2 ms, then 7-8 ms for up to 2 s), and one burst cannot hold every round of
    a key; the fastest round is the key's steady latency, for the ops and the whole networks alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    best = {}
    for r in range(rounds):
        for key, fn in fns.items():
            t = median_ms(fn, device)
            best[key] = min(best.get(key, t), t)
        if progress is not None:
            progress(r + 1, rounds)
    return best


def _prepare(module: torch.nn.Module, device: torch.device, channels_last: bool) -> torch.nn.Module:
    module = module.to(device).eval()
    return module.to(memory_format=torch.channels_last) if channels_last else module


def _input(shape: tuple[int, ...], device: torch.device, channels_last: bool) -> torch.Tensor:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def forward_fn(module: torch.nn.Module, shape: tuple[int, ...], device: torch.device, channels_last: bool):
    """A call that runs `module` (eval mode, no autograd) on a fixed input of `shape`."""
    module = _prepare(module, device, channels_last)
    x = _input(shape, device, channels_last)

    def run():
        with torch.no_grad():
            module(x)
    return run


def network_fn(spec: NetSpec, genotype: Genotype, image_hw: tuple[int, int], batch: int, device: torch.device,
               channels_last: bool):
    """A call that runs the whole derived network of `genotype` on one batch."""
    return forward_fn(Network(spec, genotype), (batch, spec.in_channels, *image_hw), device, channels_last)


def latency_table(spec: NetSpec, image_hw: tuple[int, int], batch: int, device: torch.device | str = "cpu",
                  channels_last: bool | None = None, probes: int = 3, seed: int = 0, rounds: int = 5,
                  check_with: dict[str, Genotype] | None = None, progress=None) -> CostTable:
    """Time every op at every edge's input shape (ops at the same shape and stride timed once) and `probes`
    random whole networks, in `rounds` (`steady_ms`), and calibrate the fixed part on the probes. The networks
    of `check_with` are timed in the same rounds, and the table checked against them (`table.meta["check"]`):
    timed in later rounds of their own, they met the host at another speed (on 2026-12-05 every one of 24
    networks 4-12% slower than the table had it, the ranking intact). `progress(done, total)` is called after
    each round."""
    device = torch.device(device)
    channels_last = device.type == "cpu" if channels_last is None else channels_last
    edges = empty_edges(spec, ("latency",))
    shapes = sorted({(c, stride, size) for _, _, c, stride, size in edge_inputs(spec, image_hw)})
    ops = [op for op in PRIMITIVES if op != "none"]            # a derived network never holds `none`: 0 ms
    fns = {(op, c, stride, size): forward_fn(make_op(op, c, stride, affine=True), (batch, c, *size), device,
                                             channels_last)
           for c, stride, size in shapes for op in ops}
    rng = np.random.default_rng([seed, 101])
    probe_genotypes = [Genotype.random(rng, spec.nodes) for _ in range(probes)]
    for i, g in enumerate(probe_genotypes):
        fns[("probe", i)] = network_fn(spec, g, image_hw, batch, device, channels_last)
    for name, g in (check_with or {}).items():
        fns[("check", name)] = network_fn(spec, g, image_hw, batch, device, channels_last)
    timed = steady_ms(fns, device, rounds=rounds, progress=progress)
    for t, e, c, stride, size in edge_inputs(spec, image_hw):
        for o, op in enumerate(PRIMITIVES):
            if op != "none":
                edges["latency"][t][e][o] += timed[(op, c, stride, size)]
    table = CostTable(spec, image_hw, edges, {"latency": 0.0})
    residuals = [timed[("probe", i)] - table.of(g)["latency"] for i, g in enumerate(probe_genotypes)]
    table.fixed = {"latency": float(statistics.median(residuals))}
    table.meta = {"version": VERSION, "batch": batch, "device": str(device), "channels_last": channels_last,
                  "rounds": rounds, "probes": probes, "probe_residuals_ms": [round(r, 4) for r in residuals],
                  "ops_timed": len(shapes) * len(ops), "machine": machine_info()}
    if check_with:
        table.meta["check"] = check(table, check_with, {name: timed[("check", name)] for name in check_with})
    return table


def check_genotypes(rng: np.random.Generator, n: int, nodes: int) -> dict[str, Genotype]:
    """The networks a table is checked on (none of them a probe): n uniform random genotypes, the population
    a search is compared with, and n more across the cost range (a share of parameter-free edges from 0 to 1)."""
    out = {f"random{i}": Genotype.random(rng, nodes) for i in range(n)}
    for i, (share, g) in enumerate(zip(np.linspace(0.0, 1.0, n), Genotype.across_costs(rng, n, nodes))):
        out[f"free{round(100 * share):03d}-{i}"] = g
    return out


def agreement(predicted: np.ndarray, measured: np.ndarray) -> dict:
    errors = np.abs(predicted - measured) / measured
    return {"n": len(measured), "spearman": spearman(predicted, measured),
            "median_abs_rel_error": float(np.median(errors)), "max_abs_rel_error": float(errors.max())}


def check(table: CostTable, genotypes: dict[str, Genotype], timed: dict[str, float]) -> dict:
    """Predicted against measured whole-network latency: per network, and Spearman's rho and the median and
    largest relative error, over the uniform random networks, the others, and all. `timed`: the networks'
    latencies, measured in the same rounds as the table's ops (`latency_table(check_with=...)`)."""
    rows = []
    for name, g in genotypes.items():
        measured, predicted = timed[name], table.of(g)["latency"]
        rows.append({"name": name, "predicted_ms": round(predicted, 4), "measured_ms": round(measured, 4),
                     "rel_error": round((predicted - measured) / measured, 4), "genotype": g.to_json()})
    groups = {"uniform random": [r for r in rows if r["name"].startswith("random")],
              "across the cost range": [r for r in rows if not r["name"].startswith("random")], "all": rows}
    return {"networks": rows, **agreement(*_pm(rows)),
            "groups": {k: agreement(*_pm(v)) for k, v in groups.items() if len(v) > 1}}


def _pm(rows: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    return np.array([r["predicted_ms"] for r in rows]), np.array([r["measured_ms"] for r in rows])


def to_json(table: CostTable) -> dict:
    return {**table.meta, "spec": table.spec.to_json(), "image_hw": list(table.image_hw),
            "fixed_ms": table.fixed["latency"], "edges_ms": table.edges["latency"]}


def from_json(data: dict, source: str) -> CostTable:
    try:
        if data.get("version") != VERSION:
            raise ConfigError(f"{source}: latency table version {data.get('version')!r}, this engine reads "
                              f"version {VERSION}; measure it again with `aso-se latency`")
        spec = NetSpec.from_json(data["spec"])
        table = CostTable(spec, tuple(data["image_hw"]), {"latency": data["edges_ms"]},
                          {"latency": float(data["fixed_ms"])})
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"{source}: not a latency table written by `aso-se latency` ({e!r})") from None
    table.meta = {k: v for k, v in data.items() if k not in ("spec", "image_hw", "fixed_ms", "edges_ms")}
    return table


def load_table(path: str, spec: NetSpec | None = None, image_hw: tuple[int, int] | None = None) -> CostTable:
    """The table of `path`; with `spec` and `image_hw`, refused in one line unless it was measured for that
    network (the network a search derives, or the one a protocol trains)."""
    try:
        with open(path) as f:
            table = from_json(json.load(f), path)
    except OSError as e:
        raise ConfigError(f"latency_table {path}: cannot read it ({e.strerror}); write one with "
                          f"`aso-se latency --out {path}`") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"latency_table {path}: not valid JSON ({e.msg} at line {e.lineno}); write it again "
                          f"with `aso-se latency --out {path}`") from None
    if spec is not None and (not same_network(table.spec, spec) or tuple(table.image_hw) != tuple(image_hw)):
        raise ConfigError(f"latency_table {path}: measured for another network than this config derives (its spec "
                          f"or image size differ); measure this one with `aso-se latency` and the same --preset and "
                          f"--set options")
    return table
