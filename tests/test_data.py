"""Data layer: readers on real files, splits, loaders against the numpy reference, batch policy, bad input."""
from __future__ import annotations

import gzip
import os
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch

from engine.cli import main
from engine.data import (LOADERS, Augment, Batch, augment_reference, load_dataset, make_loader, make_splits,
                         make_synthetic, num_batches, read_cifar10, read_fashion_mnist, split_indices)
from engine.errors import ConfigError, DataError

from .conftest import needs_fashion_mnist, write_cifar_batch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------------------- readers
@needs_fashion_mnist
def test_fashion_mnist_is_really_read(fashion_mnist):
    ds = fashion_mnist
    assert ds.train_images.shape == (60000, 28, 28, 1) and ds.train_images.dtype == np.uint8
    assert ds.test_images.shape == (10000, 28, 28, 1)
    assert ds.train_labels.dtype == np.int64
    assert np.bincount(ds.train_labels, minlength=10).tolist() == [6000] * 10
    assert np.bincount(ds.test_labels, minlength=10).tolist() == [1000] * 10
    splits = make_splits(ds, 0.5, seed=0)
    assert len(splits["train"][1]) + len(splits["val"][1]) == 60000
    assert len(splits["test"][1]) == 10000
    # Fashion-MNIST's published pixel statistics (0-255): mean 72.94, std 90.02
    assert abs(ds.mean[0] - 72.94) < 0.01 and abs(ds.std[0] - 90.02) < 0.01


def test_cifar10_reader_on_batches_in_the_real_format(cifar_dir):
    root, images, labels = cifar_dir
    ds = read_cifar10(str(root))  # the parent of cifar-10-batches-py works, as does the directory itself
    assert read_cifar10(str(root / "cifar-10-batches-py")).train_images.shape == ds.train_images.shape
    train = np.concatenate(images[:5])
    assert ds.train_images.shape == (len(train), 32, 32, 3)
    # HWC pixel (r, c, ch) is the CHW plane value, for every image
    np.testing.assert_array_equal(ds.train_images, train.transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(ds.test_images, images[5].transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(ds.train_labels, np.concatenate(labels[:5]))
    assert ds.flip and ds.pad == 4 and ds.num_classes == 10
    expected_mean = train.transpose(0, 2, 3, 1).reshape(-1, 3).mean(0)
    np.testing.assert_allclose(ds.mean, expected_mean, rtol=1e-9)


def test_synthetic_is_seeded_and_class_dependent():
    a = make_synthetic(n_train=64, n_test=16, size=10, channels=3, seed=3)
    b = make_synthetic(n_train=64, n_test=16, size=10, channels=3, seed=3)
    c = make_synthetic(n_train=64, n_test=16, size=10, channels=3, seed=4)
    np.testing.assert_array_equal(a.train_images, b.train_images)
    assert not np.array_equal(a.train_images, c.train_images)
    assert a.train_images.shape == (64, 10, 10, 3) and a.image_shape == (3, 10, 10)
    assert set(np.unique(a.train_labels)) <= set(range(10))


# ------------------------------------------------------------------------------------------ splits
def test_splits_are_deterministic_and_disjoint():
    n = 1003
    train, val = split_indices(n, 0.5, seed=7)
    train2, val2 = split_indices(n, 0.5, seed=7)
    np.testing.assert_array_equal(train, train2)
    np.testing.assert_array_equal(val, val2)
    assert len(np.intersect1d(train, val)) == 0
    assert sorted(np.concatenate([train, val]).tolist()) == list(range(n))
    assert len(val) == round(n * 0.5)
    other_train, _ = split_indices(n, 0.5, seed=8)
    assert not np.array_equal(train, other_train)


# ------------------------------------------------------------------------------------------ loaders
def _small_set(n=203, size=12, channels=3, seed=None):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, size, size, channels), dtype=np.uint8), rng.integers(0, 10, n)


@pytest.mark.parametrize("kind", LOADERS)
def test_loaders_match_the_numpy_reference(kind):
    images, labels = _small_set()
    aug = Augment(mean=(120.0, 110.0, 100.0), std=(60.0, 50.0, 70.0), pad=2, flip=True)
    loader = make_loader(kind, images, labels, 32, train=True, augment=aug, seed=5)
    loader.set_epoch(3)
    plan = loader.plan.batches(3)
    for (x, y), batch in zip(loader, plan):
        ref = augment_reference(images, batch, aug)
        diff = (x - torch.from_numpy(ref)).abs()
        assert diff.max() < 1e-5, f"{kind}: max diff {diff.max():.3g}, mean {diff.mean():.3g}"
        np.testing.assert_array_equal(y.numpy(), labels[batch.indices])
        assert x.dtype == torch.float32 and x.shape[1:] == (3, 12, 12)


