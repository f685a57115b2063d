"""Loading a run's data and models outside the training loop: `aso-se eval` and the trainer share these."""
from __future__ import annotations

import numpy as np
import torch

from .arch import Architecture, Genotype
from .checkpoint import load_checkpoint
from .config import Config
from .data import Dataset, load_dataset, make_loader, make_splits, train_augment
from .errors import CheckpointError
from .network import NetSpec, Network, count_parameters
from .steps import Steps


def load_data(cfg: Config) -> Dataset:
    """The config's data set, cut to `train_subset` samples of the official training set when set."""
    dataset = load_dataset(cfg.dataset, cfg.data_dir, n_train=cfg.synthetic_train, n_test=cfg.synthetic_test,
                           size=cfg.synthetic_size, channels=cfg.synthetic_channels, seed=cfg.seed)
    if cfg.train_subset and cfg.train_subset < len(dataset.train_labels):
        keep = np.sort(np.random.default_rng([cfg.seed, 7]).permutation(len(dataset.train_labels))[:cfg.train_subset])
        dataset.train_images = dataset.train_images[keep]
        dataset.train_labels = dataset.train_labels[keep]
    return dataset


def build_architecture(cfg: Config, device: torch.device | str = "cpu") -> Architecture:
    """The architecture manager a config describes (used by the trainer and by `aso-se eval`)."""
    return Architecture(cfg.nodes, init_std=cfg.init_std, none_init=cfg.none_init, skip_init=cfg.skip_init,
                        hard=cfg.hard, skip_threshold=cfg.skip_threshold, dominant_threshold=cfg.dominant_threshold,
                        keep_threshold=cfg.keep_threshold, max_skip=None if cfg.max_skip < 0 else cfg.max_skip,
                        max_skip_reduce=None if cfg.max_skip_reduce < 0 else cfg.max_skip_reduce,
                        seed=cfg.seed).to(device)


def evaluate_checkpoint(path: str, split: str = "test", device: str = "auto", data_dir: str | None = None) -> dict:
    from .trainer import resolve_device
    state = load_checkpoint(path)
    cfg = Config.from_json(state["config"], path)
    if data_dir is not None:
        cfg.data_dir = data_dir
    dev = resolve_device(device)
    dataset = load_data(cfg)
    x, y = make_splits(dataset, cfg.val_fraction, cfg.seed)[split]
    loader = make_loader(cfg.loader, x, y, cfg.eval_batch_size, train=False, augment=train_augment(dataset),
                         device=dev, seed=cfg.seed)
    try:
        spec = NetSpec.from_json(state["spec"])
        if state.get("final_net") is not None:
            net = Network(spec, Genotype.from_json(state["final_genotype"], path)).to(dev)
            net.load_state_dict(state["final_net"])
            steps, phase, which = Steps(net, torch.optim.SGD(net.parameters(), lr=0.0)), None, "derived network"
        else:
            net = Network(spec).to(dev)
            net.load_state_dict(state["supernet"])
            arch = build_architecture(cfg, dev)
            arch.load_state_dict(state["arch"])
            steps = Steps(net, torch.optim.SGD(net.parameters(), lr=0.0), arch=arch)
            phase, which = "derive", "genotype inside the supernet"
    except (RuntimeError, KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: incompatible checkpoint ({str(e).splitlines()[0][:160]})") from None
    # the derived network is tested as the run tested it (flip TTA when the config asks for it)
    loss, acc = steps.evaluate(loader, phase, flip=cfg.test_flip and phase is None)
    return {"checkpoint": path, "split": split, "model": which, "samples": len(y), "loss": round(loss, 5),
            "accuracy": round(acc, 5), "params": count_parameters(net)}
