"""Data-parallel runs (issue 15) on CPUs: gloo, 2 ranks on this machine, one thread each, smoke preset.

Ranks are spawned with torch.multiprocessing (the environment torchrun would set: RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR/PORT); one test launches the real `torchrun -m engine.cli`."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from engine import distributed
from engine.build import build_run
from engine.checkpoint import load_checkpoint
from engine.config import preset
from engine.errors import CheckpointError, TrainingError
from engine.stopping import Stopped, StopRequest
from engine.trainer import Trainer

from .conftest import quiet, untimed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# small: one epoch per supernet phase, 4 weight steps per epoch on each rank; two optimize epochs (the derived
# network is not evaluated between them, so each rank's BatchNorm statistics are its own at their checkpoint)
SMOKE = ["steps_per_epoch=4", "synthetic_train=512", "eval_batch_size=64", "optimize_epochs=2"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, name: str, args: tuple) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        globals()[name](rank, *args)
    finally:
        distributed.close(distributed.env_world())


def spawn(fn, *args, world: int = 2) -> None:
    mp.spawn(_rank_main, args=(world, _free_port(), fn.__name__, args), nprocs=world, join=True)


# ------------------------------------------------------------------------------------------ a whole run
def _search(rank: int, out: str, results: str, stop_after) -> None:
    cfg = preset("smoke").override(SMOKE)
    resume = os.path.isfile(os.path.join(out, "checkpoints", "last.pt"))  # both ranks resume from rank 0's
    trainer = Trainer(cfg, out, log=quiet, resume=resume, stop_after=stop_after)
    trainer.run()
    torch.save({"logits": {k: v.clone() for k, v in trainer.arch.state_dict().items()},
                "genotype": str(trainer.arch.genotype()), "train_batches": len(trainer.loaders["train"]),
                "weights": {k: v.clone() for k, v in trainer.net.state_dict().items()},
                "final": {k: v.clone() for k, v in trainer.final_net.state_dict().items()}},
               os.path.join(results, f"rank{rank}.pt"))


class _StopInSearch(StopRequest):
    """SIGTERM, as rank 0 alone sees it, from the search phase's second step on (smoke: 4 warmup steps)."""

    def __init__(self, progress):
        super().__init__()
        self.progress = progress
        self._asked = None

    @property
    def signum(self):
        return self._asked or (signal.SIGTERM if self.progress.global_step >= 6 else None)

    @signum.setter
    def signum(self, value):
        self._asked = value


def _search_stopped_mid_epoch(rank: int, out: str) -> None:
    """Rank 0 is asked to stop in search epoch 1; both ranks checkpoint at the same step (decisions are passed
    every SYNC_STEPS steps: 2 here) and stop."""
    from engine import loop
    loop.SYNC_STEPS = 2
    trainer = Trainer(preset("smoke").override(SMOKE), out, log=quiet)
    stop = _StopInSearch(trainer.progress) if rank == 0 else StopRequest()
    with pytest.raises(Stopped):
        trainer.loop(stop)()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out, results = tmp_path_factory.mktemp("ddp"), tmp_path_factory.mktemp("results")
    spawn(_search, str(out), str(results), None)
    return out, [torch.load(results / f"rank{r}.pt") for r in range(2)]


def _records(out) -> list[dict]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_two_ranks_end_with_identical_logits_and_genotype_and_rank_0_writes_once(two_ranks):
    out, ranks = two_ranks
    for k, v in ranks[0]["logits"].items():
        assert torch.equal(v, ranks[1]["logits"][k]), k  # bitwise
    assert ranks[0]["genotype"] == ranks[1]["genotype"]
    # the supernet's weights too (its BN running statistics are each rank's own between evaluations)
    for k, v in ranks[0]["weights"].items():
        if "running" not in k:
            assert torch.equal(v, ranks[1]["weights"][k]), k
    # every record once: no second writer appended lines
    records = _records(out)
    keys = [(r["phase"], r.get("epoch"), r.get("kind")) for r in records]
    assert len(keys) == len(set(keys))
    assert [r["phase"] for r in records if "epoch" in r][:3] == ["warmup", "search", "growth"]
    final = json.loads((out / "final.json").read_text())
    assert final["genotype_str"] == ranks[0]["genotype"]
    assert [c["compiles"] for c in final["compile_per_rank"]] == [0, 0]  # each rank's monitor (compile off here)
    # each rank played half of every epoch
    single = build_run(preset("smoke").override(SMOKE))
    assert ranks[0]["train_batches"] == ranks[1]["train_batches"] == len(single.loaders["train"]) // 2


