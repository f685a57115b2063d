"""Growth: when the supernet grows (the policy), and one growth event as a transform.

    kind = plan_event(cfg, net, epoch, val_history, events)       None, "depth" or "width"
    grown = grow(net, opt, arch, probe, kind, width_factor=1.3)   Grown(net, opt, event), inputs untouched

An event deepens or widens the supernet with the Net2Net transforms of engine/net2net.py, checks on a probe
batch that the network computes what it did (eval mode, the current most likely architecture), and carries
the weight optimizer's state across. It either returns the grown network and optimizer with its event
record, or raises `TrainingError` and leaves its inputs as they were; adopting the result (new steps,
recompiling each graph once) is the phase loop's business.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass

import torch

from .arch import Architecture
from .compile import eager
from .config import Config
from .errors import TrainingError
from .net2net import (choose_depth_position, grow_depth, grow_width, stage_positions, transfer_optimizer_state,
                      widen_map)
from .network import Network, count_parameters
from .profiling import nvtx_range

# Largest output change a growth event may cause, measured as max|after - before| / max(1, max|before|): an
# absolute 1e-4 for outputs up to 1, and relative beyond, as float32 rounding is (logits of magnitude ~900
# seen in a bench run differ by 1.2e-4 after an exact widening: 2 ulp; 3e-13 in float64).
PRESERVATION_LIMIT = 1e-4


# -------------------------------------------------------------------------------------------- policy
def plan_event(cfg: Config, net: Network, epoch: int, val_history: list[float], events: int) -> str | None:
    """Which event (if any) the policy calls for at the start of growth epoch `epoch`: a scheduled one every
    `grow_every` epochs (the first at the start of the phase), or a plateau (val accuracy, over the search and
    growth epochs so far, gained less than grow_min_delta over grow_patience epochs); kinds alternate through
    grow_kinds (`events` happened so far), skipping a kind whose limit (max_cells, max_channels, max_params)
    is reached."""
    scheduled = cfg.grow_every > 0 and epoch % cfg.grow_every == 0
    window = val_history[-(cfg.grow_patience + 1):]
    plateau = len(window) == cfg.grow_patience + 1 and window[-1] - window[0] < cfg.grow_min_delta
    if not (scheduled or plateau):
        return None
    kinds = [k for k in cfg.grow_kinds.split(",") if k]
    start = events % len(kinds)
    for kind in kinds[start:] + kinds[:start]:
        if allowed(cfg, net, kind):
            return kind
    return None


def allowed(cfg: Config, net: Network, kind: str) -> bool:
    spec = net.spec
    if kind == "depth":
        if len(spec.cells) >= cfg.max_cells:
            return False
        probe = grow_depth(copy.deepcopy(net), choose_depth_position(spec))
    else:
        if 2 * math.ceil(spec.cells[0].c * cfg.grow_width_factor / 2) > cfg.max_channels:
            return False
        probe, _ = grow_width(net, cfg.grow_width_factor)
    return count_parameters(probe) <= cfg.max_params


# -------------------------------------------------------------------------------------------- event
@dataclass
class Grown:
    net: Network
    opt: torch.optim.Optimizer
    event: dict


def grow(net: Network, opt: torch.optim.Optimizer, arch: Architecture, probe: torch.Tensor, kind: str, *,
         width_factor: float) -> Grown:
    """One growth event: a grown copy of `net`, checked on `probe`, and a new optimizer of `opt`'s kind and
    hyperparameters holding `opt`'s state moved onto the grown parameters. `net` and `opt` are not changed."""
    sample = arch.sample("argmax")
    params_before = count_parameters(net)
    was_training = net.training
    with nvtx_range("growth"):
        t0 = time.perf_counter()
        before = _outputs(net, probe, sample)
        if kind == "depth":
            new_net = copy.deepcopy(net)
            transforms = [(old, new, torch.clone) for old, new in zip(net.parameters(), new_net.parameters())]
            position = choose_depth_position(net.spec)
            grow_depth(new_net, position)
            detail = {"position": position}
        else:
            new_net, transforms = grow_width(net, width_factor)
            detail = {"factor": width_factor}
        net.train(was_training)
        after = _outputs(new_net, probe, sample)
        new_net.train()
        diff = float((after - before).abs().max())
        rel_diff = diff / max(1.0, float(before.abs().max()))
        if not rel_diff <= PRESERVATION_LIMIT:
            raise TrainingError(f"growth event {kind} changed the network's output by {diff:.3g} ({rel_diff:.3g} "
                                f"of its scale, > {PRESERVATION_LIMIT}): a bug in engine/net2net.py; the last "
                                f"checkpoint is intact")
        new_opt = type(opt)(new_net.parameters(), **opt.defaults)
        transfer_optimizer_state(opt, new_opt, transforms)
        grow_s = time.perf_counter() - t0
    spec = new_net.spec
    event = {"event": f"grow_{kind}", "params_before": params_before, "params_after": count_parameters(new_net),
             "max_abs_diff": diff, "rel_diff": rel_diff, "grow_s": round(grow_s, 3), "cells": len(spec.cells),
             "channels": spec.cells[0].c, **detail}
    return Grown(new_net, new_opt, event)


def _outputs(net: Network, x: torch.Tensor, sample) -> torch.Tensor:
    net.eval()
    with torch.no_grad(), eager():
        return net(x, sample)


__all__ = ["PRESERVATION_LIMIT", "Grown", "allowed", "choose_depth_position", "grow", "grow_depth", "grow_width",
           "plan_event", "stage_positions", "transfer_optimizer_state", "widen_map"]
