"""The four-phase trainer: run directory, resume, the regression tests for the failures that sank earlier
attempts (none poisoning, collapse at the switch, batch mismatch, double backward, NaN), and bad input."""
from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch

from engine.genotype import Genotype
from engine.checkpoint import load_checkpoint
from engine.cli import main
from engine.config import preset
from engine.data import Cycle
from engine.errors import TrainingError
from engine.steps import Steps
from engine.trainer import Trainer

from .conftest import load_bench, needs_fashion_mnist, quiet, read_metrics, untimed


def _run(cfg, out, **kw):
    return Trainer(cfg, str(out), log=quiet, **kw).run()


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke")
    cfg = preset("smoke")
    final = _run(cfg, out)
    return cfg, out, final


# ------------------------------------------------------------------------------------ run directory
def test_run_directory_contents(smoke_run):
    cfg, out, final = smoke_run
    names = set(os.listdir(out))
    assert {"config.json", "metrics.jsonl", "genotype.json", "final.json", "checkpoints"} <= names
    assert set(os.listdir(out / "checkpoints")) == {"last.pt", "warmup.pt", "search.pt", "growth.pt", "optimize.pt"}
    assert json.loads((out / "config.json").read_text()) == cfg.to_json()
    data = json.loads((out / "final.json").read_text())
    assert {"test_acc", "params", "wall_s", "genotype"} <= set(data) and 0 <= data["test_acc"] <= 1
    assert data == final
    records = read_metrics(out)
    epochs = [r for r in records if "event" not in r and r.get("phase") in ("warmup", "search", "growth", "optimize")]
    assert [r["event"] for r in records if "event" in r] == ["grow_depth"]  # the smoke preset grows once
    assert [r["phase"] for r in epochs] == ["warmup", "search", "growth", "optimize"]
    for r in epochs:  # the parameter-free share of the current genotype, per cell type, every epoch
        assert set(r["param_free"]) == {"normal", "reduce"} and all(0 <= v <= 1 for v in r["param_free"].values())
    searched = Genotype.from_json(json.loads((out / "final.json").read_text())["genotype"])
    assert epochs[-2]["param_free"] == searched.param_free_fraction()  # the last search epoch's genotype
    for r in epochs:
        for key in ("epoch", "train_loss", "train_acc", "val_acc", "mean_entropy", "tau", "it_s", "images_s",
                    "elapsed_s", "params"):
            assert key in r, key
    assert records[-1]["phase"] == "final" and records[-1]["test_acc"] == final["test_acc"]
    # the logits' drift over the architecture steps so far (ArchState.drift), in the searching epochs
    search, growth = epochs[1], epochs[2]
    assert "drift" not in epochs[0] and "drift" not in epochs[3]
    assert search["arch_grad_steps"] == search["arch_steps"] > 0 and growth["arch_grad_steps"] == growth["arch_steps"]
    assert all(len(search["drift"][t]) == 14 and any(any(v != 0 for v in row) for row in search["drift"][t])
               for t in ("normal", "reduce"))
    geno = json.loads((out / "genotype.json").read_text())
    assert set(geno) == {"normal", "normal_concat", "reduce", "reduce_concat"}
    state = load_checkpoint(str(out / "checkpoints" / "last.pt"))
    for key in ("supernet", "arch", "weight_opt", "arch_opt", "rng", "phase_index", "epoch", "global_step",
                "config", "genotype", "final_net", "final_opt"):
        assert key in state
    assert not [n for n in os.listdir(out / "checkpoints") if n.startswith(".tmp")]  # atomic writes left no debris


