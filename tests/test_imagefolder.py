"""ImageFolder directories (engine/data/imagefolder.py): real PNG and JPEG files written here, decoded by DALI's
CPU pipeline, cached; every bad case gives one line and exit 2, and nothing under the data folder changes."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from engine.cli import main
from engine.data import make_synthetic
from engine.data.imagefolder import read_imagefolder
from engine.errors import DataError


def write_folder(root, images, labels, split="train", fmt="png", classes=("a", "b", "c"), start=0):
    """images (N, H, W, C) uint8 as root/split/<class>/<index>.<fmt>, the index zero-padded (so file names
    sort in index order)."""
    for i, (img, y) in enumerate(zip(images, labels), start):
        folder = os.path.join(root, split, classes[int(y)])
        os.makedirs(folder, exist_ok=True)
        arr = img[..., 0] if img.shape[-1] == 1 else img
        Image.fromarray(arr).save(os.path.join(folder, f"{i:06d}.{fmt}"), **({"quality": 95} if fmt == "jpg" else {}))


def snapshot(root):
    """Every path under root with its size and modification time: the data folder must never change."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.stat(p)
            out[os.path.relpath(p, root)] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture
def small(tmp_path):
    """A 3-class folder of 12x12 grayscale PNGs with a test folder: the synthetic set's own arrays."""
    d = make_synthetic(n_train=90, n_test=30, size=12, channels=1, classes=3, seed=3)
    root = tmp_path / "data"
    write_folder(root, d.train_images, d.train_labels, "train")
    write_folder(root, d.test_images, d.test_labels, "test")
    return root, d


def read(root, tmp_path, **kw):
    return read_imagefolder(str(root), kw.pop("image_size", 12), cache_dir=str(tmp_path / "cache"), **kw)


def test_png_folder_gives_the_arrays_bit_for_bit_in_file_name_order(small, tmp_path):
    root, d = small
    before = snapshot(root)
    r = read(root, tmp_path)
    assert r["classes"] == ["a", "b", "c"] and r["channels"] == 1 and r["cached"] is False
    np.testing.assert_array_equal(r["train_images"], d.train_images)
    np.testing.assert_array_equal(r["train_labels"], d.train_labels)
    np.testing.assert_array_equal(r["test_images"], d.test_images)
    np.testing.assert_array_equal(r["test_labels"], d.test_labels)
    assert snapshot(root) == before


def test_colour_jpegs_are_resized_by_the_shorter_side_and_centre_cropped(tmp_path):
    rng = np.random.default_rng(0)
    imgs = np.zeros((8, 20, 30, 3), np.uint8)
    imgs[:, :, 2:28] = 200                      # bright but for a dark strip 2 px wide at either side
    imgs[:, :, :, 0] = rng.integers(0, 255, 8)[:, None, None]
    write_folder(tmp_path / "data", imgs, np.arange(8) % 2, fmt="jpg", classes=("x", "y"))
    r = read_imagefolder(str(tmp_path / "data"), 10, cache_dir=str(tmp_path / "cache"), holdout_fraction=0.5)
    # no test folder: half of each class held out
    assert r["train_images"].shape == (4, 10, 10, 3) and r["test_images"].shape == (4, 10, 10, 3)
    assert sorted(r["train_labels"]) == [0, 0, 1, 1] and sorted(r["test_labels"]) == [0, 0, 1, 1]
    assert r["holdout"] == {"fraction": 0.5, "seed": 0}
    every = np.concatenate([r["train_images"], r["test_images"]])
    # the 20x30 image scaled to 10x15 (the strips now 1 px) and cropped to its centre 10x10: no strip left
    assert every[..., 1].min() >= 180


def test_the_cache_is_reused_and_rebuilt_when_a_file_changes(small, tmp_path):
    root, _ = small
    first = read(root, tmp_path)
    second = read(root, tmp_path)
    assert second["cached"] is True and second["cache"] == first["cache"]
    assert isinstance(second["train_images"], np.memmap)
    np.testing.assert_array_equal(second["train_images"], first["train_images"])
    victim = root / "train" / "b" / sorted(os.listdir(root / "train" / "b"))[0]
    Image.fromarray(np.full((12, 12), 7, np.uint8)).save(victim)
    third = read(root, tmp_path)
    assert third["cached"] is False and third["cache"] != first["cache"]
    assert (np.asarray(third["train_images"]) == 7).all(axis=(1, 2, 3)).sum() == 1


