"""One typed config with named presets. argparse lives only in the CLI; `--set key=value` overrides fields.

Budgets are in epochs (one pass over the train split, or `steps_per_epoch` steps when that is set).
Every run directory gets the full config as `config.json`.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, fields

from .errors import ConfigError


@dataclass
class Config:
    # ---- data
    dataset: str = "fashion-mnist"        # fashion-mnist | cifar10 | imagefolder | synthetic | planted-lag |
                                          # planted-lag-checker | planted-polarity | planted-polarity-near
    data_dir: str | None = None           # default: /usr/share/datasets/fashion-mnist for fashion-mnist
    image_size: int = 32                  # imagefolder: the side images are resized (shorter side) and
                                          # centre-cropped to
    cache_dir: str | None = None          # imagefolder: decoded arrays kept here; None: $XDG_CACHE_HOME/aso-se
    holdout_fraction: float = 0.1         # imagefolder without test/ or val/: share of train held out as test ...
    holdout_seed: int = 0                 # ... drawn with this seed (not the run's: the test set stays put)
    skip_bad_images: bool = False         # imagefolder: skip (and count) files that do not decode, not stop
    val_fraction: float = 0.5             # share of the official training set used for architecture steps
    loader: str = "dali"                  # dali (the feeding path) | torch (baseline) | tensor
    flip: bool | None = None              # horizontal flip; None: the data set's default (on for CIFAR-10)
    crop_pad: int = -1                    # random-crop padding in px; -1: the data set's default (2 or 4)
    batch_size: int = 64
    eval_batch_size: int = 256
    drop_last: bool = True                # train batches; eval always keeps the last partial batch
    train_subset: int = 0                 # >0: use only this many samples of the official training set
    shuffle_labels: bool = False          # the official training labels permuted (seeded): the control a search
                                          # claim is held against (RLNAS); the test labels stay as they are
    curriculum: str = ""                  # a data set (one of `dataset`'s choices, read from its default place)
    curriculum_epochs: int = 0            # that the run's first this many epochs (warmup included) train and
                                          # search on instead of `dataset`: an easier version of the task first
    eval_samples: int = 0                 # >0: per-epoch val accuracy on a fixed subset of this size
    synthetic_size: int = 16              # synthetic data set only: image size, channels, samples (the planted
                                          # tasks take the sample counts; their image size is their own)
    synthetic_channels: int = 1
    synthetic_train: int = 2048
    synthetic_test: int = 512
    # ---- network
    channels: int = 16                    # C of the first cells; doubled at each reduction
    layers: int = 5                       # cells (reduction cells at 1/3 and 2/3 of the depth)
    nodes: int = 4
    stem_multiplier: int = 3
    stem_stride: int = 1
    channels_last: bool | None = None     # None: on for CPU (measured 1.3-1.7x on this 2-core CPU)
    # ---- architecture
    init_std: float = 0.5
    none_init: float = -2.0
    skip_init: float = 1.0
    hard: bool = True                     # hard (straight-through) Gumbel sampling; False: soft + skipping
    skip_threshold: float = 0.0           # soft mode: ops below this weight are not executed
    dominant_threshold: float = 1.0       # soft mode: a top weight at or above this runs alone ...
    keep_threshold: float = 1.0           # ... plus ops above this
    tau_max: float = 2.0
    tau_min: float = 0.1
    tau_schedule: str = "exp"             # exp: per architecture step | linear: per epoch
    search_tau_start: float | None = None  # None: tau_max
    growth_tau_start: float | None = None  # None: go on from where search stopped
    max_skip: int = 2                     # skip_connects allowed in the derived normal cell (P-DARTS); -1: no cap
    max_skip_reduce: int = -1             # ... and in the derived reduction cell
    max_param_free: int = -1              # parameter-free ops (pools, skip) allowed in the derived normal cell
    max_param_free_reduce: int = -1       # ... and in the derived reduction cell
    logit_prior: str = ""                 # added to the initial logits of every edge: "reduce:max_pool_3x3=2" (cell
                                          # type normal|reduce|both, op=value pairs; "normal:...;reduce:...").
                                          # A known answer to start from, or how much of one a search needs
    logit_noise: float = 0.0              # std of noise added to the logits at each phase change
    gate_ops: bool = True                 # supernet ops other than skip start with a zero output scale (no
                                          # collapse at the switch after an all-skip warmup; ops.gate_output)
    handover_bias: float = 5.0            # search starts sampling with this bias on skip_connect's logit ...
    handover_epochs: float = 1.0          # ... decaying linearly to 0 over these epochs (no collapse at the switch)
    arch_every: int = 1                   # one architecture step every `arch_every` weight steps
    arch_start_epochs: float = 0.0        # search epochs of weight steps alone (architectures sampled, logits
                                          # fixed) before the first architecture step: every op trains before
                                          # ops are compared (the warm-up of P-DARTS / PC-DARTS)
    arch_lr: float = 3e-4
    arch_weight_decay: float = 1e-3
    cost: str = "off"                     # off | params | macs | latency: a cost term in the architecture step
                                          # (engine/cost.py CostTerm), the derived network's cost against ...
    cost_target: float = 0.0              # ... this target, in the metric's unit (parameters, multiply-
                                          # accumulates per image, ms per batch of the latency table) ...
    cost_weight: float = 1.0              # ... with this weight on max(0, log(expected / target))
    latency_table: str | None = None      # cost=latency: the JSON `aso-se latency` wrote for this network
    # ---- weights
    lr: float = 0.025
    lr_min: float = 0.001
    momentum: float = 0.9
    weight_decay: float = 3e-4
    grad_clip: float = 5.0
    bn_recalibrate: int = 0               # batches of train data to re-estimate BN stats before val eval
    # ---- phases (epochs)
    warmup_epochs: float = 1
    search_epochs: float = 2
    growth_epochs: float = 0
    optimize_epochs: float = 2
    steps_per_epoch: int = 0              # >0: an epoch is this many weight steps (search phases)
    # ---- optimize phase
    optimize_init: str = "supernet"       # supernet: start from the supernet's weights | fresh
    optimize_data: str = "train+val"      # train+val: the whole official training set | train
    optimize_stem_stride: int = 0         # >0: train the derived network with this stem stride (search proxy
                                          # at low resolution, final network at full resolution); 0: as searched
    optimize_channels: int = 0            # >0: the derived network's C (fresh init only; search narrow, train
                                          # wide as DARTS does); 0: the supernet's (grown) width
    optimize_batch_size: int = 128
    optimize_lr: float = 0.05
    optimize_weight_decay: float = 3e-4
    label_smoothing: float = 0.0
    drop_path: float = 0.0
    test_flip: bool = False               # final test of the derived network: mean logits of image and mirror
    # ---- growth
    grow_every: int = 1                   # epochs between scheduled growth events (0: none scheduled)
    grow_min_delta: float = 0.002         # plateau: val accuracy gains less than this ...
    grow_patience: int = 2                # ... over this many epochs
    grow_kinds: str = "depth,width"       # events alternate through these
    grow_width_factor: float = 1.5
    max_cells: int = 12
    max_channels: int = 64
    max_params: int = 5_000_000
    # ---- engine
    device: str = "auto"                  # auto | cpu | cuda | cuda:N
    compile: str = "auto"                 # auto: what measured faster per device and phase | on | static | off
    recompile_limit: int = 64             # torch._dynamo's cache entries per code object: the per-op graphs
                                          # share one (nn.Module.__call__), one entry per op variant
    nvtx: bool = False
    deterministic: bool = False           # CUDA: deterministic kernels, so reruns and resumes are bit-identical
                                          # there too (slower; the CPU is deterministic anyway)
    nan_limit: int = 20                   # non-finite losses tolerated (skipped) before the run stops
    seed: int = 0
    log_interval: float = 0.5             # seconds between progress-bar refreshes
    # ---- ranks (torchrun; ignored on one rank)
    eval_sharding: str = "shard"          # shard: each rank evaluates its share, the counts summed | full: every
                                          # rank evaluates the whole split (measured: README "Many devices")
    sync_bn: bool = False                 # optimize phase: BatchNorm statistics over the batches of all ranks
    grad_sync: str = "allreduce"          # allreduce: one flattened all_reduce per step (compiles) | ddp:
                                          # DistributedDataParallel, eager (measured: README "Many devices")

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict, source: str = "config") -> "Config":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown config field(s) {', '.join(unknown)}")
        cfg = cls(**data)
        cfg.validate()
        return cfg

    def override(self, assignments: list[str]) -> "Config":
        """Apply `key=value` strings (from `--set`), parsed by the field's type."""
        types = {f.name: f.type for f in fields(self)}
        out = dataclasses.replace(self)
        for item in assignments:
            if "=" not in item:
                raise ConfigError(f"--set {item!r}: expected key=value")
            key, raw = item.split("=", 1)
            key = key.strip().replace("-", "_")
            if key not in types:
                raise ConfigError(f"--set {key}: unknown config field; see `aso-se search --help` for the list")
            setattr(out, key, _parse(key, raw.strip(), types[key]))
        out.validate()
        return out

    def derivation_caps(self) -> dict:
        """The caps of the genotype derivation (Genotype.from_probabilities' keywords): None where -1, no cap."""
        caps = {k: getattr(self, k) for k in ("max_skip", "max_skip_reduce", "max_param_free", "max_param_free_reduce")}
        return {k: None if v < 0 else v for k, v in caps.items()}

    def derived_shape(self) -> dict:
        """The derived network's stem stride and width, as `network.derive` and `network.derived_spec` take them
        (None: the supernet's)."""
        return {"stem_stride": self.optimize_stem_stride or None, "channels": self.optimize_channels or None}

    def validate(self) -> None:
        def need(cond: bool, field_: str, why: str) -> None:
            if not cond:
                raise ConfigError(f"config field {field_}={getattr(self, field_)!r}: {why}")

        from .data import DATASETS, LOADERS
        need(self.dataset in DATASETS, "dataset", f"choose one of {', '.join(DATASETS)}")
        need(self.loader in LOADERS, "loader", f"choose one of {', '.join(LOADERS)}")
        need(self.curriculum == "" or self.curriculum in DATASETS, "curriculum",
             f"choose one of {', '.join(DATASETS)}, or leave it empty")
        need(self.curriculum != "imagefolder", "curriculum",
             "a curriculum is read from its data set's default place, and imagefolder has none")
        need(isinstance(self.curriculum_epochs, int) and self.curriculum_epochs >= 0, "curriculum_epochs",
             "a whole number of epochs, 0 or more")
        need(bool(self.curriculum) == (self.curriculum_epochs > 0), "curriculum_epochs",
             "set both curriculum and curriculum_epochs (> 0), or neither")
        supernet_epochs = sum(math.ceil(getattr(self, f"{p}_epochs")) for p in ("warmup", "search", "growth"))
        need(self.curriculum_epochs == 0 or self.curriculum_epochs < supernet_epochs, "curriculum_epochs",
             f"must be under the supernet's {supernet_epochs} epochs (warmup + search + growth), or the search "
             f"never sees dataset={self.dataset}")
        need(0.0 <= self.val_fraction < 1.0, "val_fraction", "must be in [0, 1)")
        for name in ("batch_size", "eval_batch_size", "optimize_batch_size", "channels", "layers", "nodes",
                     "stem_multiplier", "arch_every", "synthetic_size", "synthetic_channels",
                     "synthetic_train", "synthetic_test", "max_cells", "max_channels", "max_params"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) > 0, name, "must be a positive integer")
        need(self.channels % 2 == 0, "channels", "must be even (factorized reductions split channels in two)")
        need(self.stem_stride in (1, 2), "stem_stride", "must be 1 or 2")
        need(self.crop_pad >= -1, "crop_pad", "must be -1 (the data set's default) or a padding in px")
        need(self.optimize_stem_stride in (0, 1, 2), "optimize_stem_stride", "must be 0 (as searched), 1 or 2")
        need(self.optimize_channels >= 0 and self.optimize_channels % 2 == 0, "optimize_channels",
             "must be 0 (the supernet's width) or an even channel count")
        need(self.optimize_channels == 0 or self.optimize_init == "fresh", "optimize_channels",
             "a derived network of another width starts from a fresh init: add --set optimize_init=fresh")
        need(self.image_size >= 4, "image_size", "the side images are resized to: at least 4 px")
        need(0.0 < self.holdout_fraction < 1.0, "holdout_fraction", "a share of the training images: in (0, 1)")
        need(self.max_skip >= -1, "max_skip", "must be -1 (no cap) or a count")
        need(self.max_skip_reduce >= -1, "max_skip_reduce", "must be -1 (no cap) or a count")
        need(self.max_param_free >= -1, "max_param_free", "must be -1 (no cap) or a count")
        need(self.max_param_free_reduce >= -1, "max_param_free_reduce", "must be -1 (no cap) or a count")
        for name in ("warmup_epochs", "search_epochs", "growth_epochs", "optimize_epochs"):
            need(getattr(self, name) >= 0, name, "a phase budget cannot be negative")
        for name in ("train_subset", "eval_samples", "steps_per_epoch", "grow_every", "grow_patience",
                     "bn_recalibrate", "nan_limit", "recompile_limit"):
            need(getattr(self, name) >= 0, name, "cannot be negative")
        for name in ("skip_threshold", "dominant_threshold", "keep_threshold"):
            need(0.0 <= getattr(self, name) <= 1.0, name, "thresholds are weights: must be in [0, 1]")
        need(self.tau_max > 0 and self.tau_min > 0, "tau_min", "temperatures must be positive")
        need(self.tau_min <= self.tau_max, "tau_min", f"must not exceed tau_max={self.tau_max}")
        need(self.tau_schedule in ("exp", "linear"), "tau_schedule", "choose exp or linear")
        for name in ("search_tau_start", "growth_tau_start"):
            need(getattr(self, name) is None or getattr(self, name) > 0, name, "must be positive")
        for name in ("lr", "optimize_lr", "arch_lr"):
            need(getattr(self, name) > 0, name, "learning rates must be positive")
        need(0 <= self.lr_min <= self.lr, "lr_min", f"must be in [0, lr={self.lr}]")
        need(self.handover_epochs >= 0, "handover_epochs", "cannot be negative")
        need(self.arch_start_epochs >= 0, "arch_start_epochs", "cannot be negative")
        need(self.search_epochs == 0 or self.arch_start_epochs <= self.search_epochs, "arch_start_epochs",
             f"must be in [0, search_epochs={self.search_epochs}]")
        for name in ("init_std", "weight_decay", "optimize_weight_decay", "arch_weight_decay", "grad_clip",
                     "logit_noise", "grow_min_delta"):
            need(getattr(self, name) >= 0, name, "cannot be negative")
        need(0 <= self.momentum < 1, "momentum", "must be in [0, 1)")
        need(0 <= self.drop_path < 1, "drop_path", "must be in [0, 1)")
        need(0 <= self.label_smoothing < 1, "label_smoothing", "must be in [0, 1)")
        need(self.optimize_init in ("supernet", "fresh"), "optimize_init", "choose supernet or fresh")
        need(self.optimize_data in ("train", "train+val"), "optimize_data", "choose train or train+val")
        need(self.compile in ("auto", "on", "static", "off"), "compile", "choose auto, on, static or off")
        need(self.eval_sharding in ("shard", "full"), "eval_sharding", "choose shard or full")
        need(self.grad_sync in ("allreduce", "ddp"), "grad_sync", "choose allreduce or ddp")
        need(self.grow_width_factor > 1.0, "grow_width_factor", "must be > 1")
        kinds = [k for k in self.grow_kinds.split(",") if k]
        need(bool(kinds) and all(k in ("depth", "width") for k in kinds), "grow_kinds",
             "a comma-separated list of depth, width")
        need(self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"), "device",
             "choose auto, cpu, cuda or cuda:N")
        need(self.cost in ("off", "params", "macs", "latency"), "cost", "choose off, params, macs or latency")
        need(self.cost == "off" or self.cost_target > 0, "cost_target",
             f"cost={self.cost} needs a positive target in its unit: add --set cost_target=...")
        need(self.cost_weight >= 0, "cost_weight", "cannot be negative")
        need(self.cost != "latency" or bool(self.latency_table), "latency_table",
             "cost=latency needs a table: write one with `aso-se latency --preset NAME --out FILE` (the same "
             "--set options as the search) and add --set latency_table=FILE")
        from .arch import parse_logit_prior
        parse_logit_prior(self.logit_prior)  # a ConfigError naming the bad part
        if self.search_epochs + self.growth_epochs > 0:
            need(self.val_fraction > 0, "val_fraction", "search needs a val split for architecture steps")


