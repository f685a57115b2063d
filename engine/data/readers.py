"""Dataset readers: Fashion-MNIST idx files, CIFAR-10 python batches, ImageFolder directories (decoded by DALI,
cached: imagefolder.py), the planted tasks and a seeded synthetic set.

Every reader returns a `Dataset` holding uint8 NHWC images and int64 labels for the official train and
test sets, plus the per-channel mean/std of the official training images (0-255 units). Bad files stop
with a `DataError` that names the file and the fix.
"""
from __future__ import annotations

import gzip
import os
import pickle
import struct
from dataclasses import dataclass

import numpy as np

from ..errors import DataError
from .planted import PLANTED, make_planted
from .stats import channel_stats

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")
DATASETS = ("fashion-mnist", "cifar10", "imagefolder", "synthetic", *PLANTED)


@dataclass
class Dataset:
    name: str
    train_images: np.ndarray  # (N, H, W, C) uint8, the official training set
    train_labels: np.ndarray  # (N,) int64
    test_images: np.ndarray   # (M, H, W, C) uint8, the official test set: never used for search decisions
    test_labels: np.ndarray   # (M,) int64
    classes: tuple[str, ...]
    mean: tuple[float, ...]   # per channel, 0-255 units, over the official training images
    std: tuple[float, ...]
    pad: int                  # zero padding of the random crop (4 px at 32x32, 2 px at 28x28)
    flip: bool                # horizontal flip on by default for this data set
    source: dict | None = None  # imagefolder: where the arrays came from (the folder, the cache, seconds taken)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the tensors the loaders produce."""
        _, h, w, c = self.train_images.shape
        return (c, h, w)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


# ---------------------------------------------------------------------------------------- Fashion-MNIST
_IDX_MAGIC = {"images": (0x08, 3), "labels": (0x08, 1)}  # (dtype code: ubyte, number of dims)


def read_idx(path: str, kind: str) -> np.ndarray:
    """Read one idx file (plain or .gz) as a uint8 array; `kind` is "images" or "labels"."""
    try:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError; a cut .gz raises EOFError
        raise DataError(f"{path}: cannot read idx file ({e}); re-install the data set "
                        f"(apt-get install --reinstall dataset-fashion-mnist) or fix --data-dir") from None
    want_dtype, want_ndim = _IDX_MAGIC[kind]
    if len(data) < 4 or data[0:2] != b"\x00\x00" or data[2] != want_dtype or data[3] != want_ndim:
        got = data[:4].hex() if len(data) >= 4 else "too short"
        raise DataError(f"{path}: wrong idx magic ({got}, expected 0000{want_dtype:02x}{want_ndim:02x} for "
                        f"{kind}); this is not a Fashion-MNIST {kind} file")
    header = 4 + 4 * want_ndim
    if len(data) < header:
        raise DataError(f"{path}: truncated idx header; re-install the data set")
    dims = struct.unpack(">" + "I" * want_ndim, data[4:header])
    expected = int(np.prod(dims))
    if len(data) - header != expected:
        raise DataError(f"{path}: truncated or padded idx file ({len(data) - header} bytes of data, header "
                        f"says {expected} for shape {dims}); re-install the data set")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def _find_idx(data_dir: str, stem: str) -> str:
    for name in (stem + ".gz", stem):
        path = os.path.join(data_dir, name)
        if os.path.exists(path):
            return path
    raise DataError(f"{os.path.join(data_dir, stem)}[.gz] not found; install Fashion-MNIST with "
                    f"`apt-get install dataset-fashion-mnist` or pass --data-dir DIR holding the idx files")


def read_fashion_mnist(data_dir: str | None = None) -> Dataset:
    data_dir = data_dir or FASHION_MNIST_DIR
    if not os.path.isdir(data_dir):
        raise DataError(f"Fashion-MNIST directory {data_dir} does not exist; install it with "
                        f"`apt-get install dataset-fashion-mnist` or pass --data-dir DIR")
    parts = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = read_idx(_find_idx(data_dir, f"{prefix}-images-idx3-ubyte"), "images")
        labels_path = _find_idx(data_dir, f"{prefix}-labels-idx1-ubyte")
        labels = read_idx(labels_path, "labels")
        if len(images) != len(labels):
            raise DataError(f"{labels_path}: {len(labels)} labels for {len(images)} images; "
                            f"the {split} files do not belong together")
        if labels.max(initial=0) >= 10:
            raise DataError(f"{labels_path}: label {int(labels.max())} outside 0..9; not a Fashion-MNIST file")
        parts[split] = (images[..., None], labels.astype(np.int64))  # (N, 28, 28, 1)
    mean, std = channel_stats(parts["train"][0])
    return Dataset("fashion-mnist", *parts["train"], *parts["test"], FASHION_MNIST_CLASSES,
                   mean, std, pad=2, flip=False)


