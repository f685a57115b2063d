"""`aso-se eval`: a checkpoint's network evaluated on a split, built with the run's own builders."""
from __future__ import annotations

import torch

from .genotype import Genotype
from .build import build_architecture, load_data, resolve_device
from .checkpoint import final_spec, load_checkpoint
from .config import Config
from .data import make_loader, make_splits, train_augment
from .errors import CheckpointError
from .network import NetSpec, Network, count_parameters
from .steps import Steps


def supernet_steps(state: dict, cfg: Config, device) -> Steps:
    """Evaluation steps over the supernet and architecture a search checkpoint holds (no weight updates)."""
    net = Network(NetSpec.from_json(state["spec"])).to(device)
    net.load_state_dict(state["supernet"])
    arch = build_architecture(cfg, device)
    arch.load_state_dict(state["arch"])
    return Steps(net, torch.optim.SGD(net.parameters(), lr=0.0), arch=arch)


def evaluate_checkpoint(path: str, split: str = "test", device: str = "auto", data_dir: str | None = None) -> dict:
    state = load_checkpoint(path)
    cfg = Config.from_json(state["config"], path)
    if data_dir is not None:
        cfg.data_dir = data_dir
    dev = resolve_device(device)
    dataset = load_data(cfg, dev)
    x, y = make_splits(dataset, cfg.val_fraction, cfg.seed)[split]
    loader = make_loader(cfg.loader, x, y, cfg.eval_batch_size, train=False, augment=train_augment(dataset),
                         device=dev, seed=cfg.seed)
    try:
        if state.get("final_net") is not None:
            net = Network(final_spec(state, cfg), Genotype.from_json(state["final_genotype"], path)).to(dev)
            net.load_state_dict(state["final_net"])
            steps, phase, which = Steps(net, torch.optim.SGD(net.parameters(), lr=0.0)), None, "derived network"
        else:
            steps, phase, which = supernet_steps(state, cfg, dev), "derive", "genotype inside the supernet"
    except (RuntimeError, KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: incompatible checkpoint ({str(e).splitlines()[0][:160]})") from None
    # the derived network is tested as the run tested it (flip TTA when the config asks for it)
    loss, acc = steps.evaluate(loader, phase, flip=cfg.test_flip and phase is None)
    return {"checkpoint": path, "split": split, "model": which, "samples": len(y), "loss": round(loss, 5),
            "accuracy": round(acc, 5), "params": count_parameters(steps.net)}
