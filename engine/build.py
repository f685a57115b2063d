"""Building a run from a config: device, seeds, data, loaders, the architecture, and the two trainable
models (the supernet, later the derived network), each with its optimizer and its steps.

    run = build_run(cfg)              everything the phase loop needs, nothing run yet
    run.supernet.steps.weight_step(x, y, "warmup")
    run.build_final(genotype)         the optimize phase's network, optimizer, steps and loader

`aso-se eval`, `aso-se profile` and the benches use the same builders, so a model is built one way only.
The order of construction is part of the result: network initializations draw from torch's global RNG,
so data, architecture, Gumbel generator and supernet are built in this order, always.
"""
from __future__ import annotations

import dataclasses
import os
import random
import sys
from dataclasses import dataclass, field

import numpy as np
import torch

from . import distributed
from .arch import Architecture, parse_logit_prior
from .genotype import Genotype
from .config import Config
from .cost import CostTerm, cost_table
from .data import Dataset, load_dataset, make_loader, make_splits, train_augment
from .errors import ConfigError, DataError
from .latency import load_table
from .network import NetSpec, Network, darts_spec, derive, derived_spec
from .profiling import enable_nvtx
from .steps import Steps


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        reason = unusable_gpu()
        if reason and reason not in _WARNED:
            _WARNED.add(reason)
            print(f"aso-se: WARNING: {reason}; running on the CPU (pass --device cpu to say so and silence this)",
                  file=sys.stderr, flush=True)
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but no CUDA GPU is available; use --device cpu")
    return torch.device(name)


_WARNED: set[str] = set()


def unusable_gpu() -> str | None:
    """Why an NVIDIA GPU this machine has cannot be used by this torch (a driver too old for the wheel's CUDA,
    most often), or None when there is no GPU to miss: `device=auto` must not fall back to the CPU silently."""
    if not any(os.path.exists(p) for p in ("/dev/nvidia0", "/dev/nvidiactl")):
        return None
    driver = ""
    try:
        with open("/proc/driver/nvidia/version") as f:
            driver = f" (driver: {f.readline().strip()[:80]})"
    except OSError:
        pass
    return (f"an NVIDIA GPU is present but torch {torch.__version__} (built for CUDA {torch.version.cuda}) cannot "
            f"use it{driver}: update the NVIDIA driver, or install a torch build for the driver's CUDA version")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_deterministic(device: torch.device) -> None:
    """Bit-identical reruns and resumes on a GPU (config `deterministic`): cuDNN's default convolution
    backward and cuBLAS's split reductions accumulate in an order that changes from run to run. Slower; the
    CPU's kernels are deterministic already, so nothing changes there."""
    if device.type != "cuda":
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS first starts
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.use_deterministic_algorithms(True, warn_only=True)  # an op with no deterministic kernel warns, once


def image_options(cfg: Config, device: torch.device | None = None) -> dict:
    """The imagefolder reader's settings; DALI decodes on the GPU (nvJPEG) when the run computes on one:
    `device`, the device the run resolved, or, where a caller has none (`aso-se data`), the config's."""
    if device is not None:
        gpu = device.type == "cuda"
    else:
        gpu = cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())
    return dict(image_size=cfg.image_size, cache_dir=cfg.cache_dir, skip_bad_images=cfg.skip_bad_images,
                holdout_fraction=cfg.holdout_fraction, holdout_seed=cfg.holdout_seed, device="cuda" if gpu else "cpu")