def test_eval_command_reproduces_the_final_test_accuracy(smoke_run, capsys):
    _, out, final = smoke_run
    assert main(["eval", "--checkpoint", str(out / "checkpoints" / "last.pt")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["accuracy"] == pytest.approx(final["test_acc"], abs=1e-6) and result["model"] == "derived network"
    assert main(["eval", "--checkpoint", str(out / "checkpoints" / "search.pt"), "--split", "val"]) == 0
    assert json.loads(capsys.readouterr().out)["model"] == "genotype inside the supernet"


def test_train_command_trains_a_genotype_from_scratch(smoke_run, tmp_path):
    _, out, _ = smoke_run
    assert main(["train", "--preset", "smoke", "--genotype", str(out / "genotype.json"), "--out",
                 str(tmp_path / "t")]) == 0
    records = read_metrics(tmp_path / "t")
    assert [r["phase"] for r in records] == ["optimize", "final"]
    trained = Genotype.load(str(out / "genotype.json"))
    assert records[0]["genotype"] == str(trained) and records[0]["param_free"] == trained.param_free_fraction()


# ------------------------------------------------------------------------------------------- resume
@pytest.mark.parametrize("stop_after", [1, 2, 3])  # 2: mid-search, the logits' drift sums restored
def test_resume_matches_an_uninterrupted_run(smoke_run, tmp_path, stop_after):
    _, full_out, full_final = smoke_run
    out = tmp_path / "run"
    cfg = preset("smoke")
    assert _run(cfg, out, stop_after=stop_after) is None
    assert len([r for r in read_metrics(out) if r["phase"] != "final" and "event" not in r]) == stop_after
    final = Trainer(cfg, str(out), resume=True, log=quiet).run()
    assert untimed(read_metrics(out)) == untimed(read_metrics(full_out))
    assert (out / "genotype.json").read_text() == (full_out / "genotype.json").read_text()
    assert final["test_acc"] == full_final["test_acc"]


@pytest.mark.slow
def test_on_make_runs_path_reruns_and_resumes_are_bit_for_bit(tmp_path, monkeypatch):
    """The suite's CPU runs take the Triton interpreter (TRITON_INTERPRET=1, conftest) where `make run` takes the
    PyTorch reference (kernels.mixed_sum.mixed_sum_ref): here the reference alone, proven by a spy, must give a
    rerun and a resumed run equal to a first uninterrupted one, bit for bit."""
    import kernels.mixed_sum as ms
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    calls = {"ref": 0}
    ref = ms.mixed_sum_ref

    def counted(xs, w):
        calls["ref"] += 1
        return ref(xs, w)

    def no_kernel(*a):
        raise AssertionError("the Triton kernel ran on make run's path")
    monkeypatch.setattr(ms, "mixed_sum_ref", counted)
    monkeypatch.setattr(ms.MixedSumFn, "apply", no_kernel)
    cfg = preset("smoke").override(["steps_per_epoch=4"])
    first = _run(cfg, tmp_path / "first")
    assert calls["ref"] > 0
    again = _run(cfg, tmp_path / "again")
    assert _run(cfg, tmp_path / "resumed", stop_after=2) is None
    resumed = Trainer(cfg, str(tmp_path / "resumed"), resume=True, log=quiet).run()
    for out, final in (("again", again), ("resumed", resumed)):
        assert untimed(read_metrics(tmp_path / out)) == untimed(read_metrics(tmp_path / "first")), out
        assert final["test_acc"] == first["test_acc"] and final["genotype"] == first["genotype"], out


def test_resume_rewinds_metrics_written_after_the_checkpoint(tmp_path):
    out = tmp_path / "run"
    cfg = preset("smoke")
    _run(cfg, out, stop_after=2)
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"phase": "search", "epoch": 99}) + "\n")  # an epoch that never checkpointed
    Trainer(cfg, str(out), resume=True, log=quiet, stop_after=0)
    assert len(read_metrics(out)) == 2


def test_machine_record_says_when_a_resume_computes_on_another_kind_of_machine(tmp_path):
    out, cfg = tmp_path / "run", preset("smoke")
    _run(cfg, out, stop_after=1)
    record = json.loads((out / "machine.json").read_text())
    here = torch.backends.cpu.get_cpu_capability()
    assert record["resumed"] == [] and record["started"]["cpu_capability"] == here
    assert record["started"]["cpu_threads"] == torch.get_num_threads()

    def resume() -> list[str]:
        said = []
        Trainer(cfg, str(out), resume=True, log=said.append, stop_after=0)
        return [m for m in said if "another kind of machine" in m]
    assert resume() == []  # the same machine: nothing to say
    record = json.loads((out / "machine.json").read_text())
    assert len(record["resumed"]) == 1
    other = "AVX2" if here != "AVX2" else "AVX512"
    record["resumed"][0]["cpu_capability"] = other  # the last resume ran on another CPU
    (out / "machine.json").write_text(json.dumps(record))
    [line] = resume()
    assert f"cpu_capability: {other} -> {here}" in line and "bit for bit" in line
    assert len(json.loads((out / "machine.json").read_text())["resumed"]) == 2
    (out / "machine.json").unlink()  # a run from before the record: its start is unknown, nothing compared
    assert resume() == []
    record = json.loads((out / "machine.json").read_text())
    assert record["started"] is None and len(record["resumed"]) == 1
    (out / "machine.json").write_text('{"started": null, "resumed": "damaged"}')  # unreadable: the same
    assert resume() == []
    record = json.loads((out / "machine.json").read_text())
    assert record["started"] is None and record["resumed"][0]["cpu_capability"] == here


