"""A curriculum (config `curriculum`, `curriculum_epochs`): the run's first epochs train, search and evaluate on
an easier data set, the rest and the optimize phase on the run's own; a stop at the switch resumes to the same
run; a control's shuffled labels reach the curriculum too; a curriculum that does not fit is a one-line error."""
from __future__ import annotations

import json

import numpy as np
import pytest

from engine.build import build_run, load_data
from engine.cli import main
from engine.config import preset
from engine.data import make_splits
from engine.errors import ConfigError, DataError
from engine.genotype import Genotype
from engine.trainer import Trainer

from .conftest import load_bench, quiet, read_metrics, untimed

TINY = ["dataset=planted-polarity", "curriculum=planted-polarity-near", "curriculum_epochs=2",
        "synthetic_train=256", "synthetic_test=64", "warmup_epochs=1", "search_epochs=2", "optimize_epochs=1"]


def test_the_first_epochs_read_the_curriculum_and_the_rest_the_data_set():
    cfg = preset("planted").override(TINY)
    run = build_run(cfg)
    near = make_splits(load_data(cfg.override(["dataset=planted-polarity-near"])), cfg.val_fraction, cfg.seed)
    for epoch in (0, 1):
        loaders = run.supernet_loaders(epoch)
        assert loaders is run.curriculum_loaders and "test" not in loaders
        assert np.array_equal(loaders["train"].images, near["train"][0])
        assert np.array_equal(loaders["arch"].labels, near["val"][1])
    assert run.supernet_loaders(2) is run.loaders
    assert np.array_equal(run.loaders["train"].images, run.splits["train"][0])
    assert not np.array_equal(run.loaders["train"].images, near["train"][0])


def test_a_run_switches_data_after_the_curriculum_and_resumes_across_the_switch(tmp_path):
    cfg = preset("planted").override(TINY)
    said = []
    full = Trainer(cfg, str(tmp_path / "full"), log=said.append).run()
    records = [r for r in read_metrics(tmp_path / "full") if r["phase"] != "final" and "event" not in r]
    assert [(r["phase"], r["data"]) for r in records] == [
        ("warmup", "planted-polarity-near"), ("search", "planted-polarity-near"), ("search", "planted-polarity"),
        ("optimize", "planted-polarity")]
    assert sum("(the curriculum) for the first 2 epoch(s)" in line for line in said) == 1
    assert sum("data: planted-polarity from here on" in line for line in said) == 1

    out = tmp_path / "stopped"
    assert Trainer(cfg, str(out), log=quiet, stop_after=2).run() is None  # stopped at the switch
    resumed = Trainer(cfg, str(out), resume=True, log=quiet).run()
    assert untimed(read_metrics(out)) == untimed(read_metrics(tmp_path / "full"))
    assert resumed["test_acc"] == full["test_acc"] and resumed["genotype"] == full["genotype"]


def test_shuffled_labels_reach_the_curriculum_too():
    """The control must see no labelled signal at all: were the curriculum's labels left real, a shuffled-label
    search would still learn the easier task and prefer its ops."""
    cfg = preset("planted").override(TINY)

    def labels(run):  # the official training set's labels: its train and val splits
        return np.concatenate([run.curriculum_loaders["train"].labels, run.curriculum_loaders["arch"].labels])
    real, shuffled = labels(build_run(cfg)), labels(build_run(cfg.override(["shuffle_labels=true"])))
    assert (real != shuffled).mean() > 0.3
    assert np.array_equal(np.sort(real), np.sort(shuffled))  # the same labels, given to other images


@pytest.mark.parametrize("overrides, says", [
    (["curriculum_epochs=0"], "set both curriculum and curriculum_epochs"),
    (["curriculum="], "set both curriculum and curriculum_epochs"),
    (["curriculum=mnist"], "curriculum='mnist': choose one of"),
    (["curriculum_epochs=3"], "must be under the supernet's 3 epochs"),
    (["curriculum=imagefolder"], "imagefolder has none"),
])
def test_a_curriculum_config_that_cannot_work_is_refused(overrides, says):
    with pytest.raises(ConfigError, match=says.replace("(", r"\(")):
        preset("planted").override(TINY + overrides)


def test_a_curriculum_of_another_shape_is_refused_before_anything_runs(tmp_path):
    cfg = preset("planted").override(TINY + ["curriculum=planted-lag"])  # 16x16 images, the task's 20x20
    with pytest.raises(ConfigError, match=r"curriculum=planted-lag does not fit dataset=planted-polarity: image "
                                          r"shape \(1, 16, 16\) against \(1, 20, 20\)"):
        Trainer(cfg, str(tmp_path / "run"), log=quiet).run()


def test_the_protocol_reads_where_a_search_stood_when_its_curriculum_ended(tmp_path):
    """bench/planted.py's `curriculum_end`: the share the easier data alone had found, beside the final one. Its
    genotype, rederived from the probabilities of the curriculum's last record, is the one the run derived then."""
    planted, search_quality = load_bench("planted"), load_bench("search_quality")
    cfg = preset("planted").override(TINY)
    search_quality.search(cfg, 0, str(tmp_path))
    run_dir = search_quality.search_dir(cfg, 0, str(tmp_path))
    end = planted.curriculum_end(cfg, run_dir, ("max_pool_3x3",), ("reduce",))
    records = read_metrics(run_dir)
    at_switch = [r for r in records if r.get("global_epoch") == 2 and "probs" in r]
    assert end["global_epoch"] == 2 and end["genotype"] == at_switch[0]["genotype"]
    assert end["val_acc"] == at_switch[0]["val_acc"]
    assert [r["data"] for r in records if "probs" in r] == ["planted-polarity-near"] * 2 + ["planted-polarity"]
    assert planted.curriculum_end(preset("planted"), run_dir, ("max_pool_3x3",), ("reduce",)) is None


def test_training_a_genotype_with_a_search_config_drops_the_curriculum(tmp_path):
    """`aso-se train` has no supernet epochs for a curriculum to take: a search's settings, curriculum included,
    train the genotype on the data set itself."""
    (tmp_path / "g.json").write_text(json.dumps(Genotype.random(np.random.default_rng(0)).to_json()))
    sets = [a for kv in TINY for a in ("--set", kv)]
    assert main(["train", "--preset", "planted", *sets, "--genotype", str(tmp_path / "g.json"),
                 "--out", str(tmp_path / "t")]) == 0
    records = read_metrics(tmp_path / "t")
    assert [r["phase"] for r in records] == ["optimize", "final"] and "data" not in records[0]


def test_a_curriculum_whose_data_is_missing_names_the_curriculum(tmp_path, monkeypatch):
    import engine.data.readers as readers
    monkeypatch.setattr(readers, "FASHION_MNIST_DIR", str(tmp_path / "nothing-here"))
    cfg = preset("planted").override(TINY + ["curriculum=fashion-mnist"])
    with pytest.raises(DataError, match=r"^curriculum=fashion-mnist: "):
        build_run(cfg)