# ------------------------------------------------------------------------------------------- CIFAR-10
class _NumpyOnlyUnpickler(pickle.Unpickler):
    """CIFAR batches are pickles: allow only the numpy reconstructors they need, never arbitrary code."""

    SAFE = {("builtins", "list"), ("builtins", "dict"), ("__builtin__", "list"), ("__builtin__", "dict"),
            ("_codecs", "encode")}  # protocol-2 pickles written by Python 3 encode bytes through _codecs.encode

    def find_class(self, module, name):
        if module.split(".")[0] == "numpy" or (module, name) in self.SAFE:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def read_cifar_batch(path: str) -> tuple[np.ndarray, np.ndarray]:
    """One `data_batch_k` / `test_batch` file -> (N, 32, 32, 3) uint8, (N,) int64."""
    if not os.path.isfile(path):
        raise DataError(f"{path} not found; point --data-dir at the extracted cifar-10-batches-py directory")
    try:
        with open(path, "rb") as f:
            batch = _NumpyOnlyUnpickler(f, encoding="bytes").load()
    except Exception as e:  # truncated, not a pickle, or a forbidden class: all mean "not a CIFAR batch"
        raise DataError(f"{path}: not a readable CIFAR-10 python batch ({type(e).__name__}: {e}); "
                        f"re-extract cifar-10-python.tar.gz") from None
    if not isinstance(batch, dict):
        raise DataError(f"{path}: expected a dict with b'data' and b'labels', got {type(batch).__name__}")
    data = batch.get(b"data", batch.get("data"))
    labels = batch.get(b"labels", batch.get("labels"))
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        shape = getattr(data, "shape", None)
        raise DataError(f"{path}: b'data' must be a uint8 array of shape (N, 3072), got "
                        f"{getattr(data, 'dtype', type(data).__name__)} {shape}; not a CIFAR-10 batch")
    if labels is None or len(labels) != len(data):
        raise DataError(f"{path}: {0 if labels is None else len(labels)} labels for {len(data)} images")
    labels = np.asarray(labels, dtype=np.int64)
    if labels.min(initial=0) < 0 or labels.max(initial=0) >= 10:
        raise DataError(f"{path}: labels outside 0..9; not a CIFAR-10 batch")
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # CHW planes -> HWC
    return np.ascontiguousarray(images), labels


def read_cifar10(data_dir: str | None = None) -> Dataset:
    if data_dir is None:
        raise DataError("CIFAR-10 needs --data-dir pointing at the extracted cifar-10-batches-py directory")
    nested = os.path.join(data_dir, "cifar-10-batches-py")
    if os.path.isdir(nested):
        data_dir = nested
    if not os.path.isdir(data_dir):
        raise DataError(f"CIFAR-10 directory {data_dir} does not exist; extract cifar-10-python.tar.gz and "
                        f"pass --data-dir DIR")
    train = [read_cifar_batch(os.path.join(data_dir, f"data_batch_{k}")) for k in range(1, 6)]
    test_images, test_labels = read_cifar_batch(os.path.join(data_dir, "test_batch"))
    train_images = np.concatenate([b[0] for b in train])
    train_labels = np.concatenate([b[1] for b in train])
    mean, std = channel_stats(train_images)
    return Dataset("cifar10", train_images, train_labels, test_images, test_labels, CIFAR10_CLASSES,
                   mean, std, pad=4, flip=True)


