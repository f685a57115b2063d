"""engine/data/planted.py and bench/planted.py: the planted tasks hold the relation they claim, and nothing a 3x3
window sees; the shuffled-label control; the protocol's statistics."""
from __future__ import annotations

import json

import numpy as np
import pytest

from engine.genotype import Genotype
from engine.ops import PRIMITIVES
from engine.build import load_data
from engine.config import preset
from engine.data import load_dataset
from engine.data.planted import PLANTED, checkerboard, make_planted

from .conftest import load_bench


@pytest.fixture(scope="module")
def planted():
    return load_bench("planted")


def _corr(images: np.ndarray, dy: int, dx: int, checker: bool = False) -> np.ndarray:
    """Per image, the correlation of each pixel with the one (dy, dx) away; with `checker`, each product signed by
    the checkerboard at the first pixel (planted-lag-checker's alternation undone)."""
    x = images[..., 0].astype(np.float64)
    x = x - x.mean(axis=(1, 2), keepdims=True)
    h, w = x.shape[1:]
    a, b = x[:, :h - dy, :w - dx], x[:, dy:, dx:]
    sign = checkerboard(max(h, w))[:h - dy, :w - dx] if checker else 1.0
    return (a * b * sign).mean(axis=(1, 2)) / (x * x).mean(axis=(1, 2))


@pytest.mark.parametrize("name", sorted(PLANTED))
def test_a_planted_task_is_fixed_balanced_and_independent_of_the_run_seed(name):
    a = make_planted(name, 256, 64)
    b = load_data(preset("planted").override([f"dataset={name}", "synthetic_train=256", "synthetic_test=64",
                                              "seed=5"]))
    for x, y in zip(a, (b.train_images, b.train_labels, b.test_images, b.test_labels)):
        assert np.array_equal(x, y)
    images, labels = a[0], a[1]
    assert images.dtype == np.uint8 and images.shape == (256, PLANTED[name][2], PLANTED[name][2], 1)
    assert 0.4 < labels.mean() < 0.6
    assert not np.array_equal(a[0][:64], a[2])  # the test images are new draws


def test_lag_lives_at_six_pixels_and_nowhere_a_3x3_window_reaches():
    images, labels = make_planted("planted-lag", 512, 16)[:2]
    along_row, along_col = _corr(images, 0, 6), _corr(images, 6, 0)
    # the oracle: the lag-6 correlation along a row against along a column tells every image's class
    assert np.array_equal((along_col > along_row).astype(int), labels)
    for dy, dx in ((0, 1), (1, 0), (1, 1), (0, 2), (2, 0)):  # what a 3x3 window (and two of them) sees
        c = _corr(images, dy, dx)
        assert abs(c[labels == 0].mean() - c[labels == 1].mean()) < 0.02, (dy, dx)


def test_checker_lag_alternates_in_sign_so_no_plain_correlation_differs_between_the_classes():
    images, labels = make_planted("planted-lag-checker", 512, 16)[:2]
    # the oracle: the lag-6 correlation with the checkerboard undone, along a column against along a row
    assert np.array_equal((_corr(images, 6, 0, True) > _corr(images, 0, 6, True)).astype(int), labels)
    for dy, dx in ((0, 6), (6, 0), (0, 1), (1, 0), (1, 1), (0, 2), (2, 0)):
        for checker in (False, True):
            if checker and 6 in (dy, dx):
                continue  # the oracle's own lag
            c = _corr(images, dy, dx, checker)
            assert abs(c[labels == 0].mean() - c[labels == 1].mean()) < 0.02, (dy, dx, checker)
    # on planted-lag (no alternation) the plain lag-6 correlation is there and the undone one is not
    plain = make_planted("planted-lag", 512, 16)[0]
    assert abs(_corr(plain, 0, 6, True).mean()) < 0.02 < _corr(plain, 0, 6).mean()


@pytest.mark.parametrize("name, near, far", [("planted-polarity", 9, 12), ("planted-polarity-near", 4, 6)])
def test_polarity_is_two_dots_apart_whose_colours_differ_in_class_one(name, near, far):
    images, labels = make_planted(name, 512, 16)[:2]
    distances = set()
    for img, label in zip(images[..., 0], labels):
        dots = np.argwhere((img == 0) | (img == 255))
        assert len(dots) == 2
        (y0, x0), (y1, x1) = dots
        distances.add(max(abs(y1 - y0), abs(x1 - x0)))
        assert y0 == y1 or x0 == x1 or abs(y1 - y0) == abs(x1 - x0)  # along a row, a column or a diagonal
        assert int(img[y0, x0] != img[y1, x1]) == label
    assert distances == set(range(near, far + 1))
    # a global count cannot tell: class 0 holds two bright or two dark dots, class 1 one of each
    bright = (images == 255).sum(axis=(1, 2, 3))
    assert set(bright[labels == 1]) == {1} and set(bright[labels == 0]) == {0, 2}


