"""Runs that survive being stopped (issue 13): mid-epoch checkpoints, resume across growth, kill -9 at seeded
random moments, SIGTERM/SIGINT, a run killed before its first checkpoint, a checkpoint that cannot be written,
a damaged last.pt. Every stopped run, continued with --resume, must end identical (metrics, genotype and test
accuracy, timing aside) to the uninterrupted smoke run."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from engine import checkpoint as checkpoint_module
from engine.arch import PHASES
from engine.checkpoint import load_checkpoint
from engine.cli import main
from engine.config import preset
from engine.loop import PhaseLoop
from engine.steps import Steps
from engine.trainer import Trainer

from .conftest import quiet, read_metrics, untimed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _same_run(out, reference) -> None:
    assert untimed(read_metrics(out)) == untimed(read_metrics(reference))
    for name in ("genotype.json", "final.json"):
        mine, theirs = (json.loads((p / name).read_text()) for p in (out, reference))
        assert untimed([mine]) == untimed([theirs]), name


def _files(out) -> dict:
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted smoke run (it grows once, in its growth epoch)."""
    out = tmp_path_factory.mktemp("reference")
    Trainer(preset("smoke"), str(out), log=quiet).run()
    return out


def _cli(*args) -> list[str]:
    return [sys.executable, "-u", "-m", "engine.cli", "search", *args]


def _env() -> dict:
    # the reference runs in this process: the same thread count gives the same float reductions, bit for bit
    return {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "PYTHONPATH": ROOT}


# -------------------------------------------------------------------------- mid-epoch checkpoints, in process
class _Killed(Exception):
    pass


# with a checkpoint after every step, the smoke run's saves are: warmup steps 1-7 (saves 1-7), the epoch's end and
# warmup.pt (8, 9), search steps 1-7 (10-16), 17, 18, growth steps 1-7 (19-25: the growth event comes before 19),
# 26, 27, optimize steps 1-15 (28-42), 43, 44
@pytest.mark.parametrize("at,phase", [(12, "search"), (19, "growth"), (33, "optimize")])  # warmup: the kill test
def test_resume_from_a_mid_epoch_checkpoint_is_exact(reference, tmp_path, monkeypatch, at, phase):
    """Checkpoints after every step; the process dies right after the `at`-th one; --resume ends identical."""
    saves, real_save = [], PhaseLoop.save

    def save_then_die(self, name):
        real_save(self, name)
        saves.append((PHASES[min(self.p.phase_index, 3)], self.p.step))
        if len(saves) == at:
            raise _Killed

    monkeypatch.setattr(PhaseLoop, "save", save_then_die)
    with pytest.raises(_Killed):
        Trainer(preset("smoke"), str(tmp_path), log=quiet, checkpoint_every_s=0).run()
    monkeypatch.setattr(PhaseLoop, "save", real_save)
    assert saves[-1][0] == phase and saves[-1][1] > 0  # stopped inside an epoch of that phase
    Trainer(preset("smoke"), str(tmp_path), log=quiet, resume=True).run()
    _same_run(tmp_path, reference)


# -------------------------------------------------------------------------- kill -9 at seeded random moments
# phases the kills aim at: a growth epoch included (before and after its growth event's first checkpoint)
KILLS = ["warmup", "warmup", "search", "search", "search", "growth", "growth", "growth", "optimize", "optimize"]


def _wait_for_phase(proc, phase: str, deadline: float) -> bool:
    """Read the child's lines until it says it is in `phase` (entered or resumed there). False if it got past it."""
    later = PHASES[PHASES.index(phase) + 1:]
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.5)
        if not ready:
            continue
        line = proc.stdout.readline()
        if not line:
            return False
        if line.startswith(f"== {phase}:") or f" at {phase} epoch" in line:
            return True
        if any(line.startswith(f"== {p}:") or f" at {p} epoch" in line for p in later) or line.startswith("== test"):
            return False
    raise AssertionError(f"no sign of the {phase} phase within the time limit")


def _identity(path: str):
    try:
        st = os.stat(path)
        return st.st_ino, st.st_mtime_ns
    except FileNotFoundError:
        return None


