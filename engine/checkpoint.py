"""Run-directory I/O: atomic checkpoints and JSON files, and the metrics log.

Everything is written to a temporary file in the same directory and renamed over the target, so an
interrupted write never leaves a half file where a good one was. Checkpoints load with
`weights_only=True` (no code runs from a checkpoint) and are checked before use: a damaged or incompatible
one stops with a `CheckpointError` naming the file.
"""
from __future__ import annotations

import json
import os
import tempfile

import torch

from .errors import CheckpointError, DamagedCheckpoint

FORMAT = "aso-se-checkpoint"
VERSION = 1
REQUIRED = ("format", "version", "config", "spec", "phase_index", "epoch", "supernet", "arch")


def _atomic_write(path: str, write) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_checkpoint(state: dict, path: str) -> None:
    """Write atomically; a write that fails (disk full, read-only directory) leaves the previous file as it was
    and stops with a `CheckpointError` naming the path and the cause."""
    state = {"format": FORMAT, "version": VERSION, **state}
    try:
        _atomic_write(path, lambda f: torch.save(state, f))
    except OSError as e:
        cause = e.strerror or str(e) or type(e).__name__
        raise CheckpointError(f"{path}: cannot write checkpoint ({cause}); the previous checkpoint is intact: "
                              f"free space or fix permissions, then continue with --resume") from None


def load_checkpoint(path: str, map_location="cpu") -> dict:
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: checkpoint not found; nothing to resume (start a new run with --out)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # zip/pickle/EOF errors all mean the same thing to the user
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DamagedCheckpoint(path, f"damaged checkpoint ({msg[:160]})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise DamagedCheckpoint(path, "not an ASO-SE checkpoint")
    if state.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint version {state.get('version')} is not supported "
                              f"(this engine reads version {VERSION})")
    missing = [k for k in REQUIRED if k not in state]
    if missing:
        raise DamagedCheckpoint(path, f"incomplete checkpoint, missing {', '.join(missing)}")
    return state


def remove_stale_temporaries(directory: str) -> None:
    """Delete what writers killed mid-write left behind (`.tmp-*` next to their targets): never a checkpoint."""
    for name in os.listdir(directory) if os.path.isdir(directory) else []:
        if name.startswith(".tmp-"):
            os.unlink(os.path.join(directory, name))


def write_json(path: str, data) -> None:
    _atomic_write(path, lambda f: f.write((json.dumps(data, indent=2) + "\n").encode()))


class MetricsLog:
    """`metrics.jsonl`: one JSON object per line (epoch records, growth events, the final record)."""

    def __init__(self, path: str, write: bool = True):
        self.path = path
        self.write = write  # False on the ranks other than 0 of a data-parallel run: they read, never write
        self.listeners: list = []  # called with each record after it is written (TensorBoard)

    def append(self, record: dict) -> None:
        """One line, flushed to disk. A line cut short by a kill or a full disk is dropped at resume (the
        checkpoint counts the lines it covers)."""
        if not self.write:
            return
        self._write(record)
        for listener in self.listeners:
            listener(record)

    def _write(self, record: dict) -> None:
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot write metrics ({e.strerror or e}); the last checkpoint is "
                                  f"intact: free space, then continue with --resume") from None

    def count(self) -> int:
        if not os.path.exists(self.path):
            return 0
        with open(self.path) as f:
            return sum(1 for line in f if line.strip())

    def truncate(self, lines: int) -> None:
        """Keep the first `lines` records: what a resumed run has not redone yet."""
        if not self.write or not os.path.exists(self.path):
            return
        with open(self.path) as f:
            kept = [line for line in f if line.strip()][:lines]
        _atomic_write(self.path, lambda f: f.write("".join(kept).encode()))

    def read(self) -> list[dict]:
        if not os.path.exists(self.path):
            return []
        with open(self.path) as f:
            return [json.loads(line) for line in f if line.strip()]


def final_spec(state: dict, cfg):
    """The derived network's spec in a checkpoint: stored since 2026-12-02; before, rebuilt from the supernet's
    spec and the config (the optimize phase's stem stride and width), as `Run.build_final` built it."""
    from .network import NetSpec, derived_spec
    if state.get("final_spec") is not None:
        return NetSpec.from_json(state["final_spec"])
    return derived_spec(NetSpec.from_json(state["spec"]), **cfg.derived_shape())
