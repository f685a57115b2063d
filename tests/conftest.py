"""Shared fixtures. Tests that need CUDA carry `@pytest.mark.cuda` and are skipped cleanly without a GPU;
tests that need the real Fashion-MNIST files skip with a pointer to `make data` when they are missing."""
from __future__ import annotations

import importlib.util
import json
import os
import pickle
import sys

import numpy as np
import pytest
import torch

# Without a GPU the Triton kernels run under Triton's interpreter on CPU tensors. The switch is read when
# triton is imported, so it is set here, before any test module imports `kernels`.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from engine.data import FASHION_MNIST_DIR  # noqa: E402

# `make test` runs one pytest-xdist worker per core: each worker (and what it starts) gets its share of the
# cores, one thread each on this project's 2-core machine, instead of two workers fighting over both; a plain
# `pytest` keeps at most two threads
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
_THREADS = max(1, (os.cpu_count() or 1) // _WORKERS) if _WORKERS > 1 else min(2, torch.get_num_threads())
torch.set_num_threads(_THREADS)
if _WORKERS > 1:
    os.environ["OMP_NUM_THREADS"] = str(_THREADS)


# fields of metrics.jsonl and final.json that hold wall-clock figures: a resumed run equals an uninterrupted one
# in everything else
TIMING = {"it_s", "images_s", "epoch_s", "elapsed_s", "wall_s", "grow_s", "recompile_s", "compile_s", "eval_s"}


def untimed(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


def quiet(*_) -> None:
    """A run's `log` that prints nothing."""


def read_metrics(out) -> list[dict]:
    """Every record of a run directory's metrics.jsonl, in order (epochs, growth events, the final record)."""
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")


def load_bench(name: str):
    """bench/<name>.py as a module (the bench scripts import their `common` from bench/)."""
    if BENCH not in sys.path:
        sys.path.insert(0, BENCH)
    spec = importlib.util.spec_from_file_location(name, os.path.join(BENCH, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same global RNG state, whatever ran before it: a failure reproduces."""
    torch.manual_seed(0)
    np.random.seed(0)


def pytest_collection_modifyitems(config, items):
    # the long tests first (stable: otherwise in file order), so that under `make test`'s two workers the short
    # ones fill the gaps at the end instead of one worker finishing a long test alone
    items.sort(key=lambda item: "slow" not in item.keywords)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def have_fashion_mnist() -> bool:
    return any(os.path.exists(os.path.join(FASHION_MNIST_DIR, f"train-images-idx3-ubyte{ext}")) for ext in (".gz", ""))


needs_fashion_mnist = pytest.mark.skipif(not have_fashion_mnist(),
                                         reason=f"Fashion-MNIST not in {FASHION_MNIST_DIR} (run `make data`)")


@pytest.fixture(scope="session")
def fashion_mnist():
    if not have_fashion_mnist():
        pytest.skip(f"Fashion-MNIST not in {FASHION_MNIST_DIR} (run `make data`)")
    from engine.data import read_fashion_mnist
    return read_fashion_mnist()


def write_cifar_batch(path, images_chw: np.ndarray, labels, overrides: dict | None = None) -> None:
    """A batch in CIFAR-10's own format: a pickled dict with bytes keys, b'data' (N, 3072) uint8 holding
    the R, G, B planes row by row, b'labels' a list of ints."""
    batch = {b"batch_label": b"testing batch", b"labels": [int(v) for v in labels],
             b"data": images_chw.reshape(len(images_chw), -1),
             b"filenames": [f"img{i}.png".encode() for i in range(len(images_chw))]}
    batch.update(overrides or {})
    with open(path, "wb") as f:
        pickle.dump(batch, f, protocol=2)


@pytest.fixture
def cifar_dir(tmp_path):
    """A cifar-10-batches-py directory with 5 small train batches and a test batch; returns (dir, images, labels)
    where images are (N, 3, 32, 32) uint8 in file order (train batches then test)."""
    rng = np.random.default_rng()
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    sizes = [7, 5, 6, 9, 4, 11]
    names = [f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]
    all_images, all_labels = [], []
    for name, n in zip(names, sizes):
        images = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
        labels = rng.integers(0, 10, n)
        write_cifar_batch(root / name, images, labels)
        all_images.append(images)
        all_labels.append(labels)
    return tmp_path, all_images, all_labels
