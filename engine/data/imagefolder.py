"""Your own images: an ImageFolder directory decoded once by DALI into the engine's uint8 arrays, cached on disk.

Layout (torchvision's ImageFolder, as timm and NNI read it):

    PATH/train/<class>/<image>      PATH/test/<class>/<image>   (or PATH/val/<class>/...)
    PATH/<class>/<image>            (no train/ folder: PATH itself is the training set)

Classes are the training folder's subfolder names, sorted as torchvision sorts them. Without a test (or val)
folder, a seeded share of each class's training images is held out as the test set (`holdout_fraction`,
`holdout_seed`: both in the run's config). Samples are ordered by file name, then class folder, so a data set
written out with its index as the file name keeps its order (the arrays of Fashion-MNIST written as PNG files
that way equal the idx files').

Decoding: DALI's `fn.decoders.image` (`device="mixed"`, nvJPEG, on a GPU; `"cpu"` otherwise), channels as
the files' headers declare them (all grayscale: 1 channel; otherwise RGB, grayscale, RGBA and CMYK files
converted by the decoder, said once).
An image that is not `image_size` x `image_size` is resized with its shorter side to `image_size` (linear
interpolation with antialiasing) and centre-cropped; one that is already that size is kept as decoded, bit
for bit. A file DALI cannot decode is named (one line, exit 2), or skipped and counted with
`skip_bad_images`.

The cache: the arrays as `.npy` files, memory-mapped, in `cache_dir/imagefolder/<key>/`, where the key
hashes every file's path, size and modification time with the decoding settings: a changed, added or removed
file makes a new entry. Never inside the data folder (refused); a cache folder that cannot be written leaves
the arrays in memory, said once. Nothing under PATH is ever written.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np

from ..errors import DataError
from .decode import DECODE_BATCH, channels_of, decode_files
from .stats import channel_stats

EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".pnm", ".tif", ".tiff", ".webp")
FORMAT = 1            # bump when the cached arrays would change for the same files and settings


def default_cache_dir() -> str:
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "aso-se")


def _say(message: str) -> None:
    print(f"imagefolder: {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------- scan
def _class_dirs(root: str) -> list[str]:
    return sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))


def _images_in(folder: str) -> list[str]:
    names = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        names += [os.path.join(dirpath, f) for f in filenames
                  if not f.startswith(".") and f.lower().endswith(EXTENSIONS)]
    return names


def scan(path: str) -> tuple[list[str], dict[str, list[tuple[str, int]]]]:
    """(classes, {"train": [(file, label)], "test": [...]}); "test" absent when there is no test/val folder.
    Every layout problem is a DataError naming the folder."""
    if not os.path.isdir(path):
        raise DataError(f"imagefolder: {path} is not a directory; pass --data-dir PATH holding "
                        f"train/<class>/<images> (and test/<class>/...)")
    train_root = os.path.join(path, "train") if os.path.isdir(os.path.join(path, "train")) else path
    test_root = next((os.path.join(path, d) for d in ("test", "val") if os.path.isdir(os.path.join(path, d))), None)
    if train_root == path and test_root is not None:
        raise DataError(f"imagefolder: {path} has a {os.path.basename(test_root)}/ folder but no train/ folder; "
                        f"put the training images in {os.path.join(path, 'train')}/<class>/")
    classes = _class_dirs(train_root)
    if not classes:
        raise DataError(f"imagefolder: {train_root} holds no class folders; expected {train_root}/<class>/<images>")
    if len(classes) == 1:
        raise DataError(f"imagefolder: {train_root} has one class folder ({classes[0]}); a classifier needs at "
                        f"least two")
    splits = {"train": _split_files(train_root, classes, strict=True)}
    if test_root is not None:
        extra = sorted(set(_class_dirs(test_root)) - set(classes))
        if extra:
            raise DataError(f"imagefolder: {os.path.join(test_root, extra[0])}: class {extra[0]!r} is not in "
                            f"{train_root} ({len(extra)} such folder(s)); the test classes must be training classes")
        splits["test"] = _split_files(test_root, classes, strict=False)
        if not splits["test"]:
            raise DataError(f"imagefolder: {test_root} holds no images ({', '.join(EXTENSIONS)})")
    return classes, splits


def _split_files(root: str, classes: list[str], strict: bool) -> list[tuple[str, int]]:
    samples = []
    for label, name in enumerate(classes):
        folder = os.path.join(root, name)
        if not os.path.isdir(folder):
            continue  # a test folder may lack a class
        files = _images_in(folder)
        if not files and strict:
            raise DataError(f"imagefolder: {folder} holds no images ({', '.join(EXTENSIONS)}); add some or "
                            f"remove the folder")
        samples += [(f, label) for f in files]
    # by file name, then class: a data set written with its index as the file name keeps its order
    samples.sort(key=lambda s: (os.path.basename(s[0]), s[1], s[0]))
    return samples


def holdout(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) indices, stratified: of each class a seeded `fraction` (rounded, at least one image of a
    class with two or more) is held out; each part keeps the original order."""
    if not 0 < fraction < 1:
        raise DataError(f"imagefolder: no test/ or val/ folder, and holdout_fraction={fraction:g} holds out "
                        f"nothing; set it between 0 and 1 or add a test folder")
    rng = np.random.default_rng([seed, 31])
    test = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        k = min(max(1, int(round(len(members) * fraction))), len(members) - 1)
        test += list(rng.permutation(members)[:k])
    test = np.sort(np.array(test, dtype=np.int64))
    if len(test) == 0:
        raise DataError(f"imagefolder: {len(labels)} images are too few to hold out a test set; add images or a "
                        f"test folder")
    return np.setdiff1d(np.arange(len(labels)), test), test


