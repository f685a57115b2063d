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

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from engine import distributed
from engine.build import build_run
from engine.checkpoint import load_checkpoint
from engine.config import preset
from engine.errors import CheckpointError, TrainingError
from engine.trainer import Trainer

from .conftest import untimed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# small: one epoch per supernet phase, 4 weight steps per epoch on each rank; two optimize epochs (the derived
# network is not evaluated between them, so each rank's BatchNorm statistics are its own at their checkpoint)
SMOKE = ["steps_per_epoch=4", "synthetic_train=512", "eval_batch_size=64", "optimize_epochs=2"]


def _quiet(*_):
    pass


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
    trainer = Trainer(cfg, out, log=_quiet, resume=resume, stop_after=stop_after)
    trainer.run()
    torch.save({"logits": {k: v.clone() for k, v in trainer.arch.state_dict().items()},
                "genotype": str(trainer.arch.genotype()), "train_batches": len(trainer.loaders["train"]),
                "weights": {k: v.clone() for k, v in trainer.net.state_dict().items()},
                "final": {k: v.clone() for k, v in trainer.final_net.state_dict().items()}},
               os.path.join(results, f"rank{rank}.pt"))


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
    assert json.loads((out / "final.json").read_text())["genotype_str"] == ranks[0]["genotype"]
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
    assert len(halves[0]["val"]) == len(single.loaders["val"])  # every rank evaluates the whole val split


@pytest.mark.slow
def test_resume_on_another_world_size_is_refused(two_ranks):
    out, _ = two_ranks
    with pytest.raises(CheckpointError, match=r"2 rank\(s\), resumed on 1"):
        Trainer(preset("smoke").override(SMOKE), str(out), resume=True, log=_quiet)


@pytest.mark.slow
def test_a_stopped_two_rank_run_resumes_to_the_same_end(two_ranks, tmp_path):
    ref, ranks = two_ranks
    out, results = tmp_path / "run", tmp_path / "results"
    results.mkdir()
    spawn(_search, str(out), str(results), 4)   # stopped after the first optimize epoch
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


def _tiny_step(world: distributed.World):
    from engine.steps import Steps
    net = _Tiny()
    before = [p.detach().clone() for p in net.parameters()]
    steps = Steps(net, torch.optim.SGD(net.parameters(), lr=0.5, momentum=0.9), world=world)
    x, y = _batch()
    if world.active:
        x, y = x.chunk(world.size)[world.rank], y.chunk(world.size)[world.rank]
    steps.weight_step(x, y)
    return before, [p.detach().clone() for p in net.parameters()]


def _arch_step(world: distributed.World):
    cfg = preset("smoke").override(SMOKE + ["channels_last=false"])
    run = build_run(cfg)
    for m in run.supernet.net.modules():  # BN-free supernet: per-rank batch statistics would differ
        for name, child in m.named_children():
            if isinstance(child, nn.BatchNorm2d):
                setattr(m, name, nn.Identity())
    x, y = next(iter(run.loaders["test"]))
    x, y = x[:8], y[:8]
    if world.active:
        x, y = x.chunk(world.size)[world.rank], y.chunk(world.size)[world.rank]
    run.supernet.steps.world = world
    before = [p.detach().clone() for p in run.arch.parameters()]
    run.supernet.steps.arch_step(x, y, "search")
    return before, [p.detach().clone() for p in run.arch.parameters()]


def _step_on_rank(rank: int, results: str) -> None:
    world = distributed.init(torch.device("cpu"))
    torch.save({"weights": _tiny_step(world), "logits": _arch_step(world)}, os.path.join(results, f"step{rank}.pt"))


@pytest.mark.slow
def test_a_step_on_two_ranks_equals_one_step_on_twice_the_batch(tmp_path):
    spawn(_step_on_rank, str(tmp_path))
    single = {"weights": _tiny_step(distributed.SINGLE), "logits": _arch_step(distributed.SINGLE)}
    for r in range(2):
        ranked = torch.load(tmp_path / f"step{r}.pt")
        for kind in ("weights", "logits"):
            (start, after), (single_start, single_after) = ranked[kind], single[kind]
            assert all(torch.equal(a, b) for a, b in zip(start, single_start))
            assert any(not torch.equal(a, b) for a, b in zip(start, after))  # the step moved them
            for a, b in zip(after, single_after):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------ drift
def _drift(rank: int, results: str) -> None:
    world = distributed.init(torch.device("cpu"))
    logits = [torch.arange(6.0).reshape(2, 3)]
    distributed.check_same("logits", logits, world, "after search epoch 1")  # the same: passes
    if rank == 1:
        logits[0][1, 2] += 1e-6
    try:
        distributed.check_same("logits", logits, world, "after search epoch 2")
        message = None
    except TrainingError as e:
        message = str(e)
    with open(os.path.join(results, f"drift{rank}.txt"), "w") as f:
        f.write(message or "")


def test_ranks_that_drift_apart_stop_naming_the_epoch(tmp_path):
    spawn(_drift, str(tmp_path))
    for r in range(2):
        message = (tmp_path / f"drift{r}.txt").read_text()
        assert "logits differ between ranks after search epoch 2" in message


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
