"""bench/search_quality.py: the searched-against-random protocol, run in its --quick form on synthetic data."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading

import pytest

from .conftest import load_bench


@pytest.fixture(scope="module")
def sq():
    return load_bench("search_quality")


def test_summary_statistics(sq):
    random_accs = [0.90, 0.92, 0.91, 0.89]  # mean 0.905, sample sd 0.0129
    s = sq.summarize(random_accs, {"a": 0.925, "b": 0.91, "c": 0.85})
    assert s["random_mean"] == pytest.approx(0.905) and s["random_sd"] == pytest.approx(0.012910, abs=1e-6)
    a, b, c = s["searched"]["a"], s["searched"]["b"], s["searched"]["c"]
    assert (a["rank"], b["rank"], c["rank"]) == (1, 2, 5) and a["of"] == 5
    assert a["ri"] == pytest.approx(100 * 0.02 / 0.905)
    assert a["beats_mean_by_one_sd"] and not b["beats_mean_by_one_sd"] and not c["beats_mean_by_one_sd"]
    assert c["sds_above_mean"] == pytest.approx((0.85 - 0.905) / 0.012910, rel=1e-4)


@pytest.mark.slow
def test_quick_protocol_writes_every_architecture_and_resumes_from_its_work(sq, tmp_path, monkeypatch, capsys):
    work, out, trainer = tmp_path / "work", tmp_path / "sq.json", sq.Trainer
    # a shard with no other process on its --work does all the work (shards claim work, they do not split it
    # by position) and leaves no claim behind ...
    assert sq.main(["--quick", "--work", str(work), "--shard", "1/2"]) == 0
    assert not list(work.glob("*.claim")) and len(list(work.glob("train-*.json"))) == 4

    # ... so collecting the table finds every search and training in --work and trains nothing again
    def no_training(*a, **k):
        raise AssertionError("trained again although the result was kept in --work")
    monkeypatch.setattr(sq, "Trainer", no_training)
    assert sq.main(["--quick", "--work", str(work), "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    rows = data["records"]
    assert [r["kind"] for r in rows] == ["random"] * 3 + ["searched"]
    assert len({r["genotype"] for r in rows}) == 4
    for r in rows:
        assert 0 <= r["test_acc"] <= 1 and r["params"] > 0 and r["train_s"] > 0
    accs = [r["test_acc"] for r in rows if r["kind"] == "random"]
    summary = data["summary"]
    assert summary["random_mean"] == pytest.approx(sum(accs) / 3)
    searched = rows[-1]
    assert summary["searched"]["search0"]["rank"] == 1 + sum(a > searched["test_acc"] for a in accs)
    assert data["protocol"]["recipe"]["optimize_init"] == "fresh"
    assert data["protocol"]["recipe"]["warmup_epochs"] == 0 and data["protocol"]["recipe"]["search_epochs"] == 0

    # the results file extends to more training seeds without its --work: --import enters its trainings as
    # finished ones, so a fresh --work that holds only the search record trains nothing
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    [search_record] = work.glob("search-seed0-*.json")
    shutil.copy(search_record, fresh)
    assert sq.main(["--quick", "--work", str(fresh), "--import", str(out), "--json", str(tmp_path / "imported.json")]) == 0
    imported = json.loads((tmp_path / "imported.json").read_text())["records"]
    assert [r["per_seed"] for r in imported] == [r["per_seed"] for r in rows]
    assert [r["per_seed_train_s"] for r in imported] == [r["per_seed_train_s"] for r in rows]
    assert len(list(fresh.glob("train-*.json"))) == 4
    # a file written before a config field existed (its recipe lacks it: it had the default) still imports
    older = json.loads(out.read_text())
    for field in ("image_size", "cache_dir", "holdout_fraction"):
        del older["protocol"]["recipe"][field]
    (tmp_path / "older.json").write_text(json.dumps(older))
    older_work = tmp_path / "older"
    older_work.mkdir()
    shutil.copy(search_record, older_work)
    def no_training(*a, **k):
        raise AssertionError("trained although the imported file held the training")
    with monkeypatch.context() as m:
        m.setattr(sq, "Trainer", no_training)
        assert sq.main(["--quick", "--work", str(older_work), "--import", str(tmp_path / "older.json")]) == 0
    assert len(list(older_work.glob("train-*.json"))) == 4
    # ... and a file of another recipe is refused in one line that names what differs
    capsys.readouterr()
    assert sq.main(["--quick", "--work", str(tmp_path / "other"), "--set", "batch_size=16", "--import", str(out)]) != 0
    assert "batch_size" in capsys.readouterr().err
    assert sq.main(["--quick", "--work", str(tmp_path / "other"), "--import", str(work / "nothing.json")]) != 0
    assert "not a search_quality results file" in capsys.readouterr().err

    # a --derive rule that gives the search's own genotype trains nothing either: it is reported
    # with the results of the genotype it equals
    assert sq.main(["--quick", "--work", str(work), "--json", str(tmp_path / "again.json"),
                    "--derive", "max_skip=2"]) == 0
    again = json.loads((tmp_path / "again.json").read_text())
    assert [r["test_acc"] for r in again["records"]] == [r["test_acc"] for r in rows] + [searched["test_acc"]]
    assert again["records"][-1]["name"] == "search0+max_skip=2"
    assert again["records"][-1]["genotype"] == searched["genotype"]
    assert "rank" in capsys.readouterr().out

    # the search record keeps the probabilities its genotype was derived from, so other rules need no search
    [record] = [json.loads(p.read_text()) for p in work.glob("search-seed0-*.json")]
    cfg = sq.preset("smoke")
    assert sq.rederive(cfg, record, []) == sq.Genotype.from_json(record["genotype"])
    none_free = sq.rederive(cfg, record, ["max_skip=0", "max_param_free=0", "max_param_free_reduce=0"])
    assert none_free.param_free_fraction() == {"normal": 0.0, "reduce": 0.0}
    capsys.readouterr()
    assert sq.main(["--quick", "--work", str(work), "--derive", "max_param_free_reduce=-3"]) != 0
    assert "max_param_free_reduce=-3" in capsys.readouterr().err  # a wrong rule is refused before any work

    # --random-spread adds random genotypes across the cost range, from all convolutions to none; they are
    # rows of their own kind and stay out of the random mean that searched genotypes are ranked against
    monkeypatch.setattr(sq, "Trainer", trainer)
    assert sq.main(["--quick", "--work", str(work), "--random-spread", "2", "--json", str(tmp_path / "sp.json")]) == 0
    spread = json.loads((tmp_path / "sp.json").read_text())
    assert [r["kind"] for r in spread["records"]] == ["random"] * 3 + ["spread"] * 2 + ["searched"]
    assert [r["param_free_normal"] for r in spread["records"][3:5]] == [0.0, 1.0]
    assert spread["summary"] == data["summary"] and spread["protocol"]["random_spread"] == 2


def test_bad_shard_is_one_line(sq, tmp_path):
    with pytest.raises(SystemExit, match="--shard"):
        sq.main(["--quick", "--work", str(tmp_path), "--shard", "2/2"])


def test_work_is_claimed_so_processes_sharing_it_never_compute_a_record_twice(sq, tmp_path, monkeypatch):
    work, computed = str(tmp_path), []

    def compute(run_dir):
        computed.append(os.path.basename(run_dir))
        return {"v": len(computed)}

    def claim(name, holder):
        (tmp_path / f"{name}-k.json.claim").write_text(holder)

    def finish(name, record):  # what the other process does when its training ends
        (tmp_path / f"{name}-k.json.tmp").write_text(json.dumps(record))
        os.replace(tmp_path / f"{name}-k.json.tmp", tmp_path / f"{name}-k.json")

    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        claim("train-a-seed0", f"{socket.gethostname()} {other.pid}")
        with pytest.raises(sq.Busy, match=str(other.pid)):  # a shard skips it
            sq._cached(work, "train-a-seed0", "k", compute, busy="skip")
        monkeypatch.setattr(sq, "POLL_S", 0.01)
        threading.Timer(0.2, finish, ("train-a-seed0", {"v": 7})).start()
        assert sq._cached(work, "train-a-seed0", "k", compute) == {"v": 7}  # collecting waits for its record
        assert computed == []
    finally:
        other.kill()
        other.wait()
    claim("train-b-seed0", f"{socket.gethostname()} {other.pid}")  # a claim of a killed shard is taken over
    assert sq._cached(work, "train-b-seed0", "k", compute, busy="skip") == {"v": 1}
    assert computed == ["train-b-seed0-k"] and not (tmp_path / "train-b-seed0-k.json.claim").exists()
    assert json.loads((tmp_path / "train-b-seed0-k.json").read_text()) == {"v": 1}
    claim("train-c-seed0", "another-host 1")  # a process on another host sharing --work: not ours to judge
    with pytest.raises(sq.Busy, match="another-host"):
        sq._cached(work, "train-c-seed0", "k", compute, busy="skip")

    def fails(run_dir):
        raise RuntimeError("stopped")
    with pytest.raises(RuntimeError):
        sq._cached(work, "train-d-seed0", "k", fails)
    assert not list(tmp_path.glob("train-d-*"))  # a failed training leaves neither a record nor its claim


def test_a_latency_table_of_another_network_stops_before_any_work(sq, tmp_path, capsys):
    """The Fashion-MNIST table against the quick protocol's smoke network: one line, exit 2, nothing computed."""
    table = os.path.join(os.path.dirname(__file__), "..", "bench", "results",
                         "latency-check-fashion-mnist-cpu-b1-2026-12-05.json")
    work = tmp_path / "work"
    assert sq.main(["--quick", "--latency-table", table, "--work", str(work)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("search_quality: error: latency_table") and "another network" in err[-1]
    assert not work.exists() or not os.listdir(work)