def test_damaged_checkpoint_stops_with_one_line_and_loses_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    _run(preset("smoke"), out, stop_after=2)
    (out / "checkpoints" / "last.pt").write_bytes(b"PK\x03\x04 this is not a checkpoint")
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.rglob("*") if p.is_file()}
    code = main(["search", "--resume", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "last.pt" in err and "damaged checkpoint" in err
    after = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.rglob("*") if p.is_file()}
    assert before == after


def test_a_checkpoint_with_damaged_gradient_sums_stops_with_one_line(tmp_path, capsys):
    """The drift's sums of another shape (or damaged) in an otherwise sound checkpoint: refused in one line naming
    the file, nothing rewritten."""
    from engine.checkpoint import save_checkpoint
    out = tmp_path / "run"
    _run(preset("smoke"), out, stop_after=2)
    path = out / "checkpoints" / "last.pt"
    state = load_checkpoint(str(path))
    state["arch_counters"]["grad_sum"] = torch.zeros(3, 3)
    save_checkpoint({k: v for k, v in state.items() if k not in ("format", "version")}, str(path))
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.rglob("*") if p.is_file()}
    code = main(["search", "--resume", str(out)])
    err = capsys.readouterr().err.strip()
    assert code != 0 and len(err.splitlines()) == 1
    assert "last.pt" in err and "incompatible checkpoint (arch_counters" in err
    assert before == {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.rglob("*") if p.is_file()}


def test_resume_with_nvtx_profiling(smoke_run, tmp_path):
    # --nvtx changes no result, so it may be switched on for a resumed run (it used to make the configs differ):
    # the resumed, profiled run ends exactly where the uninterrupted one does
    _, full_out, full_final = smoke_run
    out = tmp_path / "run"
    _run(preset("smoke"), out, stop_after=2)
    assert main(["search", "--resume", str(out), "--nvtx"]) == 0
    final = json.loads((out / "final.json").read_text())
    assert final["epochs"] == 4 and final["test_acc"] == full_final["test_acc"]
    assert untimed(read_metrics(out)) == untimed(read_metrics(full_out))


def test_resume_on_another_device_of_the_same_kind_but_not_with_another_seed(tmp_path, capsys):
    out = tmp_path / "run"
    _run(preset("smoke"), out, stop_after=2)  # device "auto": the CPU here
    assert main(["search", "--resume", str(out), "--seed", "3"]) == 2
    assert "drop --seed" in capsys.readouterr().err
    assert main(["search", "--resume", str(out), "--device", "cpu"]) == 0
    assert json.loads((out / "final.json").read_text())["epochs"] == 4