@pytest.mark.parametrize("kind", LOADERS)
def test_crop_is_a_padded_window_and_flip_is_a_mirror(kind):
    images, labels = _small_set(n=6, size=9, channels=1)
    aug = Augment(mean=(0.0,), std=(1.0,), pad=2, flip=True)
    loader = make_loader(kind, images, labels, 6, train=True, augment=aug)
    # drive one batch with chosen offsets/flips through the loader's own path
    batch = Batch(np.arange(6), np.array([[0, 0], [0, 0], [-2, 2], [2, -2], [1, 0], [-2, -2]], np.int32),
                  np.array([0, 1, 0, 0, 1, 0], np.int32))
    x, _ = next(iter(loader._iterate([batch])))
    x = x.numpy()[:, 0]
    src = images[..., 0].astype(np.float32)
    np.testing.assert_array_equal(x[0], src[0])                  # no shift, no flip: identity
    np.testing.assert_array_equal(x[1], src[1][:, ::-1])         # flip: exact horizontal mirror
    np.testing.assert_array_equal(x[2][2:, :7], src[2][:7, 2:])  # (dy, dx) = (-2, 2): out[i, j] = in[i-2, j+2]
    np.testing.assert_array_equal(x[2][:2], 0)                   # rows shifted in from the padding are zeros
    np.testing.assert_array_equal(x[2][:, 7:], 0)
    np.testing.assert_array_equal(x[3][:7, 2:], src[3][2:, :7])  # (2, -2): out[i, j] = in[i+2, j-2]
    np.testing.assert_array_equal(x[3][7:], 0)
    np.testing.assert_array_equal(x[3][:, :2], 0)
    np.testing.assert_array_equal(x[4][:8], src[4][1:, ::-1])    # shift and mirror together
    # every crop lies inside the zero-padded image: offsets drawn by the plan never exceed the padding
    offsets = loader.plan.batches(0)[0].offsets
    assert offsets.min() >= -2 and offsets.max() <= 2


@needs_fashion_mnist
def test_normalized_real_data_has_zero_mean_unit_std_over_an_epoch(fashion_mnist):
    ds = fashion_mnist
    aug = Augment(ds.mean, ds.std)
    loader = make_loader("dali", ds.train_images, ds.train_labels, 1000, train=False, augment=aug)
    total, total_sq, count = 0.0, 0.0, 0
    for x, y in loader:
        x = x.double()
        total += float(x.sum())
        total_sq += float((x * x).sum())
        count += x.numel()
        assert len(x) == len(y)
    mean = total / count
    std = (total_sq / count - mean * mean) ** 0.5
    assert abs(mean) < 1e-3 and abs(std - 1) < 1e-3, (mean, std)


@pytest.mark.parametrize("kind", LOADERS)
def test_batch_counts_for_sizes_not_divisible_by_the_batch(kind):
    images, labels = _small_set(n=203)
    aug = Augment((0.0,) * 3, (1.0,) * 3, pad=1)
    train = make_loader(kind, images, labels, 64, train=True, augment=aug)
    sizes = [len(y) for x, y in train if len(x) == len(y)]
    assert sizes == [64, 64, 64] and len(train) == 3 == num_batches(203, 64, True)
    ev = make_loader(kind, images, labels, 64, train=False, augment=aug)
    pairs = [(len(x), len(y)) for x, y in ev]
    assert pairs == [(64, 64), (64, 64), (64, 64), (11, 11)] and len(ev) == 4
    keep = make_loader(kind, images, labels, 64, train=True, augment=aug, drop_last=False)
    assert [len(y) for _, y in keep] == [64, 64, 64, 11]


def test_a_pass_stopped_early_leaves_the_next_epoch_intact():
    images, labels = _small_set(n=100)
    aug = Augment((0.0,) * 3, (1.0,) * 3, pad=2, flip=True)
    loader = make_loader("dali", images, labels, 16, train=True, augment=aug)
    it = iter(loader)
    next(it)
    del it  # stopped after one batch, one more in flight
    loader.set_epoch(4)
    got = [y.numpy() for _, y in loader]
    want = [labels[b.indices] for b in loader.plan.batches(4)]
    assert len(got) == len(want) and all(np.array_equal(a, b) for a, b in zip(got, want))


def test_cycle_crosses_epochs_and_goes_on_from_its_position():
    from engine.data import Cycle
    images, labels = _small_set(n=50)
    aug = Augment((0.0,) * 3, (1.0,) * 3, pad=2, flip=True)
    loader = make_loader("tensor", images, labels, 16, train=True, augment=aug)  # 3 batches an epoch
    whole = [y.numpy() for _, y in Cycle(loader).take(8)]
    want = [labels[b.indices] for e in range(3) for b in loader.plan.batches(e)][:8]
    assert all(np.array_equal(a, b) for a, b in zip(whole, want)) and len(whole) == 8
    first = Cycle(loader)
    first.take(4)
    assert (first.epoch, first.pos) == (1, 1)
    rest = [y.numpy() for _, y in Cycle(loader, first.epoch, first.pos).take(4)]  # a resumed stream
    assert all(np.array_equal(a, b) for a, b in zip(rest, whole[4:]))