def test_each_rank_reads_its_shard():
    cfg = preset("smoke").override(SMOKE + ["steps_per_epoch=0"])
    single = build_run(cfg)
    n = len(single.loaders["train"])
    from engine.build import make_loaders
    halves = [make_loaders(cfg, single.splits, single.augment, single.device, distributed.World(r, 2, r))
              for r in range(2)]
    assert [len(h["train"]) for h in halves] == [n // 2, n // 2]
    seen = [set(b.indices.tolist()) for h in halves for b in h["train"].plan.batches(0)]
    assert not set.intersection(set().union(*seen[:len(seen) // 2]), set().union(*seen[len(seen) // 2:]))
    # eval_sharding=shard: the val and test shards hold every sample exactly once between them
    for split in ("val", "test"):
        shards = [np.concatenate([b.indices for b in h[split].plan.batches(0)]) for h in halves]
        assert sorted(np.concatenate(shards).tolist()) == list(range(single.loaders[split].num_samples))
    # eval_sharding=full: every rank evaluates the whole split
    full = cfg.override(["eval_sharding=full"])
    whole = make_loaders(full, single.splits, single.augment, single.device, distributed.World(1, 2, 1))
    assert whole["val"].num_samples == single.loaders["val"].num_samples


@pytest.mark.slow
def test_resume_on_another_world_size_is_refused(two_ranks):
    out, _ = two_ranks
    with pytest.raises(CheckpointError, match=r"2 rank\(s\), resumed on 1"):
        Trainer(preset("smoke").override(SMOKE), str(out), resume=True, log=quiet)


@pytest.mark.slow
def test_a_stopped_two_rank_run_resumes_to_the_same_end(two_ranks, tmp_path):
    """Stopped mid-epoch in search (loader positions, architecture stream, epoch sums), resumed and stopped again
    after the first optimize epoch (each rank's BN statistics), resumed to the end: the uninterrupted run."""
    ref, ranks = two_ranks
    out, results = tmp_path / "run", tmp_path / "results"
    results.mkdir()
    spawn(_search_stopped_mid_epoch, str(out))
    state = load_checkpoint(str(out / "checkpoints" / "last.pt"))
    assert (state["phase_index"], state["step_in_epoch"]) == (1, 2)  # search, mid-epoch
    spawn(_search, str(out), str(results), 3)   # the rest of search, growth, the first optimize epoch
    spawn(_search, str(out), str(results), None)  # resumed on both ranks from rank 0's checkpoint
    assert untimed(_records(out)) == untimed(_records(ref))
    for r in range(2):
        resumed = torch.load(results / f"rank{r}.pt")
        for part in ("weights", "final"):  # each rank's own BN statistics came back (the test evaluation
            for k, v in ranks[r][part].items():  # averages them over the ranks)
                assert torch.equal(v, resumed[part][k]), (r, part, k)


# ------------------------------------------------------------------------------------------ one step
class _Tiny(nn.Module):
    """No BatchNorm: a step on 2 x B samples and one on 2 ranks x B samples see the same function."""
    is_supernet = False

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(4, 3))

    def forward(self, x):
        return self.body(x)


def _batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 1, 6, 6, generator=g), torch.randint(0, 3, (8,), generator=g)


def _tiny_step(world: distributed.World, grad_sync: str = "allreduce"):
    from engine.steps import Steps
    net = _Tiny()
    before = [p.detach().clone() for p in net.parameters()]
    steps = Steps(net, torch.optim.SGD(net.parameters(), lr=0.5, momentum=0.9), world=world, grad_sync=grad_sync)
    x, y = _batch()
    if world.active:
        x, y = x.chunk(world.size)[world.rank], y.chunk(world.size)[world.rank]
    steps.weight_step(x, y)
    return before, [p.detach().clone() for p in net.parameters()]


class _TinyBN(_Tiny):
    """With BatchNorm in training mode: 2 ranks x B equal 2B only when the statistics are synchronized."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))


def _sync_bn_step(world: distributed.World):
    from engine.steps import Steps
    net = _TinyBN()
    if world.active:
        net = distributed.sync_batchnorm(net, torch.device("cpu"))
    state = lambda: [t.detach().clone() for t in [*net.parameters(), *net.buffers()]]  # noqa: E731
    before = state()
    steps = Steps(net, torch.optim.SGD(net.parameters(), lr=0.5, momentum=0.9), world=world)
    x, y = _batch()
    if world.active:
        x, y = x.chunk(world.size)[world.rank], y.chunk(world.size)[world.rank]
    steps.weight_step(x, y)
    return before, state()


def _evaluation(world: distributed.World) -> dict:
    """The test split evaluated by the run's own loaders: a shard on each rank (eval_sharding=shard)."""
    run = build_run(preset("smoke").override(SMOKE))
    loss, acc = run.supernet.steps.evaluate(run.loaders["test"], "argmax")
    return {"loss": loss, "acc": acc, "samples": run.loaders["test"].num_samples}


def _bn_free_supernet(world: distributed.World, grad_sync: str = "allreduce"):
    """The smoke run's supernet without BatchNorm (per-rank batch statistics would differ) and 8 test images
    (4 per rank on 2 ranks)."""
    cfg = preset("smoke").override(SMOKE + ["channels_last=false", "eval_sharding=full", f"grad_sync={grad_sync}"])
    run = build_run(cfg)
    for m in run.supernet.net.modules():
        for name, child in m.named_children():
            if isinstance(child, nn.BatchNorm2d):
                setattr(m, name, nn.Identity())
    run.adopt_supernet(run.supernet.net)  # steps (and DDP) over the BN-free network
    x, y = next(iter(run.loaders["test"]))
    x, y = x[:8], y[:8]
    if world.active:
        x, y = x.chunk(world.size)[world.rank], y.chunk(world.size)[world.rank]
    return run, x, y


def _arch_step(world: distributed.World):
    run, x, y = _bn_free_supernet(world)
    before = [p.detach().clone() for p in run.arch.parameters()]
    run.supernet.steps.arch_step(x, y, "search")
    return before, [p.detach().clone() for p in run.arch.parameters()]


def _sampled_weight_step(world: distributed.World, grad_sync: str = "allreduce"):
    """A search weight step: only the sampled ops have gradients (DDP: find_unused_parameters)."""
    run, x, y = _bn_free_supernet(world, grad_sync)
    params = list(run.supernet.net.parameters())
    before = [p.detach().clone() for p in params]
    run.supernet.steps.weight_step(x, y, "search")
    return before, [p.detach().clone() for p in params]


def _step_on_rank(rank: int, results: str) -> None:
    world = distributed.init(torch.device("cpu"))
    torch.save({"weights": _tiny_step(world), "logits": _arch_step(world), "sync_bn": _sync_bn_step(world),
                "eval": _evaluation(world), "ddp": _tiny_step(world, "ddp"),
                "sampled": _sampled_weight_step(world), "sampled_ddp": _sampled_weight_step(world, "ddp")},
               os.path.join(results, f"step{rank}.pt"))


@pytest.mark.slow
def test_a_step_on_two_ranks_equals_one_step_on_twice_the_batch(tmp_path):
    """Weight step (all_reduce and DDP; all parameters used, and a search step where only the sampled ops have
    gradients), architecture step, a weight step through synchronized BatchNorm (training mode), and the
    sharded evaluation: 2 ranks give what one rank gives on the whole batch / split."""
    spawn(_step_on_rank, str(tmp_path))
    single = {"weights": _tiny_step(distributed.SINGLE), "logits": _arch_step(distributed.SINGLE),
              "sync_bn": _sync_bn_step(distributed.SINGLE), "sampled": _sampled_weight_step(distributed.SINGLE)}
    single["ddp"], single["sampled_ddp"] = single["weights"], single["sampled"]  # DDP: the same update
    whole = _evaluation(distributed.SINGLE)
    ranked = [torch.load(tmp_path / f"step{r}.pt") for r in range(2)]
    assert sum(r["eval"]["samples"] for r in ranked) == whole["samples"]  # every test image once
    assert all(0 < r["eval"]["samples"] < whole["samples"] for r in ranked)
    for r in ranked:
        assert r["eval"]["acc"] == whole["acc"]
        assert r["eval"]["loss"] == pytest.approx(whole["loss"], rel=1e-6)
    for mine in ranked:
        for kind in ("weights", "logits", "sync_bn", "ddp", "sampled", "sampled_ddp"):
            (start, after), (single_start, single_after) = mine[kind], single[kind]
            assert all(torch.equal(a, b) for a, b in zip(start, single_start))
            assert any(not torch.equal(a, b) for a, b in zip(start, after))  # the step moved them
            for a, b in zip(after, single_after):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_sync_bn_is_torchs_on_gpus_and_keeps_the_state():
    """On GPUs the optimize phase's BatchNorms become torch.nn.SyncBatchNorm (NCCL), on CPUs the gloo-capable
    one; either way the parameters and buffers are the ones the network had."""
    for device, kind in (("cuda", nn.SyncBatchNorm), ("cpu", distributed.CpuSyncBatchNorm)):
        net = _TinyBN()
        net.body[1].running_mean.fill_(0.25)
        state = {k: v.clone() for k, v in net.state_dict().items()}
        net = distributed.sync_batchnorm(net, torch.device(device))
        assert type(net.body[1]) is kind and not any(type(m) is nn.BatchNorm2d for m in net.modules())
        assert state.keys() == net.state_dict().keys()
        assert all(torch.equal(v, net.state_dict()[k]) for k, v in state.items())


# ------------------------------------------------------------------------------------------ compile
def _compiled_growth(rank: int, out: str, results: str) -> None:
    cfg = preset("smoke").override(["optimize_epochs=0", "search_epochs=1", "growth_epochs=2", "grow_every=1",
                                    "compile=on", "synthetic_size=8", "layers=1", "channels=4",
                                    "stem_multiplier=1", "batch_size=16"])
    t = Trainer(cfg, out, log=quiet)
    x, y = next(iter(t.loaders["train"]))
    t.steps.precompile(x, y, "growth")
    graphs = len({g for g in t.steps.monitor.graphs if g.startswith("op:")})
    event = t.grow("width")
    before = t.steps.monitor.totals()
    batches, arch = iter(t.loaders["train"]), iter(t.loaders["arch"])
    for _ in range(2):
        t.steps.weight_step(*next(batches), "growth")
        t.steps.arch_step(*next(arch), "growth")
    after = t.steps.monitor.totals()
    torch.save({"graphs": graphs, "event": event, "before": before, "after": after},
               os.path.join(results, f"compile{rank}.pt"))


@pytest.mark.slow
def test_compiled_steps_on_two_ranks_recompile_once_per_rank_per_event(tmp_path):
    """compile=on under 2 ranks: a growth event recompiles each per-op graph exactly once on every rank
    (counted by each rank's monitor, gathered into the event record), then the steps compile nothing."""
    spawn(_compiled_growth, str(tmp_path / "run"), str(tmp_path))
    for r in range(2):
        got = torch.load(tmp_path / f"compile{r}.pt")
        assert got["graphs"] > 0
        assert got["event"]["recompiles_per_rank"] == [got["graphs"]] * 2
        for key in ("compiles", "recompiles"):
            assert got["after"][key] == got["before"][key], key


# ------------------------------------------------------------------------------------------ drift
def _write_error(path: str, fn) -> None:
    """Run `fn` on this rank and write the TrainingError it raised to `path` (nothing when it raised none)."""
    try:
        fn()
        message = ""
    except TrainingError as e:
        message = str(e)
    with open(path, "w") as f:
        f.write(message)


def _drift(rank: int, results: str) -> None:
    world = distributed.init(torch.device("cpu"))
    logits = [torch.arange(6.0).reshape(2, 3)]
    distributed.check_same("logits", logits, world, "after search epoch 1")  # the same: passes
    if rank == 1:
        logits[0][1, 2] += 1e-6
    _write_error(os.path.join(results, f"drift{rank}.txt"),
                 lambda: distributed.check_same("logits", logits, world, "after search epoch 2"))


def test_ranks_that_drift_apart_stop_naming_the_epoch(tmp_path):
    spawn(_drift, str(tmp_path))
    for r in range(2):
        message = (tmp_path / f"drift{r}.txt").read_text()
        assert "logits differ between ranks after search epoch 2" in message


def _drift_in_the_loop(rank: int, out: str, results: str) -> None:
    """A whole smoke search on two ranks, where rank 1's logits move off rank 0's after its first architecture
    step (as a rank-local bug would): the loop's own per-epoch check must stop both ranks at that epoch's end."""
    trainer = Trainer(preset("smoke").override(SMOKE), out, log=quiet)
    arch_step = trainer.steps.arch_step

    def drifting(*a, **k):
        r = arch_step(*a, **k)
        if rank == 1 and trainer.progress.arch_steps == 0:  # the first one (the loop counts it after the call)
            with torch.no_grad():
                trainer.arch.logits["normal"][0, 1] += 1e-3
        return r
    trainer.steps.arch_step = drifting
    _write_error(os.path.join(results, f"loop{rank}.txt"), trainer.run)


def test_the_loop_stops_ranks_whose_logits_drift_apart(tmp_path):
    spawn(_drift_in_the_loop, str(tmp_path / "run"), str(tmp_path))
    for r in range(2):
        message = (tmp_path / f"loop{r}.txt").read_text()
        assert "architecture logits differ between ranks after search epoch 1" in message, message
    # it stopped there: no growth or optimize epoch was recorded
    assert {rec.get("phase") for rec in _records(tmp_path / "run")} <= {"warmup", "search"}


# ------------------------------------------------------------------------------------------ torchrun
def _rank_pids(launcher_pid: int) -> dict[int, int]:
    """rank -> pid of the workers torchrun started (read from their environment)."""
    out = {}
    for pid in (d for d in os.listdir("/proc") if d.isdigit()):  # the launcher's children (no procps needed)
        try:
            with open(f"/proc/{pid}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) != launcher_pid:
                    continue
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
        except OSError:
            continue
        if b"RANK" in env:
            out[int(env[b"RANK"])] = int(pid)
    return out


@pytest.mark.slow
def test_a_killed_rank_takes_the_job_down_and_the_run_resumes(tmp_path):
    """torchrun launches the CLI; a rank killed mid-run ends the job (no hang), `--resume` finishes it."""
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    sets = sum((["--set", s] for s in SMOKE + ["search_epochs=6"]), [])

    def torchrun(*args):
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port",
                str(_free_port()), "-m", "engine.cli", "search", *args]
    job = subprocess.Popen(torchrun("--preset", "smoke", "--out", str(out), "--device", "cpu", *sets), cwd=ROOT,
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not (out / "checkpoints" / "warmup.pt").is_file():  # killed in the search phase, after a checkpoint
        assert job.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
        time.sleep(0.05)
    ranks = _rank_pids(job.pid)
    assert set(ranks) == {0, 1}
    os.kill(ranks[1], signal.SIGKILL)
    killed = time.monotonic()
    try:
        job.wait(timeout=120)  # bounded: no hang on the dead rank's collectives
    finally:
        job.kill()
    assert job.returncode != 0
    print(f"job down {time.monotonic() - killed:.1f} s after the kill")
    assert load_checkpoint(str(out / "checkpoints" / "last.pt"))["world_size"] == 2  # intact
    r = subprocess.run(torchrun("--resume", str(out), "--device", "cpu"), cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("resumed ") == 1 and r.stdout.count("== test accuracy") == 1  # rank 0 alone prints
    final = json.loads((out / "final.json").read_text())
    assert final["epochs"] == 1 + 6 + 1 + 2
