"""Splits and loaders: the DALI pipeline that feeds the steps, a plain torch baseline, a tensor-resident path.

All three loaders take their shuffle order and augmentation parameters (crop offsets, flips) from one
seeded `EpochPlan`, a function of (seed, epoch) only. So the loaders are interchangeable, a resumed run
sees exactly the batches an uninterrupted one would, and tests can compare loaders sample by sample.

Augmentation (train only): zero-pad by `pad` px and crop back to H x W at a random offset, optional
horizontal flip, then normalize with the data set's per-channel mean/std; output float32 NCHW.

Longer than 300 lines on purpose: the plan, the numpy reference and the three loaders are one contract
(same batches, sample by sample); kept side by side, a change to one is seen against the others.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import ConfigError, DataError

LOADERS = ("dali", "torch", "tensor")


@dataclass(frozen=True)
class Augment:
    mean: tuple[float, ...]   # per channel, 0-255 units
    std: tuple[float, ...]
    pad: int = 0              # random crop offsets are drawn from [-pad, pad]; 0 disables the crop
    flip: bool = False        # random horizontal flip with probability 1/2


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic, disjoint train/val split of range(n); both index arrays are sorted."""
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}")
    perm = np.random.default_rng([seed, 0x5EED]).permutation(n)
    n_val = int(round(n * val_fraction))
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def num_batches(n: int, batch_size: int, drop_last: bool) -> int:
    return n // batch_size if drop_last else math.ceil(n / batch_size)


@dataclass
class Batch:
    indices: np.ndarray   # (B,) positions into the loader's arrays
    offsets: np.ndarray   # (B, 2) int32 crop offsets (dy, dx): out[i, j] = in[i + dy, j + dx], zeros outside
    flips: np.ndarray     # (B,) int32, 1 = mirror horizontally


class EpochPlan:
    """Which samples each batch of an epoch holds, and how each is augmented. Pure function of (seed, epoch).

    Sharding: every shard sees the same permutation and takes every `num_shards`-th element of it. `even`
    (training) cuts the shards to a common length so all shards run the same number of steps; uneven shards
    (evaluation) hold every sample exactly once between them.
    """

    def __init__(self, n: int, batch_size: int, *, shuffle: bool, drop_last: bool, augment: Augment,
                 seed: int = 0, shard_id: int = 0, num_shards: int = 1, max_batches: int | None = None,
                 even: bool = True):
        if not isinstance(batch_size, int) or batch_size <= 0:
            raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
        if num_shards < 1 or not 0 <= shard_id < num_shards:
            raise ConfigError(f"shard_id must be in [0, num_shards), got shard_id={shard_id}, num_shards={num_shards}")
        self.n, self.batch_size, self.shuffle, self.drop_last = n, batch_size, shuffle, drop_last
        self.augment, self.seed, self.shard_id, self.num_shards = augment, seed, shard_id, num_shards
        self.per_shard = n // num_shards if even else len(range(shard_id, n, num_shards))
        batches = num_batches(self.per_shard, batch_size, drop_last)
        self.num_batches = batches if max_batches is None else min(batches, max_batches)
        if self.num_batches == 0:
            raise ConfigError(f"batch_size {batch_size} is larger than the {self.per_shard} samples of this split "
                              f"with drop_last; lower batch_size or use more data")

    def batches(self, epoch: int) -> list[Batch]:
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(self.n) if self.shuffle else np.arange(self.n)
        if self.num_shards > 1:
            order = order[self.shard_id::self.num_shards][: self.per_shard]
        pad = self.augment.pad
        offsets = rng.integers(-pad, pad + 1, (len(order), 2), dtype=np.int32) if pad else \
            np.zeros((len(order), 2), np.int32)
        flips = rng.integers(0, 2, len(order), dtype=np.int32) if self.augment.flip else \
            np.zeros(len(order), np.int32)
        out = []
        for b in range(self.num_batches):
            sl = slice(b * self.batch_size, min((b + 1) * self.batch_size, len(order)))
            out.append(Batch(order[sl], offsets[sl], flips[sl]))
        return out