def test_an_unwritable_cache_keeps_the_arrays_in_memory_and_says_so(small, tmp_path, capsys):
    root, d = small
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")
    r = read_imagefolder(str(root), 12, cache_dir=str(blocker))
    assert r["cache"] is None and r["cached"] is False
    np.testing.assert_array_equal(r["train_images"], d.train_images)
    assert capsys.readouterr().err.count("stay in memory only") == 1


def test_mixed_channels_are_converted_to_rgb_and_said_once(tmp_path, capsys):
    rng = np.random.default_rng(1)
    gray = rng.integers(0, 255, (4, 8, 8, 1), dtype=np.uint8)
    rgb = rng.integers(0, 255, (4, 8, 8, 3), dtype=np.uint8)
    write_folder(tmp_path / "data", gray, np.array([0, 1, 0, 1]), classes=("p", "q"))
    write_folder(tmp_path / "data", rgb, np.array([0, 1, 0, 1]), classes=("p", "q"), start=4)
    r = read_imagefolder(str(tmp_path / "data"), 8, cache_dir=str(tmp_path / "cache"), holdout_fraction=0.25)
    assert r["channels"] == 3
    every = np.concatenate([r["train_images"], r["test_images"]])
    assert every.shape[1:] == (8, 8, 3)
    err = capsys.readouterr().err
    assert err.count("decoded to RGB") == 1 and "(4 grayscale, 4 colour or other)" in err
    # the grayscale files' pixels are repeated into the three channels
    gray_back = every[np.all(every[..., :1] == every[..., 1:2], axis=(1, 2, 3))
                      & np.all(every[..., 1:2] == every[..., 2:], axis=(1, 2, 3))]
    assert len(gray_back) == 4


@pytest.mark.parametrize("mode,fmt,want", [("L", "png", 1), ("LA", "png", 1), ("RGB", "png", 3), ("RGBA", "png", 3),
                                           ("P", "png", 3), ("L", "jpg", 1), ("RGB", "jpg", 3), ("CMYK", "jpg", 4)])
def test_header_channels_reads_png_and_jpeg_headers(mode, fmt, want, tmp_path):
    from engine.data.decode import header_channels
    path = tmp_path / f"x.{fmt}"
    Image.new(mode, (9, 7)).save(path)
    assert header_channels(np.fromfile(path, dtype=np.uint8)) == want
    assert header_channels(np.frombuffer(b"not an image", np.uint8)) is None


def test_grayscale_jpegs_decode_to_one_channel(tmp_path):
    """DALI 2.4 crashed decoding grayscale JPEGs with output_type=ANY_DATA; they decode as GRAY."""
    rng = np.random.default_rng(4)
    imgs = (rng.integers(0, 4, (300, 16, 16, 1)) * 60).astype(np.uint8)
    write_folder(tmp_path / "data", imgs, np.arange(300) % 2, fmt="jpg", classes=("u", "v"))
    r = read_imagefolder(str(tmp_path / "data"), 16, cache_dir=str(tmp_path / "cache"))
    assert r["channels"] == 1 and r["train_images"].shape[1:] == (16, 16, 1)
    every = np.concatenate([r["train_images"], r["test_images"]])
    assert np.abs(every.astype(int).mean() - imgs.astype(int).mean()) < 2  # lossy, but the same pictures


