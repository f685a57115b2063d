"""Config: presets, overrides, validation (one line naming the field), and the CLI's help."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from engine.cli import build_parser, main
from engine.config import PRESETS, Config, load_config_file, preset
from engine.errors import ConfigError


def test_presets_validate_and_differ():
    for name in PRESETS:
        cfg = preset(name)
        cfg.validate()
    c10 = preset("cifar10")
    assert (c10.channels, c10.layers, c10.batch_size) == (16, 8, 64)
    assert (c10.warmup_epochs, c10.search_epochs, c10.growth_epochs, c10.optimize_epochs) == (15, 25, 30, 15)
    assert preset("smoke").dataset == "synthetic" and preset("fashion-mnist").dataset == "fashion-mnist"


@pytest.mark.parametrize("name", ["fashion-mnist", "cifar10", "smoke", "planted"])
def test_every_preset_can_train_a_genotype_alone(name, tmp_path, request, monkeypatch):
    """What `aso-se train` and the bench protocols run: the preset's optimize phase alone, from a fresh init, on
    a small share of its own data set (its network and recipe as they are; batches cut to fit the data, the
    test set to its first 256 images)."""
    import engine.build
    from engine.genotype import Genotype
    from engine.cli import TRAIN_ONLY
    from engine.trainer import Trainer
    small = {"fashion-mnist": ["train_subset=256"], "smoke": [], "planted": ["synthetic_train=256", "synthetic_test=64"]}
    if name == "fashion-mnist":
        request.getfixturevalue("fashion_mnist")  # skips without the real files
    if name == "cifar10":
        data_dir = request.getfixturevalue("cifar_dir")[0]
        small["cifar10"] = [f"data_dir={data_dir}", "batch_size=8", "optimize_batch_size=16", "eval_batch_size=16"]
    load = engine.build.load_data

    def first_test_images(cfg, device=None):
        dataset = load(cfg, device)
        dataset.test_images, dataset.test_labels = dataset.test_images[:256], dataset.test_labels[:256]
        return dataset
    monkeypatch.setattr(engine.build, "load_data", first_test_images)
    cfg = preset(name).override(TRAIN_ONLY + ["optimize_epochs=1", "loader=tensor"] + small[name])
    assert cfg.search_epochs == 0 and cfg.optimize_init == "fresh"
    genotype = Genotype.random(np.random.default_rng(0), cfg.nodes)
    final = Trainer(cfg, str(tmp_path / name), genotype=genotype, log=lambda *_: None).run()
    records = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    phases = [r["phase"] for r in records if "event" not in r]
    assert phases == ["optimize", "final"]
    assert records[0]["train_loss"] > 0 and records[0]["it_s"] > 0  # it trained: a loss over its steps
    assert 0.0 <= final["test_acc"] <= 1.0 and final["genotype"] == genotype.to_json()


def test_overrides_are_typed():
    cfg = preset("smoke").override(["search_epochs=2.5", "hard=false", "data_dir=/x", "max_cells=7",
                                    "search_tau_start=none", "tau_min=0.2"])
    assert cfg.search_epochs == 2.5 and cfg.hard is False and cfg.data_dir == "/x" and cfg.max_cells == 7
    assert cfg.search_tau_start is None and cfg.tau_min == 0.2


@pytest.mark.parametrize("assignment,field", [
    ("search_epochs=-1", "search_epochs"),
    ("tau_min=3.0", "tau_min"),
    ("skip_threshold=1.5", "skip_threshold"),
    ("dominant_threshold=-0.1", "dominant_threshold"),
    ("batch_size=0", "batch_size"),
    ("loader=pillow", "loader"),
    ("dataset=imagenet", "dataset"),
    ("channels=7", "channels"),
    ("hard=maybe", "hard"),
    ("layers=two", "layers"),
    ("optimize_channels=9", "optimize_channels"),
    ("arch_start_epochs=5", "arch_start_epochs"),  # past the search phase's end
    ("optimize_channels=16", "optimize_channels"),  # another width cannot take the supernet's weights
    ("logit_prior=reduce:maxpool=2", "logit_prior"),
    ("no_such_field=1", "no_such_field"),
])
def test_invalid_values_name_the_field(capsys, tmp_path, assignment, field):
    with pytest.raises(ConfigError, match=field):
        preset("smoke").override([assignment])
    code = main(["search", "--preset", "smoke", "--set", assignment, "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and field in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_unknown_preset(capsys, tmp_path):
    code = main(["search", "--preset", "imagenet-xl", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "unknown preset 'imagenet-xl'" in err and "fashion-mnist" in err


def test_unknown_op_in_a_genotype_file(capsys, tmp_path):
    g = tmp_path / "g.json"
    g.write_text(json.dumps({"normal": [["conv_11x11", 0]] * 8, "normal_concat": [2, 3, 4, 5],
                             "reduce": [["max_pool_3x3", 0]] * 8, "reduce_concat": [2, 3, 4, 5]}))
    code = main(["train", "--preset", "smoke", "--genotype", str(g), "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "conv_11x11" in err and str(g) in err and len(err.splitlines()) == 1


def test_config_file_round_trip_and_errors(tmp_path):
    cfg = preset("cifar10")
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg.to_json()))
    assert load_config_file(str(path)) == cfg
    path.write_text(json.dumps({**cfg.to_json(), "colour": "blue"}))
    with pytest.raises(ConfigError, match="colour"):
        load_config_file(str(path))
    path.write_text("{")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config_file(str(path))
    with pytest.raises(ConfigError, match="cannot read"):
        load_config_file(str(tmp_path / "missing.json"))


def test_every_field_has_a_default_and_survives_json():
    cfg = Config()
    assert Config.from_json(json.loads(json.dumps(cfg.to_json()))) == cfg


@pytest.mark.parametrize("command", ["search", "train", "eval", "data", "profile"])
def test_help_is_complete(capsys, command):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([command, "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: aso-se " + command)
    for action in build_parser()._subparsers._group_actions[0].choices[command]._actions:
        if action.help != "==SUPPRESS==" and action.option_strings:
            assert action.option_strings[-1] in text


def test_top_level_help_lists_every_command(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    text = capsys.readouterr().out
    for command in ("search", "train", "eval", "data", "profile"):
        assert command in text


@pytest.mark.parametrize("setting, device, expected", [
    ("auto", "cpu", (False, False)), ("auto", "cuda", (True, True)), ("on", "cpu", (True, True)),
    ("static", "cpu", (True, False)), ("static", "cuda", (True, False)), ("off", "cuda", (False, False)),
])
def test_compile_setting_picks_the_graphs(setting, device, expected):
    from engine.compile import resolve_policy
    preset("smoke").override([f"compile={setting}"])  # a valid value
    policy = resolve_policy(setting, torch.device(device))
    assert (policy["static"], policy["ops"]) == expected


def test_auto_device_says_loudly_when_a_gpu_is_present_but_unusable(monkeypatch, capsys):
    import engine.build as build
    monkeypatch.setattr(build.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(build, "_WARNED", set())
    real_exists = build.os.path.exists
    monkeypatch.setattr(build.os.path, "exists", lambda p: p == "/dev/nvidia0" or real_exists(p))
    assert build.resolve_device("auto").type == "cpu"
    assert build.resolve_device("auto").type == "cpu"
    err = capsys.readouterr().err
    assert err.count("WARNING") == 1 and "GPU is present" in err and "driver" in err and "--device cpu" in err
    monkeypatch.setattr(build.os.path, "exists", lambda p: False)   # no GPU at all: nothing to say
    assert build.unusable_gpu() is None