def test_incompatible_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    _run(preset("smoke"), out, stop_after=1)
    cfg = json.loads((out / "config.json").read_text())
    cfg["channels"] = 6
    (out / "config.json").write_text(json.dumps(cfg))
    code = main(["search", "--resume", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "last.pt" in err and "different config" in err
    assert main(["search", "--resume", str(tmp_path / "nothing-here")]) == 2
    assert "config.json" in capsys.readouterr().err


def test_out_directory_holding_a_run_is_not_overwritten(smoke_run, capsys):
    _, out, _ = smoke_run
    before = (out / "metrics.jsonl").read_text()
    code = main(["search", "--preset", "smoke", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "already holds a run" in err and "--resume" in err
    assert (out / "metrics.jsonl").read_text() == before


# ------------------------------------------------------------------------- regression: past failures
def test_no_none_poisoning(tmp_path):
    """Warmup learns (accuracy well above chance after one epoch); and sampled architectures in search
    learn too, which a `none`-dominated init would stop (checked by poisoning the init on purpose)."""
    cfg = preset("smoke").override(["synthetic_train=2048", "growth_epochs=0", "optimize_epochs=0"])
    _run(cfg, tmp_path / "a")
    warm, search = [r for r in read_metrics(tmp_path / "a") if r["phase"] in ("warmup", "search")]
    assert warm["val_acc"] > 0.3 and warm["train_acc"] > 0.2, warm  # chance: 0.1
    assert search["arch_acc"] > 0.3, search
    poisoned = cfg.override(["none_init=6.0", "handover_bias=0"])
    _run(poisoned, tmp_path / "b")
    bad = [r for r in read_metrics(tmp_path / "b") if r["phase"] == "search"][0]
    assert bad["arch_acc"] < 0.2, bad  # the same search with `none` dominating the init stays near chance


@pytest.mark.slow
@needs_fashion_mnist
@pytest.mark.parametrize("seed", [0, 1])
def test_no_collapse_when_search_begins(tmp_path, seed):
    """The main job's preset on a third of the training set (156 steps per epoch instead of 469): the architecture
    the search believes in after its first epoch is about as good as the warmup's. Two seeds: with the logits'
    init spread at 0.5 seed 0 passed by luck (drop 0.04) while seeds 1-3 dropped 0.09-0.19."""
    bench = load_bench("switch")  # bench/switch.py measures the same switch over more seeds
    r = bench.switch(preset("fashion-mnist").override(bench.SETTING + [f"seed={seed}"]), str(tmp_path))
    assert r["warmup_val"] > 0.5, r  # the warmup really learned something to lose
    assert r["search_val"] >= r["warmup_val"] - 0.05, r


# the switch on the synthetic set, with the main job's search settings: runs without Fashion-MNIST
SYNTHETIC_SWITCH = ["dataset=synthetic", "synthetic_size=16", "synthetic_train=4096", "synthetic_test=256",
                    "loader=tensor", "warmup_epochs=1", "search_epochs=1", "growth_epochs=0", "optimize_epochs=0",
                    "eval_samples=0"]


@pytest.mark.slow
def test_no_collapse_when_search_begins_on_synthetic_data(tmp_path, seed=1):
    """The synthetic twin of the test above. Measured 2026-12-05, seeds 0 and 1: the preset gains at the switch
    (val 56.6 -> 64.4%, 73.3 -> 76.2%); the behaviour before its remedies (gate_ops=false handover_bias=0
    init_std=0.5) drops 11.2 and 43.3 points (56.6 -> 45.4%, 73.3 -> 30.1%) and fails here. Seed 1 runs (the
    suite's time is counted): its old-behaviour drop is the larger."""
    bench = load_bench("switch")
    r = bench.switch(preset("fashion-mnist").override(SYNTHETIC_SWITCH + [f"seed={seed}"]), str(tmp_path))
    assert r["warmup_val"] > 0.5, r
    assert r["search_val"] >= r["warmup_val"] - 0.05, r


def test_no_batch_mismatch_with_partial_batches_in_every_phase(tmp_path):
    cfg = preset("smoke").override(["synthetic_train=203", "synthetic_test=77", "batch_size=32",
                                    "eval_batch_size=50", "optimize_batch_size=32", "drop_last=false"])
    final = _run(cfg, tmp_path)
    phases = [r["phase"] for r in read_metrics(tmp_path) if "event" not in r]
    assert phases == ["warmup", "search", "growth", "optimize", "final"] and final["test_acc"] >= 0


def test_no_double_backward_in_200_alternating_steps(tmp_path):
    trainer = Trainer(preset("smoke"), str(tmp_path), log=quiet)
    steps, loaders = trainer.steps, trainer.loaders
    train, val = Cycle(loaders["train"]), Cycle(loaders["arch"])
    for i in range(200):
        x, y = next(train)
        xa, ya = next(val)
        assert not steps.weight_step(x, y, "search").skipped
        assert not steps.arch_step(xa, ya, "search").skipped


def test_arch_steps_never_change_weights_and_weight_steps_never_change_logits(tmp_path):
    trainer = Trainer(preset("smoke"), str(tmp_path), log=quiet)
    steps = trainer.steps
    x, y = next(iter(trainer.loaders["train"]))
    weights = [p.detach().clone() for p in trainer.net.parameters()]
    logits = [p.detach().clone() for p in trainer.arch.parameters()]
    steps.arch_step(x, y, "search")
    assert all(torch.equal(a, b) for a, b in zip(weights, trainer.net.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(logits, trainer.arch.parameters()))
    logits = [p.detach().clone() for p in trainer.arch.parameters()]
    steps.weight_step(x, y, "search")
    assert all(torch.equal(a, b) for a, b in zip(logits, trainer.arch.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(weights, trainer.net.parameters()))


def _finite(trainer) -> bool:
    nets = [trainer.net] + ([trainer.final_net] if trainer.final_net is not None else [])
    return all(torch.isfinite(p).all() for n in nets for p in n.parameters()) and \
        all(torch.isfinite(p).all() for p in trainer.arch.parameters())


def test_nan_losses_are_skipped_and_counted(tmp_path, monkeypatch):
    real = Steps.criterion
    calls = {"n": 0}

    def sometimes_nan(self, logits, y):
        calls["n"] += 1
        loss = real(self, logits, y)
        return loss * float("nan") if calls["n"] % 7 == 0 else loss

    monkeypatch.setattr(Steps, "criterion", sometimes_nan)
    trainer = Trainer(preset("smoke").override(["nan_limit=1000"]), str(tmp_path), log=quiet)
    final = trainer.run()
    assert final["skipped_steps"] > 0 and _finite(trainer)


def test_nan_logits_fall_back_and_the_run_goes_on(tmp_path):
    out = tmp_path / "run"
    _run(preset("smoke"), out, stop_after=1)  # warmup done
    trainer = Trainer(preset("smoke"), str(out), resume=True, log=quiet)
    with torch.no_grad():
        trainer.arch.logits["normal"][3] = float("nan")
        trainer.arch.logits["reduce"][0, 2] = float("inf")
    final = trainer.run()
    assert final is not None and trainer.arch.state.nan_events >= 2 and trainer.arch.state.repaired_rows >= 2
    assert _finite(trainer)


def test_too_many_nan_losses_stop_the_run_with_the_last_checkpoint_intact(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    cfg = preset("smoke").override(["nan_limit=5"])  # trips inside the first resumed epoch
    _run(cfg, out, stop_after=1)
    last = (out / "checkpoints" / "last.pt").read_bytes()
    monkeypatch.setattr(Steps, "criterion", lambda self, logits, y: logits.sum() * float("nan"))
    with pytest.raises(TrainingError, match="nan_limit"):
        Trainer(cfg, str(out), resume=True, log=quiet).run()
    assert (out / "checkpoints" / "last.pt").read_bytes() == last
    code = main(["search", "--resume", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 3 and "nan_limit" in err and "last.pt" in err and len(err.splitlines()) == 1


def test_architecture_steps_begin_after_arch_start_epochs(tmp_path):
    cfg = preset("smoke").override(["search_epochs=2", "growth_epochs=0", "optimize_epochs=0",
                                    "arch_start_epochs=1"])
    trainer = Trainer(cfg, str(tmp_path), log=quiet)
    initial = {k: v.clone() for k, v in trainer.arch.state_dict().items()}
    trainer.run()
    search = [r for r in read_metrics(tmp_path) if r.get("phase") == "search"]
    steps_per_epoch = search[0]["step"] - [r for r in read_metrics(tmp_path) if r.get("phase") == "warmup"][-1]["step"]
    assert search[0]["arch_steps"] == 0 and search[0]["arch_acc"] is None  # weights alone in the first epoch
    assert search[0]["genotype"] == str(Genotype.from_probabilities(
        {t: torch.softmax(initial[f"logits.{t}"], 1) for t in ("normal", "reduce")}, 4, cfg.max_skip, None))
    assert search[1]["arch_steps"] == steps_per_epoch  # then one architecture step per weight step
    assert search[1]["tau"] == pytest.approx(cfg.tau_min)  # the temperature still anneals to its end
    assert any(not torch.equal(v, trainer.arch.state_dict()[k]) for k, v in initial.items())