def test_shuffled_labels_keep_the_images_and_the_test_set():
    base = preset("planted").override(["synthetic_train=512", "synthetic_test=64"])
    real = load_data(base)
    shuffled = load_data(base.override(["shuffle_labels=true"]))
    again = load_data(base.override(["shuffle_labels=true"]))
    other_seed = load_data(base.override(["shuffle_labels=true", "seed=1"]))
    assert np.array_equal(real.train_images, shuffled.train_images)
    assert np.array_equal(real.test_labels, shuffled.test_labels)
    assert sorted(real.train_labels) == sorted(shuffled.train_labels)
    assert np.array_equal(shuffled.train_labels, again.train_labels)
    assert not np.array_equal(shuffled.train_labels, other_seed.train_labels)
    agree = (real.train_labels == shuffled.train_labels).mean()
    assert 0.4 < agree < 0.6  # two balanced classes: a shuffle keeps about half the labels by chance


def test_shard_of_the_table_or_a_malformed_shard_is_one_line(planted):
    with pytest.raises(SystemExit, match="--shard splits the protocol"):
        planted.main(["--table", "--shard", "0/2"])
    with pytest.raises(SystemExit, match="expected K/N"):
        planted.main(["--quick", "--shard", "2/2"])


def test_unknown_planted_name_is_one_line(capsys):
    from engine.cli import main
    assert main(["data", "--dataset", "planted-nothing"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "planted-lag" in err and "planted-polarity" in err


def test_homogeneous_genotypes_are_valid_and_as_deep_as_a_darts_cell(planted):
    for op in PRIMITIVES[1:]:
        g = planted.homogeneous(op)
        assert Genotype.from_json(g.to_json()) == g
        assert {o for o, _ in g.normal + g.reduce} == {op}
    # node j reads node j-1: the longest path through the cell is 4 ops
    assert [i for _, i in planted.homogeneous("sep_conv_3x3").normal] == [0, 1, 0, 2, 1, 3, 2, 4]


def test_family_share_sign_test_and_margins(planted):
    cell = [("sep_conv_3x3", 0), ("max_pool_3x3", 1), ("sep_conv_5x5", 0), ("skip_connect", 2),
            ("avg_pool_3x3", 1), ("dil_conv_3x3", 3), ("sep_conv_3x3", 2), ("max_pool_3x3", 4)]
    g = Genotype(cell, [2, 3, 4, 5], list(cell), [2, 3, 4, 5])
    share = g.share(PLANTED["planted-lag"][1])
    assert share == {"normal": 0.5, "reduce": 0.5}
    assert planted.sign_test(6, 6) == pytest.approx(1 / 64) and planted.sign_test(0, 6) == 1.0
    assert planted.sign_test(5, 6) == pytest.approx(7 / 64)
    probs = [[0.0, 0.1, 0.1, 0.1, 0.4, 0.1, 0.1, 0.1]] * 14
    d = g.decidedness({"normal": probs, "reduce": probs})
    first = d["normal"][0]
    assert first["op"] == "sep_conv_3x3" and first["p"] == 0.4 and first["p_second"] == 0.1 and first["margin"] == 0.3
    assert d["normal"][1]["margin"] == pytest.approx(0.1 - 0.4)  # max_pool chosen at 0.1 where sep3 has 0.4
    # decided edges: the top op in the family at p >= 0.5, counted over every edge of each cell type
    sure, unsure = [0.0, 0.1, 0.05, 0.05, 0.0, 0.6, 0.1, 0.1], [0.0, 0.1, 0.1, 0.1, 0.4, 0.1, 0.1, 0.1]
    free = [0.0, 0.7, 0.1, 0.1, 0.0, 0.0, 0.0, 0.1]
    counts = planted.decided_for(PLANTED["planted-lag"][1], {"normal": [sure] * 3 + [unsure] * 11,
                                                            "reduce": [free] * 13 + [sure]})
    assert counts == {"normal": 3, "reduce": 1}


def test_scored_share_pools_the_scored_cell_types_only(planted):
    g = planted.split("max_pool_3x3", "sep_conv_5x5")
    assert [o for o, _ in g.normal] == ["max_pool_3x3"] * 8 and [o for o, _ in g.reduce] == ["sep_conv_5x5"] * 8
    assert [i for _, i in g.reduce] == [i for _, i in planted.homogeneous("skip_connect").reduce]
    assert planted.scored_share(g, ("max_pool_3x3",), ("reduce",)) == 0.0
    assert planted.scored_share(g, ("max_pool_3x3",), ("normal",)) == 1.0
    assert planted.scored_share(g, ("max_pool_3x3",), ("normal", "reduce")) == 0.5
    assert set(planted.SCORED) == set(PLANTED)


def test_cells_trains_each_family_op_in_one_cell_type_at_a_time(planted, tmp_path, monkeypatch):
    trained = []

    def fake_train(recipe, name, genotype, seed, work):
        trained.append((name, {o for o, _ in genotype.normal}, {o for o, _ in genotype.reduce}, seed))
        return {"test_acc": 0.5 + 0.25 * ("max_pool_3x3" in {o for o, _ in genotype.reduce}) + 0.01 * seed}
    monkeypatch.setattr(planted, "train", fake_train)
    out = tmp_path / "cells.json"
    assert planted.main(["--task", "planted-polarity", "--cells", "--work", str(tmp_path), "--json", str(out)]) == 0
    assert [t[:3] for t in trained[::2]] == [
        ("homogeneous-skip_connect", {"skip_connect"}, {"skip_connect"}),
        ("cells-max_pool_3x3-skip_connect", {"max_pool_3x3"}, {"skip_connect"}),
        ("cells-skip_connect-max_pool_3x3", {"skip_connect"}, {"max_pool_3x3"})]
    data = json.loads(out.read_text())
    assert data["scored"] == ["reduce"]
    assert [r["test_acc"] for r in data["records"]] == pytest.approx([0.505, 0.505, 0.755])


def test_planted_data_command_describes_the_task(capsys):
    from engine.cli import main
    assert main(["data", "--dataset", "planted-polarity"]) == 0
    out = capsys.readouterr().out
    assert "planted-polarity" in out and "1x20x20" in out and "2: class0, class1" in out


def test_load_dataset_of_a_planted_task_takes_only_the_counts():
    d = load_dataset("planted-lag", n_train=64, n_test=32, size=99, channels=3, seed=7)
    assert d.train_images.shape == (64, 16, 16, 1) and d.test_images.shape == (32, 16, 16, 1)
    assert d.pad == 0 and d.flip is False


@pytest.mark.slow
def test_quick_protocol_writes_shares_margins_and_a_verdict(planted, tmp_path, monkeypatch):
    """bench/planted.py --quick end to end: a shard alone on its --work does every search and training and
    writes no table; collected, nothing trains again; every record kept in --work."""
    out, work = tmp_path / "p.json", tmp_path / "work"
    assert planted.main(["--quick", "--work", str(work), "--json", str(out), "--shard", "1/2"]) == 0
    assert not out.exists() and not list(work.rglob("*.claim"))
    assert len(list(work.rglob("train-*.json"))) == 4 and len(list(work.rglob("search-*.json"))) == 1

    def no_training(*a, **k):
        raise AssertionError("trained again although the result was kept in --work")
    import search_quality
    monkeypatch.setattr(search_quality, "Trainer", no_training)
    assert planted.main(["--quick", "--work", str(work), "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    rows = {r["name"]: r for r in data["records"]}
    assert set(rows) == {"random0", "random1", "random2", "searched0"}
    searched = rows["searched0"]
    g = Genotype.from_json(searched["genotype_json"])
    assert searched["share_normal"] == g.share(PLANTED["planted-lag"][1])["normal"]
    assert len(searched["decided"]["normal"]) == 8 and 0 <= searched["min_p"] <= 1
    assert searched["family_edges"] == sum(searched["decided_family"].values())
    assert data["verdict"]["family_edges_real"] == [searched["family_edges"]]
    # planted-lag scores both cell types, pooled
    assert searched["share_scored"] == (searched["share_normal"] + searched["share_reduce"]) / 2
    assert searched["above_p90"] == (searched["share_scored"] > data["verdict"]["random_share_p90"])
    assert data["verdict"]["real_n"] == 1 and isinstance(data["verdict"]["passes"], bool)
    assert all(0 <= r["test_acc"] <= 1 for r in data["records"])
    again = tmp_path / "again.json"
    assert planted.main(["--quick", "--work", str(work), "--json", str(again)]) == 0
    assert json.loads(again.read_text())["records"] == data["records"]
    # a shard of the searches (--random 0, as the protocol's two processes split the seeds): it reuses the
    # cache, prints a line and exits 0 instead of a numpy error on an empty random percentile
    shard = tmp_path / "shard.json"
    args = ["--task", "planted-lag", "--random", "0", "--search-seeds", "0", "--shuffled-seeds", "",
            "--train-seeds", "0", "--epochs", "1"]
    for o in planted.QUICK["overrides"]:
        args += ["--set", o]
    assert planted.main(args + ["--work", str(work), "--json", str(shard)]) == 0 and not shard.exists()