def load_data(cfg: Config, device: torch.device | None = None) -> Dataset:
    """The config's data set, cut to `train_subset` samples of the official training set when set, its training
    labels shuffled when `shuffle_labels` is set. `device`: the one the run computes on (where images decode)."""
    dataset = load_dataset(cfg.dataset, cfg.data_dir, images=image_options(cfg, device), n_train=cfg.synthetic_train,
                           n_test=cfg.synthetic_test, size=cfg.synthetic_size, channels=cfg.synthetic_channels,
                           seed=cfg.seed)
    if cfg.train_subset and cfg.train_subset < len(dataset.train_labels):
        keep = np.sort(np.random.default_rng([cfg.seed, 7]).permutation(len(dataset.train_labels))[:cfg.train_subset])
        dataset.train_images = dataset.train_images[keep]
        dataset.train_labels = dataset.train_labels[keep]
    if cfg.shuffle_labels:  # every image keeps its place, its label is another image's: nothing left to learn
        dataset.train_labels = dataset.train_labels[np.random.default_rng([cfg.seed, 13]).permutation(
            len(dataset.train_labels))]
    return dataset


def build_architecture(cfg: Config, device: torch.device | str = "cpu") -> Architecture:
    """The architecture manager a config describes."""
    return Architecture(cfg.nodes, init_std=cfg.init_std, none_init=cfg.none_init, skip_init=cfg.skip_init,
                        hard=cfg.hard, skip_threshold=cfg.skip_threshold, dominant_threshold=cfg.dominant_threshold,
                        keep_threshold=cfg.keep_threshold, **cfg.derivation_caps(),
                        prior=parse_logit_prior(cfg.logit_prior), seed=cfg.seed).to(device)


def make_loaders(cfg: Config, splits: dict, augment, device: torch.device,
                 world: distributed.World = distributed.SINGLE) -> dict:
    """train (weight steps), arch (architecture steps, the val split reshuffled), val (evaluation, at most
    `eval_samples` of the val split), test. No val split, no arch and val loaders. With several ranks, each
    rank's train and arch loaders play its shard of every epoch (the same number of steps on every rank); the
    val and test loaders too with `eval_sharding=shard` (uneven shards, every sample in one), else every rank
    evaluates the whole splits."""
    kw = dict(device=device, seed=cfg.seed)
    shard = dict(shard_id=world.rank, num_shards=world.size)
    eval_kw = {**kw, **(shard if cfg.eval_sharding == "shard" else {})}
    tr_x, tr_y = splits["train"]
    va_x, va_y = splits["val"]
    loaders = {"train": make_loader(cfg.loader, tr_x, tr_y, cfg.batch_size, train=True, augment=augment,
                                    drop_last=cfg.drop_last, **kw, **shard)}
    if len(va_y):
        loaders["arch"] = make_loader(cfg.loader, va_x, va_y, cfg.batch_size, train=True, augment=augment,
                                      drop_last=cfg.drop_last, **{**kw, "seed": cfg.seed + 1}, **shard)
        if cfg.eval_samples and cfg.eval_samples < len(va_y):
            pick = np.sort(np.random.default_rng([cfg.seed, 11]).permutation(len(va_y))[:cfg.eval_samples])
            va_x, va_y = va_x[pick], va_y[pick]
        loaders["val"] = make_loader(cfg.loader, va_x, va_y, cfg.eval_batch_size, train=False, augment=augment,
                                     **eval_kw)
    loaders["test"] = make_loader(cfg.loader, *splits["test"], cfg.eval_batch_size, train=False, augment=augment,
                                  **eval_kw)
    return loaders


