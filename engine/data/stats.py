"""Per-channel statistics of uint8 image arrays: what every reader reports as its data set's mean and std."""
from __future__ import annotations

import numpy as np


def channel_stats(images: np.ndarray, chunk: int = 8192) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 NHWC images, accumulated in float64 chunks (no full float copy)."""
    c = images.shape[-1]
    total = np.zeros(c)
    total_sq = np.zeros(c)
    count = 0
    for start in range(0, len(images), chunk):
        block = images[start:start + chunk].reshape(-1, c).astype(np.float64)
        total += block.sum(0)
        total_sq += (block * block).sum(0)
        count += block.shape[0]
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean * mean, 1e-12))
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)
