"""Planted tasks: seeded image sets whose answer is known, to test whether the search finds an op family.

The macro-architecture around the searched cells (a learned 3x3 stem, a learned 1x1 conv on every cell input,
global average pooling before the classifier) solves any signal a 3x3 window holds before a searched op sees it:
on such a task every op does as well as every other, skip_connect included. So the class of a planted task
lives in how things far apart relate, and each task is built so that one op family can compute that relation
and the others cannot:

    planted-lag       noise plus the same noise shifted 6 px along a row (class 0) or a column (class 1). The
                      only structure is a correlation at lag 6: a linear filter spanning the lag sees it (the
                      family: convolutions); pooling rectified features blurs it away.
    planted-lag-checker  planted-lag with the copy's sign alternating like a checkerboard, (-1)^(y+x): the lag-6
                      correlation is +1 on one parity of pixels and -1 on the other. planted-lag leaks: a filter's
                      rectified energy, pooled, differs a little between the classes, and avg pooling learned it to
                      71% on one training seed. Here every average over the image cancels; a convolution can
                      undo the alternation (a filter spanning the lag, then one alternating in sign, or a stride-2
                      read of one parity), a pool cannot.
    planted-polarity  two dots 9 to 12 px apart (along a row, a column or a diagonal), each bright or dark;
                      class 1 when their polarities differ. A global count of bright and dark dots cannot
                      tell (2 bright or 2 dark against 1 of each is an XOR of the counts); max pooling grows
                      each dot into a box until the two meet, and a 1x1 conv then reads "a bright box meets a
                      dark one" (the family: max_pool_3x3). Convolutions would have to learn the XOR across
                      12 px from scratch.
    planted-polarity-near  planted-polarity with the dots 4 to 6 px apart. The stem's 3x3 window still cannot
                      hold both dots, and the convolutions stay near chance (they would have to learn the XOR at
                      the pair's exact offsets); one or two max pools at full resolution make the two boxes meet.
                      Far dots need max pools on nearly every reduction edge at once, which sampled architectures
                      almost never are, so a supernet stays at chance on planted-polarity; here a few max pools
                      anywhere in the normal cell start to help, and the search has a gradient to follow.

The designs that failed (a pair of dots side by side or one above the other, a faint line in noise, a bright
and a dark dot in mirror order, the lag at 4 px or with a weaker correlation) are in docs/planted-tasks.md with
what the homogeneous genotypes reached on them.

The images do not depend on the run's seed: a training seed must change the training, not the task.
"""
from __future__ import annotations

import numpy as np

PLANTED_SEED = 20261205     # the tasks' own seed: fixed, so that every run sees the same images
CONVOLUTIONS = ("sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5")


def lag(rng: np.random.Generator, n: int, size: int, shift: int = 6, checker: bool = False
        ) -> tuple[np.ndarray, np.ndarray]:
    """(n, size, size) float images around 128 and their labels: noise plus itself shifted `shift` px along a
    row (0) or a column (1); with `checker`, the shifted copy times (-1)^(y+x)."""
    labels = rng.integers(0, 2, n)
    noise = rng.normal(0.0, 1.0, (n, size + shift, size + shift))
    sign = checkerboard(size) if checker else 1.0
    images = np.empty((n, size, size))
    for i in range(n):
        dy, dx = (0, shift) if labels[i] == 0 else (shift, 0)
        images[i] = noise[i, :size, :size] + sign * noise[i, dy:dy + size, dx:dx + size]
    return 128.0 + 30.0 * images, labels


def checker_lag(rng: np.random.Generator, n: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """planted-lag-checker: `lag` with the shifted copy's sign alternating like a checkerboard."""
    return lag(rng, n, size, checker=True)


def checkerboard(size: int) -> np.ndarray:
    """(size, size): +1 where y + x is even, -1 where it is odd."""
    yy, xx = np.mgrid[:size, :size]
    return np.where((yy + xx) % 2 == 0, 1.0, -1.0)


def polarity(rng: np.random.Generator, n: int, size: int, near: int = 9, far: int = 12) -> tuple[np.ndarray, np.ndarray]:
    """Noise (mean 128, sd 20) with two dots `near` to `far` px apart, each 255 or 0 at random; label 1 when
    they differ."""
    labels = rng.integers(0, 2, n)
    images = rng.normal(128.0, 20.0, (n, size, size))
    for i in range(n):
        d = int(rng.integers(near, far + 1))
        y, x = (int(v) for v in rng.integers(0, size - d, 2))
        dy, dx = ((0, d), (d, 0), (d, d))[int(rng.integers(0, 3))]
        first = int(rng.integers(0, 2))
        second = first ^ int(labels[i])
        images[i, y, x] = 255.0 * first
        images[i, y + dy, x + dx] = 255.0 * second
    return images, labels


def near_polarity(rng: np.random.Generator, n: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """planted-polarity-near: `polarity` with the dots 4 to 6 px apart."""
    return polarity(rng, n, size, near=4, far=6)


# name -> (generator, the planted op family, the image size the family was measured at, the task's own seed: a
# new task gets a new one, so that adding a task never changes another one's images)
PLANTED = {"planted-lag": (lag, CONVOLUTIONS, 16, 0), "planted-polarity": (polarity, ("max_pool_3x3",), 20, 1),
           "planted-lag-checker": (checker_lag, CONVOLUTIONS, 16, 2),
           "planted-polarity-near": (near_polarity, ("max_pool_3x3",), 20, 3)}


def make_planted(name: str, n_train: int, n_test: int, size: int | None = None):
    """(train_images, train_labels, test_images, test_labels) of a planted task: (N, S, S, 1) uint8 and int64.
    `size` None: the size the task was measured at."""
    gen, _, default_size, seed = PLANTED[name]
    rng = np.random.default_rng([PLANTED_SEED, seed])
    out = []
    for n in (n_train, n_test):
        images, labels = gen(rng, n, size or default_size)
        out += [np.clip(np.rint(images), 0, 255).astype(np.uint8)[..., None], labels.astype(np.int64)]
    return tuple(out)
