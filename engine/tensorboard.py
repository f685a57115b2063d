"""`--tensorboard`: the run's records as TensorBoard scalars in RUN/tensorboard/, written as each epoch ends
(`tensorboard --logdir RUN/tensorboard`). Needs the `tensorboard` package (`pip install -e '.[tensorboard]'`).

x axis: the epoch over all phases (`global_epoch`), the one the report's curves use. A resumed run writes a
new event file with `purge_step` at its first redone epoch, so TensorBoard drops the points the checkpoint did
not cover and shows each epoch once.
"""
from __future__ import annotations

import os

from .errors import ConfigError

SCALARS = {"train_loss": "loss/train", "val_loss": "loss/val", "arch_loss": "loss/arch_step",
           "train_acc": "accuracy/train", "val_acc": "accuracy/val", "arch_acc": "accuracy/arch_step",
           "lr": "schedule/lr", "tau": "schedule/temperature", "mean_entropy": "architecture/mean_entropy",
           "it_s": "speed/it_per_s", "images_s": "speed/images_per_s", "params": "network/params"}


class TensorBoardSink:
    def __init__(self, log_dir: str, purge_step: int | None = None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("--tensorboard needs the tensorboard package: pip install tensorboard "
                              "(or pip install -e '.[tensorboard]')") from None
        os.makedirs(log_dir, exist_ok=True)
        self.writer = SummaryWriter(log_dir, purge_step=purge_step)

    def __call__(self, record: dict) -> None:
        if "event" in record:  # growth
            self.writer.add_scalar("network/params", record["params_after"], record["global_epoch"])
            self.writer.add_scalar("growth/max_abs_diff", record["max_abs_diff"], record["global_epoch"])
        elif record.get("phase") == "final":
            self.writer.add_scalar("accuracy/test", record["test_acc"], record["epochs"])
        elif "epoch" in record:
            for key, tag in SCALARS.items():
                if record.get(key) is not None:
                    self.writer.add_scalar(tag, record[key], record["global_epoch"])
            for cell, value in (record.get("param_free") or {}).items():
                self.writer.add_scalar(f"architecture/param_free_{cell}", value, record["global_epoch"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