@pytest.mark.slow
def test_kill_9_at_random_moments_then_resume_ends_identical(reference, tmp_path):
    """Ten SIGKILLs spread over all four phases, each after a seeded number of checkpoints in the aimed phase plus
    a seeded random delay (so some land inside a step, some inside a checkpoint write); every restart is
    `--resume`, and the finished run equals the uninterrupted one."""
    rng = random.Random(13)
    out = tmp_path / "run"
    last = str(out / "checkpoints" / "last.pt")
    landed = []
    for i, phase in enumerate(KILLS):
        args = ["--preset", "smoke", "--out", str(out)] if i == 0 else ["--resume", str(out)]
        proc = subprocess.Popen(_cli(*args, "--checkpoint-every", "0"), cwd=ROOT, env=_env(), text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        try:
            if not _wait_for_phase(proc, phase, time.monotonic() + 120):
                continue  # the run got past this phase already: the next kill aims further on
            saves, seen = rng.randint(1, 3), _identity(last)
            while saves and proc.poll() is None:
                now = _identity(last)
                if now != seen:
                    saves, seen = saves - 1, now
                time.sleep(0.002)
            time.sleep(rng.uniform(0.0, 0.15))
        finally:
            proc.kill()
            proc.wait()
        if proc.returncode == -signal.SIGKILL:
            state = load_checkpoint(last)
            debris = [n for n in os.listdir(out / "checkpoints") if n.startswith(".tmp-")]
            landed.append((PHASES[min(state["phase_index"], 3)], state["epoch"], state["step_in_epoch"], len(debris)))
    print("kills (phase, epoch, step of the checkpoint left, unfinished writes):", landed)
    assert len(landed) >= 10 and {p for p, *_ in landed} == set(PHASES)
    assert any(p == "growth" and step > 0 for p, _, step, _ in landed)  # inside the grown network's epoch
    done = subprocess.run(_cli("--resume", str(out)), cwd=ROOT, env=_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    _same_run(out, reference)
    assert not [n for n in os.listdir(out / "checkpoints") if n.startswith(".tmp-")]


KILL_INSIDE_WRITE = """
import os, signal, sys, torch
real_save, count = torch.save, [0]
def save(obj, f, *args, **kwargs):
    count[0] += 1
    if count[0] == int(sys.argv[1]):  # part of a checkpoint on disk, then the process is gone
        f.write(b"PK\\x03\\x04" + b"\\0" * 4096); f.flush(); os.fsync(f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)
    real_save(obj, f, *args, **kwargs)
torch.save = save
from engine.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_kill_inside_a_checkpoint_write_leaves_the_previous_one(reference, tmp_path):
    out = tmp_path / "run"
    args = ["search", "--preset", "smoke", "--out", str(out), "--checkpoint-every", "0"]
    r = subprocess.run([sys.executable, "-c", KILL_INSIDE_WRITE, "12", *args], cwd=ROOT, env=_env(),
                       capture_output=True, text=True)
    assert r.returncode == -signal.SIGKILL
    assert [n for n in os.listdir(out / "checkpoints") if n.startswith(".tmp-")]  # the cut-short write
    load_checkpoint(str(out / "checkpoints" / "last.pt"))  # ... and the checkpoint before it, intact
    assert main(["search", "--resume", str(out)]) == 0
    _same_run(out, reference)


# -------------------------------------------------------------------------- signals
def test_sigterm_finishes_the_step_writes_the_checkpoint_and_exits_143(reference, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(_cli("--preset", "smoke", "--out", str(out)), cwd=ROOT, env=_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert _wait_for_phase(proc, "search", time.monotonic() + 120)
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143, err[-2000:]
    message = err.strip().splitlines()[-1]
    assert "stopped by SIGTERM" in message and f"--resume {out}" in message
    state = load_checkpoint(str(out / "checkpoints" / "last.pt"))
    assert PHASES[state["phase_index"]] == "search"
    assert main(["search", "--resume", str(out)]) == 0
    _same_run(out, reference)


def test_sigint_stops_at_a_step_boundary_with_exit_130(reference, tmp_path, monkeypatch, capsys):
    """Ctrl-C, delivered as a real signal to this process in the middle of a growth-epoch step."""
    out = tmp_path / "run"
    real_step, calls = Steps.weight_step, []

    def step(self, x, y, phase=None):
        calls.append(phase)
        if calls.count("growth") == 2:
            signal.raise_signal(signal.SIGINT)
        return real_step(self, x, y, phase)

    monkeypatch.setattr(Steps, "weight_step", step)
    handler = signal.getsignal(signal.SIGINT)
    assert main(["search", "--preset", "smoke", "--out", str(out)]) == 130
    monkeypatch.setattr(Steps, "weight_step", real_step)
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "stopped by SIGINT at growth epoch 1, step 2/" in err
    assert signal.getsignal(signal.SIGINT) is handler  # the handler put back
    assert main(["search", "--resume", str(out)]) == 0
    _same_run(out, reference)


# -------------------------------------------------------------------------- a run killed before its first checkpoint
def test_a_run_stopped_before_its_first_checkpoint_is_not_stuck(reference, tmp_path):
    out = tmp_path / "run"
    assert main(["search", "--preset", "smoke", "--out", str(out), "--stop-after", "0"]) == 0
    assert (out / "config.json").exists() and not os.listdir(out / "checkpoints")  # what the kill left
    assert main(["search", "--resume", str(out)]) == 0  # starts again from the beginning, saying so
    _same_run(out, reference)
    again = tmp_path / "again"
    assert main(["search", "--preset", "smoke", "--out", str(again), "--stop-after", "0"]) == 0
    assert main(["search", "--preset", "smoke", "--out", str(again)]) == 0  # --out may reuse it too
    _same_run(again, reference)


@pytest.mark.skipif(not os.path.exists(os.path.join(ROOT, ".venv", "bin", "python")) or not shutil.which("make"),
                    reason="needs the project's .venv (make install) and make")
def test_make_run_continues_a_run_stopped_before_its_first_checkpoint(tmp_path):
    out = tmp_path / "run"
    assert main(["search", "--preset", "smoke", "--out", str(out), "--stop-after", "0"]) == 0
    r = subprocess.run(["make", "-s", "run", f"RUN_DIR={out}", "PRESET=smoke"], cwd=ROOT, env=_env(),
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-1000:] + r.stderr[-1000:]
    assert f"resuming the unfinished run in {out}" in r.stdout and (out / "final.json").exists()


# -------------------------------------------------------------------------- disk full, damaged checkpoint
def test_a_checkpoint_that_cannot_be_written_leaves_the_previous_one_intact(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    assert main(["search", "--preset", "smoke", "--out", str(out), "--stop-after", "1"]) == 0
    before = _files(out / "checkpoints")
    real_save = checkpoint_module.torch.save

    def disk_full(obj, f):
        f.write(b"PK\x03\x04" + b"\0" * 1024)  # part of the file got out before the disk filled up
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint_module.torch, "save", disk_full)
    code = main(["search", "--resume", str(out)])
    monkeypatch.setattr(checkpoint_module.torch, "save", real_save)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    # the first write of the resumed run is warmup.pt (its last.pt was written before it)
    assert f"{out / 'checkpoints' / 'warmup.pt'}: cannot write checkpoint (No space left on device)" in err
    assert "previous checkpoint is intact" in err and "--resume" in err
    assert _files(out / "checkpoints") == before  # the previous checkpoint intact, no debris


def test_a_damaged_last_checkpoint_names_the_newest_intact_one(reference, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["search", "--preset", "smoke", "--out", str(out), "--stop-after", "3"]) == 0
    (out / "checkpoints" / "last.pt").write_bytes(b"PK\x03\x04 not a checkpoint any more")
    before = _files(out)
    assert main(["search", "--resume", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "last.pt: damaged checkpoint" in err
    assert f"newest intact checkpoint is {out / 'checkpoints' / 'growth.pt'}" in err and "--from growth.pt" in err
    assert _files(out) == before  # nothing touched
    assert main(["search", "--resume", str(out), "--from", "optimize.pt"]) == 2  # a checkpoint never written
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "optimize.pt: checkpoint not found" in err and "--from growth.pt" in err
    assert _files(out) == before
    assert main(["search", "--resume", str(out), "--from", "growth.pt"]) == 0
    _same_run(out, reference)


def test_a_negative_checkpoint_interval_and_from_without_resume_are_refused(tmp_path, capsys):
    assert main(["search", "--preset", "smoke", "--out", str(tmp_path / "r"), "--checkpoint-every", "-5"]) == 2
    assert "--checkpoint-every -5: seconds cannot be negative" in capsys.readouterr().err
    assert main(["search", "--preset", "smoke", "--out", str(tmp_path / "r"), "--from", "search.pt"]) == 2
    assert "--from names a checkpoint to resume from: use it with --resume DIR" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