_BOOL = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False, "off": False}


def _parse(key: str, raw: str, type_: str):
    t = str(type_)
    if raw.lower() in ("none", "null") and "None" in t:
        return None
    try:
        if t.startswith("bool"):
            if raw.lower() not in _BOOL:
                raise ValueError
            return _BOOL[raw.lower()]
        if t.startswith("int"):
            return int(raw.replace("_", ""))
        if t.startswith("float"):
            return float(raw)
        return raw
    except ValueError:
        raise ConfigError(f"--set {key}={raw}: expected {t.split(' ')[0]}") from None


PRESETS: dict[str, dict] = {
    # The main job: all four phases on Fashion-MNIST within 15 minutes on a 2-core CPU; every choice below was
    # measured on this machine (README "Does the search help?" and "How the main job fits").
    # Search: a low-resolution proxy (stem stride 2: 14x14 cells, C=6, 5 cells), widened once to C=8 by growth.
    #   Against the collapse to parameter-free cells: the first half search epoch trains weights alone on
    #   sampled architectures (every op trains before ops are compared; without it the normal cell ended 7/8
    #   avg_pool), the logits then move at arch_lr 1e-2 (at 3e-3 one epoch left them at their init), the skip
    #   prior at init is halved (at 1.0 it outweighed what the search learned in the reduction cell), and the
    #   P-DARTS skip cap holds in both cells. The logits start close together (init_std 0.1, not 0.5): at 0.5 the
    #   init noise outweighed what 78-234 architecture steps learn, so the argmax architecture at the switch was
    #   a random one of barely trained ops (val 4-19 points below warmup's over seeds 0-3; at 0.1: -1 to +1).
    # Optimize: the derived genotype, fresh init, searched narrow and trained wide (C=16), at the search's
    #   resolution (a 28x28 network costs 4.5x per image: C=8 there reached 91.10% in 4 epochs, C=16 at 14x14
    #   92.28% in 10), flips but no random crop (with it the network still underfits after 10 epochs: 92.28%
    #   against 93.44% without), label smoothing, optimize_lr 0.1 (93.51%; 0.05: 93.44%, one run each, within
    #   noise), flip TTA at test (+0.15). 8 epochs, not 10: the 2-core machines differ (84 s per optimize epoch
    #   on the slower ones, 2m19s for the search part; 10 epochs came to about 16.5 minutes there).
    "fashion-mnist": dict(image_size=28, channels=6, layers=5, stem_stride=2, batch_size=64, flip=True,
                          warmup_epochs=1, search_epochs=1, growth_epochs=0.5, optimize_epochs=8, crop_pad=0,
                          grow_kinds="width", grow_width_factor=1.3, max_channels=8,
                          init_std=0.1, skip_init=0.5, max_skip_reduce=2, max_param_free=2, arch_start_epochs=0.5,
                          arch_lr=1e-2, arch_weight_decay=0.0, bn_recalibrate=10,
                          eval_samples=5000, optimize_init="fresh", optimize_channels=16, optimize_batch_size=128,
                          optimize_lr=0.1, label_smoothing=0.1, test_flip=True),
    # DARTS-sized search for a GPU: 16 channels, 8 cells, batch 64, phases 15 / 25 / 30 / 15 epochs.
    "cifar10": dict(dataset="cifar10", channels=16, layers=8, batch_size=64, warmup_epochs=15, search_epochs=25,
                    growth_epochs=30, optimize_epochs=15, optimize_batch_size=96, optimize_lr=0.025,
                    drop_path=0.2, max_channels=36, max_cells=14),
    # Planted tasks (engine/data/planted.py; --set dataset=planted-lag-checker|planted-polarity|
    # planted-polarity-near for the others):
    # two classes that only one op family tells apart, 4096 training images (16x16 and 20x20), a 3-cell supernet
    # of C=8, no derivation caps (a capped family share would be the cap's). Each training of a genotype (the
    # optimize phase alone, 2 epochs) takes 5-20 s on the 2-core CPU; docs/planted-tasks.md.
    "planted": dict(dataset="planted-lag", synthetic_train=4096, synthetic_test=1024,
                    channels=8, layers=3, batch_size=64, eval_batch_size=256, warmup_epochs=1, search_epochs=2,
                    growth_epochs=0, optimize_epochs=2, optimize_init="fresh", optimize_batch_size=64,
                    lr=0.05, optimize_lr=0.05, loader="tensor", max_skip=-1),
    # Synthetic data, tiny network: the whole pipeline in well under a minute.
    "smoke": dict(dataset="synthetic", synthetic_size=12, image_size=12, synthetic_train=512, synthetic_test=256,
                  channels=4, layers=3, batch_size=32, eval_batch_size=128, optimize_batch_size=32, warmup_epochs=1,
                  search_epochs=1, growth_epochs=1, optimize_epochs=1, lr=0.05, optimize_lr=0.05,
                  arch_lr=3e-3, loader="tensor", max_channels=8, max_cells=5,
                  deterministic=True),  # the tests compare runs bit for bit, on a GPU too
}


def preset(name: str) -> Config:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    cfg = Config(**PRESETS[name])
    cfg.validate()
    return cfg


def load_config_file(path: str) -> Config:
    try:
        with open(path) as f:
            return Config.from_json(json.load(f), path)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    except TypeError as e:
        raise ConfigError(f"{path}: {e}") from None