def _bad(kind, root):
    """Build the bad case `kind` under root; returns what the one-line error must name."""
    rng = np.random.default_rng(2)
    imgs = rng.integers(0, 255, (6, 8, 8, 1), dtype=np.uint8)
    if kind == "missing":
        return str(root / "nowhere"), "is not a directory"
    if kind == "no-images":
        for c in ("a", "b"):
            os.makedirs(root / "train" / c)
            (root / "train" / c / "notes.txt").write_text("not an image")
        return str(root), "holds no images"
    write_folder(root, imgs, np.array([0, 1, 0, 1, 0, 1]), classes=("a", "b"))
    if kind == "empty-class":
        os.makedirs(root / "train" / "c")
        return str(root), os.path.join("train", "c") + " holds no images"
    if kind == "one-class":
        for f in os.listdir(root / "train" / "b"):
            os.rename(root / "train" / "b" / f, root / "train" / "a" / ("b" + f))
        os.rmdir(root / "train" / "b")
        return str(root), "one class folder (a)"
    if kind == "test-class":
        write_folder(root, imgs[:2], np.array([0, 1]), split="test", classes=("a", "zebra"))
        return str(root), "class 'zebra' is not in"
    if kind == "not-an-image":
        (root / "train" / "a" / "000099.jpg").write_bytes(b"this is text, not a JPEG")
        return str(root), os.path.join("train", "a", "000099.jpg") + ": not a decodable image"
    if kind == "truncated":
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / "train" / "b" / "x.jpg")
        data = (root / "train" / "b" / "x.jpg").read_bytes()
        (root / "train" / "b" / "x.jpg").write_bytes(data[:len(data) // 3])
        return str(root), os.path.join("train", "b", "x.jpg") + ": not a decodable image"
    if kind == "cache-inside":
        return str(root), "is inside the data folder"
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["missing", "no-images", "empty-class", "one-class", "test-class", "not-an-image",
                                  "truncated", "cache-inside"])
def test_bad_folders_give_one_line_and_exit_2_and_change_nothing(kind, tmp_path, capsys):
    root = tmp_path / "data"
    os.makedirs(root, exist_ok=kind != "missing")
    path, named = _bad(kind, root)
    before = snapshot(root)
    cache = str(root / "cache") if kind == "cache-inside" else str(tmp_path / "cache")
    code = main(["data", "--dataset", "imagefolder", "--data-dir", path, "--image-size", "8", "--cache-dir", cache])
    err = capsys.readouterr().err
    assert code == 2
    # one error line; before it at most the reader's own information ("imagefolder: decoding ...")
    errors = [line for line in err.splitlines() if line.startswith("aso-se: error")]
    others = [line for line in err.splitlines() if line.strip() and not line.startswith("aso-se: error")]
    assert len(errors) == 1 and errors[0].startswith("aso-se: error: imagefolder: ") and named in errors[0], err
    assert all(line.startswith("imagefolder: ") and "error" not in line for line in others), err
    assert snapshot(root) == before
    if kind in ("not-an-image", "truncated"):  # the flag skips and counts them
        assert main(["data", "--dataset", "imagefolder", "--data-dir", path, "--image-size", "8", "--cache-dir",
                     cache, "--skip-bad-images"]) == 0
        out = capsys.readouterr()
        assert "skipped 1 image(s) that do not decode" in out.err and "1 bad file(s) skipped" in out.out
        assert snapshot(root) == before


def test_read_errors_are_data_errors(tmp_path):
    with pytest.raises(DataError, match="image_size=0"):
        read_imagefolder(str(tmp_path), 0)


@pytest.mark.slow
def test_a_jpeg_folder_searches_end_to_end_and_exports(tmp_path, capsys):
    """The smoke budget on JPEG files: all four phases, then the export, which must reproduce the run's test
    accuracy; the second run reads the cache."""
    d = make_synthetic(n_train=512, n_test=128, size=12, channels=3, classes=4, seed=5)
    root = tmp_path / "jpegs"
    write_folder(root, d.train_images, d.train_labels, "train", fmt="jpg", classes=("w", "x", "y", "z"))
    write_folder(root, d.test_images, d.test_labels, "test", fmt="jpg", classes=("w", "x", "y", "z"))
    before = snapshot(root)
    args = ["--preset", "smoke", "--set", "dataset=imagefolder", "--data-dir", str(root),
            "--set", f"cache_dir={tmp_path / 'cache'}"]
    assert main(["search", *args, "--out", str(tmp_path / "run")]) == 0
    final = json.loads((tmp_path / "run" / "final.json").read_text())
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {r.get("phase") for r in records} >= {"warmup", "search", "growth", "optimize"}
    assert 0 <= final["test_acc"] <= 1
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["dataset"] == "imagefolder" and config["image_size"] == 12
    assert main(["export", str(tmp_path / "run")]) == 0
    assert (tmp_path / "run" / "model.pt").is_file()
    assert "decoding 640 images" in capsys.readouterr().err
    assert main(["data", "--dataset", "imagefolder", "--data-dir", str(root), "--image-size", "12",
                 "--cache-dir", str(tmp_path / "cache")]) == 0
    out = capsys.readouterr()
    assert "read from the cache" in out.out and "decoding" not in out.err
    assert snapshot(root) == before


def test_images_decode_where_the_run_computes():
    """The resolved device decides (a CUDA run's checkpoint evaluated on a CPU machine decodes on the CPU);
    without one, the config's."""
    import torch

    from engine.build import image_options
    from engine.config import preset
    cuda_cfg = preset("smoke").override(["device=cuda"])
    assert image_options(cuda_cfg, torch.device("cpu"))["device"] == "cpu"
    assert image_options(preset("smoke"), torch.device("cuda"))["device"] == "cuda"
    assert image_options(preset("smoke").override(["device=cpu"]))["device"] == "cpu"
    assert image_options(cuda_cfg)["device"] == "cuda"