def weight_optimizer(cfg: Config, net: Network) -> torch.optim.Optimizer:
    return torch.optim.SGD(net.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


@dataclass
class Model:
    """One trainable network with its weight optimizer and the steps bound to both."""
    net: Network
    opt: torch.optim.Optimizer
    steps: Steps


@dataclass
class Run:
    cfg: Config
    device: torch.device
    channels_last: bool
    dataset: Dataset
    splits: dict
    augment: object
    loaders: dict
    arch: Architecture
    arch_opt: torch.optim.Optimizer
    gumbel: torch.Generator
    world: distributed.World = distributed.SINGLE
    supernet: Model = None
    final: Model | None = None
    cost: CostTerm | None = None          # the architecture step's cost term (config cost), None when off
    curriculum_loaders: dict | None = None  # train, arch, val of `curriculum` (its first epochs), None when off
    _probe: torch.Tensor | None = field(default=None, repr=False)

    # ------------------------------------------------------------------------------------------ models
    def adopt_supernet(self, net: Network, opt: torch.optim.Optimizer | None = None) -> None:
        """Make `net` the supernet (at start, on resume, after a growth event), with `opt` (default: a fresh
        weight optimizer) and steps bound to both."""
        cfg = self.cfg
        opt = opt if opt is not None else weight_optimizer(cfg, net)
        steps = Steps(net, opt, arch=self.arch, arch_opt=self.arch_opt, grad_clip=cfg.grad_clip,
                      channels_last=self.channels_last, generator=self.gumbel, compile=cfg.compile,
                      recompile_limit=cfg.recompile_limit, world=self.world,
                      grad_sync=cfg.grad_sync, cost_term=self.cost)
        self.supernet = Model(net, opt, steps)

    def new_supernet(self, spec) -> None:
        net = Network(spec).to(self.device)
        self.adopt_supernet(net.to(memory_format=torch.channels_last) if self.channels_last else net)

    def build_final(self, genotype: Genotype) -> Model:
        """The optimize phase: the derived network (fresh or supernet-initialized), its optimizer, its steps,
        and its loader (`loaders["optimize"]`: train, or train+val)."""
        cfg = self.cfg
        net = derive(self.supernet.net, genotype, transfer=cfg.optimize_init == "supernet", **cfg.derived_shape())
        if self.world.active and cfg.sync_bn:
            net = distributed.sync_batchnorm(net, self.device)
        if self.channels_last:
            net = net.to(memory_format=torch.channels_last)
        opt = torch.optim.SGD(net.parameters(), lr=cfg.optimize_lr, momentum=cfg.momentum, nesterov=True,
                              weight_decay=cfg.optimize_weight_decay)
        steps = Steps(net, opt, grad_clip=cfg.grad_clip, label_smoothing=cfg.label_smoothing,
                      channels_last=self.channels_last, compile=cfg.compile, recompile_limit=cfg.recompile_limit,
                      world=self.world, grad_sync=cfg.grad_sync)
        self.final = Model(net, opt, steps)
        x, y = self.splits["train"]
        if cfg.optimize_data == "train+val":
            x = np.concatenate([x, self.splits["val"][0]])
            y = np.concatenate([y, self.splits["val"][1]])
        self.loaders["optimize"] = make_loader(cfg.loader, x, y, cfg.optimize_batch_size, train=True,
                                               augment=self.augment, device=self.device, seed=cfg.seed + 2,
                                               drop_last=cfg.drop_last, shard_id=self.world.rank,
                                               num_shards=self.world.size)
        return self.final

    def supernet_loaders(self, global_epoch: int) -> dict:
        """The loaders the supernet's epoch `global_epoch` (0-based, over all phases) trains, searches and
        evaluates on: the curriculum's for its first `curriculum_epochs`, the data set's after."""
        if self.curriculum_loaders is not None and global_epoch < self.cfg.curriculum_epochs:
            return self.curriculum_loaders
        return self.loaders

    def probe_batch(self) -> torch.Tensor:
        """A fixed batch (the first of the val evaluation split, else of test) on which growth checks that
        an event preserves the network's function."""
        if self._probe is None:  # the split's first images, whatever shard of it this rank evaluates
            src = self.loaders.get("val", self.loaders["test"])
            n = min(64, src.batch_size, len(src.labels))
            x, _ = next(iter(make_loader(self.cfg.loader, src.images[:n], src.labels[:n], n, train=False,
                                         augment=self.augment, device=self.device)))
            self._probe = x.clone()
        return self._probe.contiguous(memory_format=torch.channels_last) if self.channels_last else self._probe


def supernet_spec(cfg: Config, dataset: Dataset) -> NetSpec:
    """The supernet a config searches, for the data set's channels and classes."""
    c, _, _ = dataset.image_shape
    return darts_spec(c, dataset.num_classes, cfg.channels, cfg.layers, cfg.nodes, cfg.stem_multiplier,
                      cfg.stem_stride, cfg.gate_ops)


def optimize_spec(cfg: Config, dataset: Dataset) -> NetSpec:
    """The network the optimize phase trains, as far as the config knows it before any growth event: the
    supernet's layout at the derived width and stem stride (width growth does not change it; a depth event
    adds cells)."""
    return derived_spec(supernet_spec(cfg, dataset), **cfg.derived_shape())


def build_cost_term(cfg: Config, dataset: Dataset) -> CostTerm | None:
    """The cost term config `cost` asks for, on the network the optimize phase will train: parameters and
    multiply-accumulates counted from the shapes, latency from the table of `latency_table`."""
    if cfg.cost == "off":
        return None
    spec, hw = optimize_spec(cfg, dataset), tuple(dataset.image_shape[1:])
    if cfg.cost == "latency":
        table = load_table(cfg.latency_table, spec, hw)
    else:
        table = cost_table(spec, hw)
    return CostTerm(table, cfg.cost, cfg.cost_target, cfg.cost_weight)


def curriculum_loaders(cfg: Config, dataset: Dataset, device: torch.device, world: distributed.World) -> dict:
    """The train, arch and val loaders of `cfg.curriculum`, split and labelled (`shuffle_labels` included) as the
    run's data set is. Its images must have the data set's shape and classes, and its training set the same size,
    so that an epoch has the same steps on either and the schedules hold across the switch."""
    try:
        cur = load_data(dataclasses.replace(cfg, dataset=cfg.curriculum, data_dir=None), device)
    except DataError as e:
        raise DataError(f"curriculum={cfg.curriculum}: {e}") from None
    mismatch = [f"{what} {a} against {b}" for what, a, b in (
        ("image shape", cur.image_shape, dataset.image_shape), ("classes", cur.num_classes, dataset.num_classes),
        ("training images", len(cur.train_labels), len(dataset.train_labels))) if a != b]
    if mismatch:
        raise ConfigError(f"curriculum={cfg.curriculum} does not fit dataset={cfg.dataset}: "
                          f"{'; '.join(mismatch)}; a curriculum must be the same task's images, an easier version")
    splits = make_splits(cur, cfg.val_fraction, cfg.seed)
    loaders = make_loaders(cfg, splits, train_augment(cur, cfg.flip, cfg.crop_pad), device, world)
    loaders.pop("test")  # the test set is the data set's alone
    return loaders


def build_run(cfg: Config) -> Run:
    """Under torchrun (WORLD_SIZE > 1) this joins the process group first: one rank per device."""
    world = distributed.env_world()
    device = resolve_device(distributed.device_for(cfg.device, world))
    distributed.init(device, world)
    enable_nvtx(cfg.nvtx)
    seed_everything(cfg.seed)
    if cfg.deterministic:
        make_deterministic(device)
    dataset = load_data(cfg, device)
    splits = make_splits(dataset, cfg.val_fraction, cfg.seed)
    augment = train_augment(dataset, cfg.flip, cfg.crop_pad)
    loaders = make_loaders(cfg, splits, augment, device, world)
    arch = build_architecture(cfg, device)
    curriculum = curriculum_loaders(cfg, dataset, device, world) if cfg.curriculum else None
    arch_opt = torch.optim.Adam(arch.parameters(), lr=cfg.arch_lr, betas=(0.5, 0.999),
                                weight_decay=cfg.arch_weight_decay)
    gumbel = torch.Generator(device=device).manual_seed(cfg.seed + 1)
    run = Run(cfg, device, cfg.channels_last if cfg.channels_last is not None else device.type == "cpu",
              dataset, splits, augment, loaders, arch, arch_opt, gumbel, world, cost=build_cost_term(cfg, dataset),
              curriculum_loaders=curriculum)
    run.new_supernet(supernet_spec(cfg, dataset))
    return run