def test_shards_are_disjoint_and_equal_length():
    images, labels = _small_set(n=101)
    aug = Augment((0.0,) * 3, (1.0,) * 3)
    seen = []
    for shard in range(3):
        loader = make_loader("tensor", images, labels, 8, train=True, augment=aug, shard_id=shard, num_shards=3)
        idx = np.concatenate([b.indices for b in loader.plan.batches(2)])
        assert len(loader) == 33 // 8
        seen.append(set(idx.tolist()))
    assert not (seen[0] & seen[1]) and not (seen[1] & seen[2]) and not (seen[0] & seen[2])


def test_reshuffled_every_epoch_from_the_seed():
    images, labels = _small_set(n=64)
    aug = Augment((0.0,) * 3, (1.0,) * 3)
    a = make_loader("tensor", images, labels, 8, train=True, augment=aug, seed=1)
    b = make_loader("tensor", images, labels, 8, train=True, augment=aug, seed=1)
    e0, e1 = a.plan.batches(0), a.plan.batches(1)
    assert not np.array_equal(e0[0].indices, e1[0].indices)
    np.testing.assert_array_equal(e1[0].indices, b.plan.batches(1)[0].indices)


@pytest.mark.cuda
def test_dali_on_the_gpu_hands_batches_to_torch_without_a_copy():
    images, labels = _small_set(n=64)
    aug = Augment((0.0,) * 3, (1.0,) * 3, pad=2, flip=True)
    loader = make_loader("dali", images, labels, 16, train=True, augment=aug, device="cuda")
    for (x, y), batch in zip(loader, loader.plan.batches(0)):
        assert x.is_cuda and y.is_cuda
        ref = augment_reference(images, batch, aug)
        assert (x.cpu() - torch.from_numpy(ref)).abs().max() < 1e-5


# ---------------------------------------------------------------------------------------- bad input
def _run(argv, capsys):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    return code, err


def _one_line_error(err: str, *needles: str) -> None:
    assert len(err.splitlines()) == 1, f"expected one line, got:\n{err}"
    assert err.startswith("aso-se: error: ") and "Traceback" not in err
    for n in needles:
        assert n in err, f"{n!r} not in {err!r}"


def test_missing_data_directory(capsys, tmp_path):
    code, err = _run(["data", "--dataset", "fashion-mnist", "--data-dir", str(tmp_path / "nope")], capsys)
    assert code == 2
    _one_line_error(err, str(tmp_path / "nope"), "apt-get install dataset-fashion-mnist")


def _write_idx(path, magic: bytes, dims, payload: bytes, gz: bool):
    data = magic + struct.pack(">" + "I" * len(dims), *dims) + payload
    opener = gzip.open if gz else open
    with opener(path, "wb") as f:
        f.write(data)


