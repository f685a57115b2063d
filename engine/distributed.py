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
- `eval_sharding=shard` (the default): each rank evaluates its share of the val and test splits (uneven shards that
  hold every sample once) and one `all_reduce` sums the loss, the correct count and the sample count, so every
  rank reports the numbers of the whole split; `full` has every rank evaluate the whole split;
- `sync_bn`: the optimize phase normalizes with the batch statistics of all ranks (`sync_batchnorm`);
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


def init(device: torch.device, world: World | None = None, timeout_s: float = 300.0) -> World:
    """Join the process group torchrun set up (NCCL for CUDA devices, gloo for CPUs); one rank needs none."""
    world = world if world is not None else env_world()
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


def sum_(t: torch.Tensor, world: World) -> torch.Tensor:
    """`t` summed over the ranks (in place; one all_reduce)."""
    if world.active:
        dist.all_reduce(t)
    return t


class CpuSyncBatchNorm(torch.nn.BatchNorm2d):
    """BatchNorm2d whose training-mode statistics are those of the whole batch over all ranks: the per-channel
    sum and the centred sum of squares are summed with `torch.distributed.nn`'s all_reduce, which is
    differentiable (its backward all-reduces the gradients), so the gradients are those of one BatchNorm over
    the concatenated batch. For gloo (CPU tensors), which torch.nn.SyncBatchNorm does not take; in eval mode it
    is BatchNorm2d."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce
        c = x.shape[1]
        n = torch.tensor([x.numel() // c], dtype=x.dtype, device=x.device)
        stats = all_reduce(torch.cat([x.sum((0, 2, 3)), n]))
        count = stats[c]
        mean = stats[:c] / count
        centred = x - mean.view(1, c, 1, 1)
        var = all_reduce(centred.square().sum((0, 2, 3))) / count
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                unbiased = var.detach() * (count / (count - 1).clamp(min=1))
                self.running_var.mul_(1 - m).add_(unbiased, alpha=m)
        out = centred * torch.rsqrt(var + self.eps).view(1, c, 1, 1)
        if self.affine:
            out = out * self.weight.view(1, c, 1, 1) + self.bias.view(1, c, 1, 1)
        return out


def sync_batchnorm(net: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Every BatchNorm2d of `net` normalized over all ranks: torch.nn.SyncBatchNorm on GPUs (NCCL),
    `CpuSyncBatchNorm` on CPUs (gloo). Parameters and buffers are kept (the state_dict keys do not change)."""
    if device.type != "cpu":
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
    for name, child in net.named_children():
        if type(child) is torch.nn.BatchNorm2d:
            new = CpuSyncBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                   child.track_running_stats).to(device)
            new.load_state_dict(child.state_dict())
            new.train(child.training)
            setattr(net, name, new)
        else:
            sync_batchnorm(child, device)
    return net


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
    sums = gather_object(checksum(tensors), world)
    if len(set(sums)) > 1:
        raise TrainingError(f"{what} differ between ranks {where} (checksums {sums}): the ranks drifted apart; "
                            f"the last checkpoint is the last state they agreed on")


def gather_object(value, world: World) -> list:
    """Every rank's `value` (a small host-side record), in rank order, on every rank."""
    if not world.active:
        return [value]
    out = [None] * world.size
    dist.all_gather_object(out, value)
    return out


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
