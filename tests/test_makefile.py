"""The Makefile's own logic, run by make: `make run` after a finished run starts a new run directory beside it and
leaves the finished one as it was (README "Two commands", docs/running.md)."""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys

import pytest

from engine.config import preset
from engine.trainer import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _digests(folder) -> dict:
    out = {}
    for base, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(base, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = hashlib.sha1(f.read()).hexdigest()
    return out


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_make_run_after_a_finished_run_starts_a_new_run_beside_it(tmp_path):
    run = tmp_path / "run"
    Trainer(preset("smoke").override(["steps_per_epoch=2"]), str(run), log=lambda *_: None).run()
    before = _digests(run)
    stamp, data = tmp_path / "installed", tmp_path / "fmnist"
    stamp.touch()  # newer than setup.py: make's install step has nothing to do
    data.mkdir()
    (data / "train-images-idx3-ubyte").touch()  # make's data step finds "Fashion-MNIST" and goes on
    r = subprocess.run(["make", "-s", "run", f"RUN_DIR={run}", "PRESET=smoke", f"PY={sys.executable}",
                        f"STAMP={stamp}", f"FMNIST_DIR={data}"], cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    new = [p for p in tmp_path.iterdir() if p.name.startswith("run-")]
    assert len(new) == 1 and f"run directory: {new[0]}" in r.stdout
    assert (new[0] / "final.json").is_file() and (new[0] / "report" / "index.html").is_file()
    assert _digests(run) == before  # the finished run is untouched