def _fake_fmnist(root, n=4, corrupt=None):
    rng = np.random.default_rng()
    for prefix in ("train", "t10k"):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8).tobytes()
        labels = rng.integers(0, 10, n, dtype=np.uint8).tobytes()
        _write_idx(root / f"{prefix}-images-idx3-ubyte.gz", b"\x00\x00\x08\x03", (n, 28, 28), images, True)
        _write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", b"\x00\x00\x08\x01", (n,), labels, True)
    target = root / "train-images-idx3-ubyte.gz"
    if corrupt == "truncated":
        with gzip.open(target, "rb") as f:
            raw = f.read()
        with gzip.open(target, "wb") as f:
            f.write(raw[:-100])
    elif corrupt == "magic":
        with gzip.open(target, "rb") as f:
            raw = f.read()
        with gzip.open(target, "wb") as f:
            f.write(b"\x00\x00\x08\x01" + raw[4:])
    elif corrupt == "cut-gzip":
        raw = target.read_bytes()
        target.write_bytes(raw[: len(raw) // 2])
    return target


def test_a_well_formed_idx_set_reads(tmp_path):
    _fake_fmnist(tmp_path, n=5)
    ds = read_fashion_mnist(str(tmp_path))
    assert ds.train_images.shape == (5, 28, 28, 1) and len(ds.test_labels) == 5


@pytest.mark.parametrize("corrupt,needle", [("truncated", "truncated"), ("magic", "wrong idx magic"),
                                            ("cut-gzip", "cannot read")])
def test_corrupt_idx_files(capsys, tmp_path, corrupt, needle):
    target = _fake_fmnist(tmp_path, corrupt=corrupt)
    code, err = _run(["data", "--dataset", "fashion-mnist", "--data-dir", str(tmp_path)], capsys)
    assert code == 2
    _one_line_error(err, str(target), needle)


@pytest.mark.parametrize("bad,needle", [
    ({b"data": np.zeros((3, 1000), np.uint8)}, "shape (N, 3072)"),
    ({b"data": np.zeros((3, 3072), np.float32)}, "uint8"),
    ({b"labels": [1, 2]}, "2 labels for 3 images"),
])
def test_cifar_batch_of_wrong_size_or_layout(capsys, tmp_path, bad, needle):
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    rng = np.random.default_rng()
    for k in range(1, 6):
        write_cifar_batch(root / f"data_batch_{k}", rng.integers(0, 256, (3, 3, 32, 32), dtype=np.uint8), [0, 1, 2])
    write_cifar_batch(root / "test_batch", rng.integers(0, 256, (3, 3, 32, 32), dtype=np.uint8), [0, 1, 2])
    write_cifar_batch(root / "data_batch_3", rng.integers(0, 256, (3, 3, 32, 32), dtype=np.uint8), [0, 1, 2], bad)
    code, err = _run(["data", "--dataset", "cifar10", "--data-dir", str(tmp_path)], capsys)
    assert code == 2
    _one_line_error(err, "data_batch_3", needle)


def test_cifar_batch_that_is_not_a_pickle(capsys, tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    (root / "data_batch_1").write_bytes(b"definitely not a pickle")
    code, err = _run(["data", "--dataset", "cifar10", "--data-dir", str(root)], capsys)
    assert code == 2
    _one_line_error(err, "data_batch_1", "not a readable CIFAR-10 python batch")


def test_unknown_dataset_name(capsys):
    code, err = _run(["data", "--dataset", "imagenet"], capsys)
    assert code == 2
    _one_line_error(err, "'imagenet'", "fashion-mnist, cifar10, imagefolder, synthetic")
    with pytest.raises(DataError):
        load_dataset("imagenet")


@pytest.mark.parametrize("batch_size", [0, -3])
def test_batch_size_must_be_positive(capsys, batch_size, tmp_path):
    images, labels = _small_set(n=10)
    with pytest.raises(ConfigError, match="batch_size"):
        make_loader("tensor", images, labels, batch_size, train=True, augment=Augment((0.0,) * 3, (1.0,) * 3))
    code, err = _run(["search", "--preset", "smoke", "--set", f"batch_size={batch_size}", "--out",
                      str(tmp_path / "run")], capsys)
    assert code == 2
    _one_line_error(err, "batch_size")
    assert not (tmp_path / "run").exists()  # nothing written for a config that cannot run


def test_data_command_prints_the_summary(capsys):
    code = main(["data", "--dataset", "synthetic"])
    out = capsys.readouterr().out
    assert code == 0
    assert "splits       train 1024, val 1024, test 512" in out and "mean" in out and "std" in out


@needs_fashion_mnist
def test_data_command_as_a_user_runs_it():
    """The real entry point in a fresh process: exit status 0 and the split sizes."""
    proc = subprocess.run([sys.executable, "-m", "engine.cli", "data", "--dataset", "fashion-mnist"],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert "train 30000, val 30000, test 10000" in proc.stdout and "1x28x28" in proc.stdout


def test_data_error_from_a_fresh_process_has_exit_code_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "engine.cli", "data", "--dataset", "fashion-mnist",
                           "--data-dir", str(tmp_path / "missing")], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr


def test_copying_fmnist_files_plain_also_reads(tmp_path, fashion_mnist):
    """Plain (un-gzipped) idx files are accepted too."""
    from engine.data import FASHION_MNIST_DIR
    for name in os.listdir(FASHION_MNIST_DIR):
        with gzip.open(os.path.join(FASHION_MNIST_DIR, name)) as src, open(tmp_path / name[:-3], "wb") as dst:
            shutil.copyfileobj(src, dst)
    ds = read_fashion_mnist(str(tmp_path))
    np.testing.assert_array_equal(ds.test_labels, fashion_mnist.test_labels)


def test_data_command_counts_batches_for_a_batch_size(capsys):
    # --batch-size used to be parsed and ignored
    assert main(["data", "--dataset", "synthetic", "--val-fraction", "0.25", "--batch-size", "100"]) == 0
    out = capsys.readouterr().out
    # synthetic: 2,048 training images (1,536 train, 512 val) and 512 test images
    assert "batches      of 100: train 15 full + 1 of 36, val 5 full + 1 of 12, test 5 full + 1 of 12" in out
    assert main(["data", "--dataset", "synthetic"]) == 0
    assert "batches" not in capsys.readouterr().out
