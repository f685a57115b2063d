"""Data-parallel runs on torch.distributed, launched by torchrun (one process per device):

    torchrun --nproc_per_node=2 -m engine.cli search --preset smoke --out runs/ddp     gloo on CPUs, NCCL on GPUs

What makes every rank end with the same architecture, by construction rather than by broadcasting rank 0's:
- every rank builds the same network, logits and Gumbel generator from the same seed, so with hard sampling
  every rank samples the same ops at every step and the same parameters have gradients on every rank;
- each rank reads its shard of the train and val splits (`EpochPlan`'s sharding: the same number of steps);
- weight gradients and logit gradients are averaged over the ranks (`average_gradients_`: one flattened
  `all_reduce` per step of the parameters that have a gradient, the same set on every rank) before clipping
  and the optimizer step, so every rank applies the same update;
- BatchNorm keeps per-rank batch statistics during training (as DARTS does); before an evaluation and at every
  epoch end the running statistics are averaged over the ranks (`average_buffers_`), so evaluations give the
  same numbers on every rank and a checkpoint (written by rank 0) holds the state of every rank;
- `check_same` compares a checksum of the logits (and of the weights after a growth event) across ranks and
  stops the run naming the epoch when they differ.
Only rank 0 writes the run directory and prints.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .errors import ConfigError, TrainingError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1


SINGLE = World()


def env_world() -> World:
    """The world torchrun describes in the environment (RANK, WORLD_SIZE, LOCAL_RANK); one rank without it."""
    try:
        size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise ConfigError("WORLD_SIZE, RANK and LOCAL_RANK must be integers (launch with torchrun)") from None
    if size < 1 or not 0 <= rank < size:
        raise ConfigError(f"RANK {rank} is not in [0, WORLD_SIZE {size}): launch with torchrun")
    return World(rank, size, local)


def init(device: torch.device, timeout_s: float = 300.0) -> World:
    """Join the process group torchrun set up (NCCL for CUDA devices, gloo for CPUs); one rank needs none."""
    world = env_world()
    if world.active and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s),
                                device_id=device if device.type == "cuda" else None)
    return world


def device_for(name: str, world: World) -> str:
    """One GPU per rank: `cuda` (or auto with a GPU) becomes cuda:LOCAL_RANK under torchrun."""
    if world.active and name in ("cuda", "auto") and torch.cuda.is_available():
        return f"cuda:{world.local_rank}"
    return name


def _flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _unflat_(tensors: list[torch.Tensor], flat: torch.Tensor) -> None:
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset:offset + n].view_as(t))
        offset += n


def _mean_(tensors: list[torch.Tensor], world: World) -> None:
    if not world.active or not tensors:
        return
    flat = _flat(tensors)
    dist.all_reduce(flat)
    _unflat_(tensors, flat.div_(world.size))


def average_gradients_(params: list[torch.Tensor], world: World) -> None:
    """Average the gradients of `params` over the ranks, in place: one all_reduce of their flattened
    concatenation (parameters without a gradient, i.e. ops not sampled, are left out: the same ones on every
    rank, since every rank samples the same architecture)."""
    _mean_([p.grad for p in params if p.grad is not None], world)


def _buffers(module: torch.nn.Module) -> list[torch.Tensor]:
    return [b for b in module.buffers() if b.is_floating_point()]


def average_buffers_(module: torch.nn.Module, world: World) -> None:
    """Average the floating-point buffers (BatchNorm running statistics) over the ranks, in place."""
    _mean_(_buffers(module), world)


def gather_buffers(module: torch.nn.Module, world: World) -> list[torch.Tensor] | None:
    """Every rank's floating-point buffers (flattened, on the CPU), for rank 0's checkpoint: between
    evaluations each rank's BatchNorm statistics are its own."""
    bufs = _buffers(module)
    if not world.active or not bufs:
        return None
    flat = _flat(bufs)
    out = [torch.empty_like(flat) for _ in range(world.size)]
    dist.all_gather(out, flat)
    return [t.cpu() for t in out]


def load_buffers_(module: torch.nn.Module, flat: torch.Tensor) -> None:
    """Put back one rank's buffers saved by `gather_buffers`."""
    bufs = _buffers(module)
    if flat.numel() != sum(b.numel() for b in bufs):
        raise ValueError(f"saved buffers hold {flat.numel()} values, the network {sum(b.numel() for b in bufs)}")
    with torch.no_grad():
        _unflat_(bufs, flat.to(bufs[0].device))


def checksum(tensors) -> float:
    """An order-sensitive checksum of `tensors` (float64): equal values give equal sums, bit for bit."""
    total = torch.zeros((), dtype=torch.float64)
    for k, t in enumerate(tensors):
        t = t.detach().to("cpu", torch.float64).reshape(-1)
        total += (t * torch.arange(1, t.numel() + 1, dtype=torch.float64)).sum() * (k + 1)
    return float(total)


def check_same(what: str, tensors, world: World, where: str) -> None:
    """Stop the run when `tensors` differ between ranks (their checksums are gathered on every rank)."""
    if not world.active:
        return
    mine = checksum(tensors)
    sums = [None] * world.size
    dist.all_gather_object(sums, mine)
    if len(set(sums)) > 1:
        raise TrainingError(f"{what} differ between ranks {where} (checksums {sums}): the ranks drifted apart; "
                            f"the last checkpoint is the last state they agreed on")


def rank0(value, world: World):
    """Rank 0's `value` (a small host-side decision: write a checkpoint now, stop now) on every rank."""
    if not world.active:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def close(world: World) -> None:
    if world.active and dist.is_initialized():
        dist.destroy_process_group()