# ------------------------------------------------------------------------------------------ synthetic
def make_synthetic(n_train: int = 2048, n_test: int = 512, size: int = 16, channels: int = 1,
                   classes: int = 10, seed: int = 0) -> Dataset:
    """Seeded, class-dependent images that a small net learns in one epoch.

    Class c is a grating with its own orientation and period (5 orientations x 2 periods for 10 classes),
    drawn at a random phase and contrast, plus pixel noise; in colour, each channel gets its own gain.
    The class lives in local structure, not position, so even the warmup network (every edge
    skip_connect: a 3x3 stem, 1x1 convs and global pooling) separates the classes.
    """
    rng = np.random.default_rng(seed)
    orientations = max(1, (classes + 1) // 2)
    yy, xx = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    gains = rng.uniform(0.5, 1.0, (classes, channels))

    def sample(n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = rng.integers(0, classes, n)
        theta = np.pi * (labels % orientations) / orientations
        period = np.where(labels < orientations, 3.0, 6.0)
        phase = rng.uniform(0, 2 * np.pi, n)
        contrast = rng.uniform(0.6, 1.0, n)
        proj = (np.cos(theta)[:, None, None] * xx + np.sin(theta)[:, None, None] * yy)   # (n, size, size)
        wave = np.sin(2 * np.pi * proj / period[:, None, None] + phase[:, None, None]) * contrast[:, None, None]
        images = 128 + 90 * wave[..., None] * gains[labels][:, None, None, :]
        images += rng.normal(0, 25, images.shape)
        return np.clip(images, 0, 255).astype(np.uint8), labels.astype(np.int64)

    train_images, train_labels = sample(n_train)
    test_images, test_labels = sample(n_test)
    mean, std = channel_stats(train_images)
    return Dataset("synthetic", train_images, train_labels, test_images, test_labels,
                   tuple(f"class{c}" for c in range(classes)), mean, std, pad=2, flip=False)


def read_planted(name: str, n_train: int, n_test: int) -> Dataset:
    """A planted task (engine/data/planted.py): two classes whose difference only one op family can see. Its
    sample counts are the synthetic_train / synthetic_test config fields, its image size its own (part of its
    design); its images do not depend on the run's seed."""
    train_images, train_labels, test_images, test_labels = make_planted(name, n_train, n_test)
    mean, std = channel_stats(train_images)
    return Dataset(name, train_images, train_labels, test_images, test_labels, ("class0", "class1"),
                   mean, std, pad=0, flip=False)


def read_images(data_dir: str | None, image_size: int = 32, cache_dir: str | None = None,
                skip_bad_images: bool = False, holdout_fraction: float = 0.1, holdout_seed: int = 0,
                device: str = "cpu") -> Dataset:
    """An ImageFolder directory (engine/data/imagefolder.py): decoded once by DALI, cached, memory-mapped. Random
    crops pad 1/8 of the side rounded down to even (2 px at 28, 4 at 32); flips on (natural images)."""
    if data_dir is None:
        raise DataError("imagefolder needs --data-dir PATH, a folder holding train/<class>/<images> "
                        "(and test/<class>/...)")
    from .imagefolder import read_imagefolder
    d = read_imagefolder(data_dir, image_size, cache_dir, skip_bad_images, holdout_fraction, holdout_seed, device)
    return Dataset("imagefolder", d["train_images"], d["train_labels"], d["test_images"], d["test_labels"],
                   tuple(d["classes"]), tuple(d["mean"]), tuple(d["std"]), pad=2 * (image_size // 16), flip=True,
                   source={k: d[k] for k in ("path", "cached", "cache", "seconds", "skipped", "holdout", "channels")})


def load_dataset(name: str, data_dir: str | None = None, images: dict | None = None,
                 **synthetic_kwargs) -> Dataset:
    """`name` is one of DATASETS; `images` (read_images' keyword arguments) applies to imagefolder only;
    `synthetic_kwargs` (n_train, n_test, size, channels, classes, seed) to the synthetic set, n_train and n_test
    to the planted ones."""
    if name == "fashion-mnist":
        return read_fashion_mnist(data_dir)
    if name == "cifar10":
        return read_cifar10(data_dir)
    if name == "imagefolder":
        return read_images(data_dir, **(images or {}))
    if name == "synthetic":
        return make_synthetic(**synthetic_kwargs)
    if name in PLANTED:
        return read_planted(name, synthetic_kwargs.get("n_train", 4096), synthetic_kwargs.get("n_test", 1024))
    raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
