"""Data layer: readers (uint8 NHWC + int64 labels), deterministic splits, and the loaders that feed steps.

    dataset = load_dataset("fashion-mnist")
    splits = make_splits(dataset, val_fraction=0.5, seed=0)       # train / val / test
    loader = make_loader("dali", *splits["train"], 64, train=True, augment=train_augment(dataset))
"""
from __future__ import annotations

import numpy as np

from .loaders import (LOADERS, Augment, Batch, Cycle, DaliLoader, EpochPlan, TensorLoader, TorchLoader,
                      augment_reference, make_loader, num_batches, split_indices)
from .readers import (DATASETS, FASHION_MNIST_DIR, Dataset, load_dataset, make_synthetic, read_cifar10,
                      read_cifar_batch, read_fashion_mnist, read_idx)
from .stats import channel_stats


def make_splits(dataset: Dataset, val_fraction: float, seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """train and val: a seeded, disjoint split of the official training set (DARTS uses half for
    architecture steps); test: the official test set, never used for a search decision."""
    train_idx, val_idx = split_indices(len(dataset.train_labels), val_fraction, seed)
    return {
        "train": (dataset.train_images[train_idx], dataset.train_labels[train_idx]),
        "val": (dataset.train_images[val_idx], dataset.train_labels[val_idx]),
        "test": (dataset.test_images, dataset.test_labels),
    }


def train_augment(dataset: Dataset, flip: bool | None = None, pad: int = -1) -> Augment:
    """The data set's training augmentation; `flip=None` and `pad=-1` take the data set's defaults."""
    return Augment(dataset.mean, dataset.std, pad=dataset.pad if pad < 0 else pad,
                   flip=dataset.flip if flip is None else flip)


def describe(dataset: Dataset, val_fraction: float, seed: int, batch_size: int | None = None) -> str:
    """Human-readable summary: split sizes, image shape, classes, per-channel mean/std, and with `batch_size`
    the batches per epoch of each split (training drops the last partial batch, evaluation keeps it)."""
    splits = make_splits(dataset, val_fraction, seed)
    c, h, w = dataset.image_shape
    lines = [f"dataset      {dataset.name}",
             f"image shape  {c}x{h}x{w} (C x H x W), uint8",
             "splits       " + ", ".join(f"{k} {len(v[1])}" for k, v in splits.items())
             + f"  (val = {val_fraction:g} of the official training set, seed {seed})",
             f"classes      {dataset.num_classes}: {', '.join(dataset.classes)}",
             "mean         " + " ".join(f"{m:.3f}" for m in dataset.mean) + "  (0-255, per channel)",
             "std          " + " ".join(f"{s:.3f}" for s in dataset.std),
             f"augment      pad {dataset.pad} px random crop, flip {'on' if dataset.flip else 'off'} by default"]
    if dataset.source:
        src = dataset.source
        how = (f"read from the cache {src['cache']}" if src["cached"] else
               "decoded by DALI" + (f", cached in {src['cache']}" if src["cache"] else ", not cached"))
        lines.append(f"source       {src['path']}: {how} in {src['seconds']:.2f} s"
                     + (f"; {len(src['skipped'])} bad file(s) skipped" if src["skipped"] else "")
                     + (f"; test = {src['holdout']['fraction']:g} of train held out (seed {src['holdout']['seed']})"
                        if src["holdout"] else ""))
    if batch_size:
        parts = []
        for name, (_, labels) in splits.items():
            n, full = len(labels), len(labels) // batch_size
            parts.append(f"{name} {full} full" + (f" + 1 of {n % batch_size}" if n % batch_size else ""))
        lines.append(f"batches      of {batch_size}: " + ", ".join(parts)
                     + "  (training drops a last partial batch, evaluation keeps it)")
    return "\n".join(lines)


__all__ = ["Augment", "Batch", "Cycle", "DATASETS", "DaliLoader", "Dataset", "EpochPlan", "FASHION_MNIST_DIR", "LOADERS",
           "TensorLoader", "TorchLoader", "augment_reference", "channel_stats", "describe", "load_dataset",
           "make_loader", "make_splits", "make_synthetic", "num_batches", "read_cifar10", "read_cifar_batch",
           "read_fashion_mnist", "read_idx", "split_indices", "train_augment"]