# ---------------------------------------------------------------------------------------------- cache
def cache_key(splits: dict, size: int, skip_bad: bool, holdout_spec) -> str:
    h = hashlib.sha256(json.dumps({"format": FORMAT, "size": size, "skip_bad": skip_bad,
                                   "holdout": holdout_spec}).encode())
    for name in sorted(splits):
        for f, label in splits[name]:
            st = os.stat(f)
            h.update(f"{name}\0{label}\0{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:24]


def _inside(child: str, parent: str) -> bool:
    child, parent = os.path.realpath(child), os.path.realpath(parent)
    return child == parent or child.startswith(parent.rstrip(os.sep) + os.sep)


def _load_cached(folder: str) -> dict | None:
    try:
        with open(os.path.join(folder, "meta.json")) as f:
            meta = json.load(f)
        arrays = {k: np.load(os.path.join(folder, f"{k}.npy"), mmap_mode="r")
                  for k in ("train_images", "train_labels", "test_images", "test_labels")}
    except (OSError, ValueError, KeyError):
        return None  # absent or damaged: decoded again
    return {**meta, **arrays}


def _store(folder: str, arrays: dict, meta: dict) -> bool:
    """Write the entry atomically (a temporary folder renamed into place); False if the cache cannot be
    written (said once by the caller)."""
    parent = os.path.dirname(folder)
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
        try:
            for k, a in arrays.items():
                np.save(os.path.join(tmp, f"{k}.npy"), a)
            with open(os.path.join(tmp, "meta.json"), "w") as f:
                json.dump(meta, f, indent=1)
            if os.path.exists(folder):   # another process stored the same entry first
                shutil.rmtree(tmp)
            else:
                os.replace(tmp, folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    except OSError as e:
        _say(f"cannot write the cache in {parent} ({e.strerror or e}); the decoded images stay in memory only "
             f"(set cache_dir to a writable folder to keep them)")
        return False
    return True


# ---------------------------------------------------------------------------------------------- read
def read_imagefolder(path: str, image_size: int, cache_dir: str | None = None, skip_bad: bool = False,
                     holdout_fraction: float = 0.1, holdout_seed: int = 0, device: str = "cpu") -> dict:
    """The arrays and facts of an ImageFolder directory: train/test images (N, S, S, C) uint8, labels int64,
    classes, channels, mean/std, the bad files skipped, whether the cache was used, and the seconds taken."""
    t0 = time.perf_counter()
    if image_size <= 0:
        raise DataError(f"imagefolder: image_size={image_size}; set the side the images are resized to, e.g. "
                        f"--set image_size=32")
    path = os.path.abspath(path)
    cache_dir = os.path.abspath(cache_dir or default_cache_dir())
    if _inside(cache_dir, path):
        raise DataError(f"imagefolder: cache_dir {cache_dir} is inside the data folder {path}; nothing is "
                        f"written there: choose another one (--set cache_dir=DIR)")
    classes, splits = scan(path)
    spec = None if "test" in splits else {"fraction": holdout_fraction, "seed": holdout_seed}
    folder = os.path.join(cache_dir, "imagefolder", cache_key(splits, image_size, skip_bad, spec))
    cached = _load_cached(folder)
    if cached is not None and cached.get("classes") == classes:
        return {**cached, "cached": True, "cache": folder, "seconds": time.perf_counter() - t0}

    names = sorted(splits)
    files = [f for n in names for f, _ in splits[n]]
    labels = np.array([label for n in names for _, label in splits[n]], dtype=np.int64)
    _say(f"decoding {len(files):,} images of {path} with DALI ({device}) at {image_size}x{image_size}, once; "
         f"the arrays go to the cache {folder}")
    step = max(10_000, len(files) // 10)

    def progress(done, total):
        if done % step < DECODE_BATCH and done < total:
            _say(f"  {done:,} / {total:,} decoded ({time.perf_counter() - t0:.0f} s)")
    channels = channels_of([np.fromfile(f, dtype=np.uint8, count=4096) for f in files], files, _say)
    images, bad = decode_files(files, image_size, device, skip_bad, channels == 1, progress)
    if bad:
        _say(f"skipped {len(bad):,} image(s) that do not decode (first: {bad[0][0]}: {bad[0][1]})")
    keep = np.array([a is not None for a in images])
    if not keep.any():
        raise DataError(f"imagefolder: no image of {path} decodes")
    stacked = np.stack([a for a in images if a is not None])
    labels = labels[keep]
    source = np.repeat(np.arange(len(names)), [len(splits[n]) for n in names])[keep]
    if "test" in splits:
        tr, te = source == names.index("train"), source == names.index("test")
    else:
        tr, te = holdout(labels, holdout_fraction, holdout_seed)
    parts = (stacked[tr], labels[tr], stacked[te], labels[te])
    if len(np.unique(parts[1])) < 2:
        raise DataError(f"imagefolder: {path}: the training images that decode cover fewer than two classes")
    mean, std = channel_stats(parts[0])
    arrays = dict(zip(("train_images", "train_labels", "test_images", "test_labels"), parts))
    meta = {"path": path, "classes": classes, "channels": channels, "image_size": image_size,
            "mean": list(mean), "std": list(std), "skipped": [f for f, _ in bad], "holdout": spec,
            "decode_s": round(time.perf_counter() - t0, 2), "device": device}
    stored = _store(folder, arrays, meta)
    return {**meta, **arrays, "cached": False, "cache": folder if stored else None,
            "seconds": time.perf_counter() - t0}