def augment_reference(images: np.ndarray, batch: Batch, augment: Augment) -> np.ndarray:
    """Plain numpy version of the augmentation, the single source of truth the loaders are tested against.
    images: (N, H, W, C) uint8 -> (B, C, H, W) float32."""
    x = images[batch.indices].astype(np.float32)
    b, h, w, c = x.shape
    p = augment.pad
    if p:
        padded = np.zeros((b, h + 2 * p, w + 2 * p, c), np.float32)
        padded[:, p:p + h, p:p + w] = x
        x = np.stack([padded[i, p + dy:p + dy + h, p + dx:p + dx + w] for i, (dy, dx) in enumerate(batch.offsets)])
    flip = batch.flips.astype(bool)
    x[flip] = x[flip][:, :, ::-1]
    x = (x - np.asarray(augment.mean, np.float32)) / np.asarray(augment.std, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


class _Loader:
    """Iterable of (images (B, C, H, W) float32, labels (B,) int64) on `device`; one pass is one epoch.

    `set_epoch(e)` chooses the epoch the next pass plays; without it, passes play epochs 0, 1, 2, ...
    Every batch has as many labels as images; the train policy drops the last partial batch.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, batch_size: int, *, train: bool,
                 augment: Augment, device: str | torch.device = "cpu", seed: int = 0,
                 drop_last: bool | None = None, shard_id: int = 0, num_shards: int = 1,
                 max_batches: int | None = None):
        if len(images) != len(labels):
            raise DataError(f"{len(images)} images but {len(labels)} labels")
        if images.dtype != np.uint8 or images.ndim != 4:
            raise DataError(f"loaders take uint8 NHWC images, got {images.dtype} {images.shape}")
        self.images, self.labels = images, labels
        self.train = train
        self.augment = augment if train else Augment(augment.mean, augment.std)  # eval: normalize only
        self.device = torch.device(device)
        self.plan = EpochPlan(len(images), batch_size, shuffle=train,
                              drop_last=train if drop_last is None else drop_last, augment=self.augment,
                              seed=seed, shard_id=shard_id, num_shards=num_shards, max_batches=max_batches,
                              even=train)
        self.batch_size = batch_size
        self._next_epoch = 0

    def __len__(self) -> int:
        return self.plan.num_batches

    @property
    def num_samples(self) -> int:
        return sum(len(b.indices) for b in self.plan.batches(0))

    def set_epoch(self, epoch: int) -> None:
        self._next_epoch = epoch

    def __iter__(self):
        return self.iter_from(0)

    def iter_from(self, start: int):
        """One pass over the chosen epoch from batch `start` on (resuming mid-epoch)."""
        epoch = self._next_epoch
        self._next_epoch += 1
        yield from self._iterate(self.plan.batches(epoch)[start:])

    def _iterate(self, batches: list[Batch]):
        raise NotImplementedError


class DaliLoader(_Loader):
    """The engine's feeding path. Crop, flip and normalize run in a DALI pipeline: on the CPU without a GPU
    (`device_id=None`), on the GPU with one, where the batch reaches torch through DLPack with no host copy.

    Four external sources are fed per batch (images, labels, crop anchors, mirror flags); the pipeline is
    not self-prefetching (exec_pipelined=False) and this class keeps exactly one batch in flight ahead of
    the consumer, so an epoch can stop early and the next one starts clean.
    """

    def __init__(self, *args, num_threads: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        # 0: one thread on the CPU (measured: a second one only competes with the 2 cores' compute,
        # 361 vs 321 img/s for the main job's optimize step), two feeding a GPU
        self.num_threads = num_threads or (2 if self.device.type == "cuda" else 1)
        self._pipe = None
        self._in_flight = 0

    def _build(self):
        from nvidia.dali import fn, pipeline_def, types

        gpu = self.device.type == "cuda"
        device_id = (self.device.index if self.device.index is not None else torch.cuda.current_device()) if gpu else None
        _, h, w, c = self.images.shape
        aug = self.augment

        @pipeline_def(batch_size=self.batch_size, num_threads=self.num_threads, device_id=device_id,
                      seed=self.plan.seed, exec_pipelined=False, exec_dynamic=True)
        def pipeline():
            images = fn.external_source(name="images", layout="HWC", dtype=types.UINT8)
            labels = fn.external_source(name="labels", dtype=types.INT64)
            anchors = fn.external_source(name="anchors", dtype=types.INT32)
            mirror = fn.external_source(name="mirror", dtype=types.INT32)
            if gpu:
                images, labels = images.gpu(), labels.gpu()
            if aug.pad:
                images = fn.slice(images, anchors, np.array([h, w], np.int32), axes=[0, 1],
                                  out_of_bounds_policy="pad", fill_values=0)
            images = fn.crop_mirror_normalize(images, mirror=mirror, mean=list(aug.mean), std=list(aug.std),
                                              output_layout="CHW", dtype=types.FLOAT)
            return images, labels

        pipe = pipeline()
        pipe.build()
        return pipe

    def _feed(self, batch: Batch) -> None:
        p = self._pipe
        p.feed_input("images", self.images[batch.indices])
        p.feed_input("labels", self.labels[batch.indices])
        if self.augment.pad:  # without padding the crop is not in the graph, and DALI prunes its input
            p.feed_input("anchors", batch.offsets)
        p.feed_input("mirror", batch.flips)
        p.schedule_run()
        self._in_flight += 1

    def _take(self):
        images, labels = self._pipe.outputs()
        self._in_flight -= 1
        # DLPack hand-off: no copy on either device (the dynamic executor keeps a held buffer alive).
        x = torch.from_dlpack(images.as_tensor())
        y = torch.from_dlpack(labels.as_tensor()).view(-1)
        return x, y

    def _iterate(self, batches):
        if self._pipe is None:
            self._pipe = self._build()
        while self._in_flight:  # a previous pass stopped early: drop what it left in flight
            self._take()
        for i, batch in enumerate(batches):
            if i == 0:
                self._feed(batch)
            if i + 1 < len(batches):
                self._feed(batches[i + 1])  # the next batch is augmented while this one trains
            yield self._take()


def _view(array: np.ndarray) -> torch.Tensor:
    """A tensor sharing the memory of an array the loaders only read (readers may hand out read-only
    arrays; torch warns about those on every first use, though nothing here ever writes to them)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


class _AugmentedSamples(torch.utils.data.Dataset):
    """Map-style data set for the torch baseline: one index is (sample, dy, dx, flip)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, augment: Augment):
        self.images = _view(images).permute(0, 3, 1, 2)  # (N, C, H, W) view, uint8
        self.labels = _view(labels)
        self.pad = augment.pad
        self.mean = torch.tensor(augment.mean).view(-1, 1, 1)
        self.std = torch.tensor(augment.std).view(-1, 1, 1)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, item):
        i, dy, dx, flip = item
        x = self.images[i].float()
        if self.pad:
            _, h, w = x.shape
            p = self.pad
            x = torch.nn.functional.pad(x, (p, p, p, p))[:, p + dy:p + dy + h, p + dx:p + dx + w]
        if flip:
            x = x.flip(2)
        return (x - self.mean) / self.std, self.labels[i]


class TorchLoader(_Loader):
    """Baseline: torch.utils.data.DataLoader with per-sample augmentation in `num_workers` processes."""

    def __init__(self, *args, num_workers: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.num_workers = num_workers
        self._samples = _AugmentedSamples(self.images, self.labels, self.augment)

    def _iterate(self, batches):
        sampler = [[(int(i), int(o[0]), int(o[1]), int(f)) for i, o, f in zip(b.indices, b.offsets, b.flips)]
                   for b in batches]
        loader = torch.utils.data.DataLoader(self._samples, batch_sampler=sampler, num_workers=self.num_workers,
                                             pin_memory=self.device.type == "cuda",
                                             persistent_workers=False)
        for x, y in loader:
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)


class TensorLoader(_Loader):
    """Tensor-resident path: the whole split lives on the device as uint8 and is augmented there in batch
    (gather crop, `where` flip), the cifar10-airbench recipe."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # (N, C, H, W); `.contiguous()` makes the one copy (the idx readers' buffers are read-only)
        self._images = _view(self.images).to(self.device).permute(0, 3, 1, 2).contiguous()
        self._labels = _view(self.labels).to(self.device)
        self._mean = torch.tensor(self.augment.mean, device=self.device).view(1, -1, 1, 1)
        self._std = torch.tensor(self.augment.std, device=self.device).view(1, -1, 1, 1)

    def _upload(self, array: np.ndarray) -> torch.Tensor:
        """A batch's indices, offsets or flips to the device: on CUDA from pinned memory, non-blocking, so the
        host never waits for the device's queue to drain (a pageable copy would)."""
        t = torch.from_numpy(array)
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)

    def _iterate(self, batches):
        p = self.augment.pad
        _, c, h, w = self._images.shape
        for b in batches:
            idx = self._upload(b.indices)
            x = self._images[idx]
            if p:
                x = torch.nn.functional.pad(x, (p, p, p, p))
                off = self._upload(b.offsets) + p  # (B, 2)
                rows = (off[:, 0:1] + torch.arange(h, device=self.device)).view(-1, 1, h, 1).expand(-1, c, h, w + 2 * p)
                x = x.gather(2, rows)
                cols = (off[:, 1:2] + torch.arange(w, device=self.device)).view(-1, 1, 1, w).expand(-1, c, h, w)
                x = x.gather(3, cols)
            if self.augment.flip:
                flip = self._upload(b.flips).bool().view(-1, 1, 1, 1)
                x = torch.where(flip, x.flip(3), x)
            yield (x.float() - self._mean) / self._std, self._labels[idx]


class Cycle:
    """Endless batches from a loader, epoch after epoch (each epoch in its own order, `set_epoch`). Where it
    stands, (`epoch`, `pos`), is all a resume needs: `Cycle(loader, epoch, pos)` goes on from there."""

    def __init__(self, loader: _Loader, epoch: int = 0, pos: int = 0):
        self.loader, self.epoch, self.pos = loader, epoch, pos
        self._it = None

    def __iter__(self):
        return self

    def __next__(self):
        if self._it is None:
            self.loader.set_epoch(self.epoch)
            self._it = self.loader.iter_from(self.pos)
        try:
            batch = next(self._it)
        except StopIteration:
            self.epoch, self.pos = self.epoch + 1, 0
            self.loader.set_epoch(self.epoch)
            self._it = self.loader.iter_from(0)
            batch = next(self._it)
        self.pos += 1
        return batch

    def take(self, n: int) -> list:
        return [next(self) for _ in range(n)]


def make_loader(kind: str, images: np.ndarray, labels: np.ndarray, batch_size: int, *, num_workers: int = 0,
                num_threads: int = 0, **kwargs) -> _Loader:
    """`kind` is "dali" (the feeding path, `num_threads`), "torch" (baseline, `num_workers`) or "tensor"."""
    if kind == "dali":
        return DaliLoader(images, labels, batch_size, num_threads=num_threads, **kwargs)
    if kind == "torch":
        return TorchLoader(images, labels, batch_size, num_workers=num_workers, **kwargs)
    if kind == "tensor":
        return TensorLoader(images, labels, batch_size, **kwargs)
    raise ConfigError(f"unknown loader {kind!r}; choose one of {', '.join(LOADERS)}")
