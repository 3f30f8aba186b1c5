"""Run checkpoints: every process writes its state for step ``t`` into ``checkpoints/step-<t>/``,
then rank 0 atomically replaces the ``latest`` pointer (JSON: step, files, sha256 of each). A crash
at any moment leaves the previous complete checkpoint in place; older steps are deleted only after
the pointer names the new one."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from localsgd.harness.config import Config, ConfigError


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: one line naming the file and the problem."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(data: bytes, path: Path) -> None:
    """Write to a temporary file, fsync, rename over ``path``, fsync the folder."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def step_dir(root: Path, t: int) -> Path:
    return root / f"step-{t:09d}"


def write_state(root: Path, t: int, process: int, state: dict[str, Any]) -> str:
    """Write this process's state for step ``t``; returns its sha256 (for the pointer)."""
    folder = step_dir(root, t)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"process-{process}.pt"
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(folder)
    return sha256(path)


def commit(root: Path, t: int, digests: list[str]) -> None:
    """Point ``latest`` at step ``t`` (called by rank 0 once every process has written), then
    delete older steps."""
    pointer = {"step": t, "files": {f"process-{p}.pt": d for p, d in enumerate(digests)}}
    atomic_write_bytes((json.dumps(pointer) + "\n").encode(), root / "latest")
    for old in root.glob("step-*"):
        if old != step_dir(root, t):
            shutil.rmtree(old, ignore_errors=True)


def read_state(root: Path, process: int) -> dict[str, Any] | None:
    """This process's state from the latest committed checkpoint, or ``None`` if there is none."""
    pointer_path = root / "latest"
    if not pointer_path.exists():
        return None
    try:
        pointer = json.loads(pointer_path.read_text())
        step, digest = int(pointer["step"]), pointer["files"][f"process-{process}.pt"]
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(
            f"{pointer_path}: unreadable checkpoint pointer ({type(e).__name__}: {e})"
        ) from None
    path = step_dir(root, step) / f"process-{process}.pt"
    if not path.is_file():
        raise CheckpointError(f"{path}: missing, although {pointer_path} names it")
    actual = sha256(path)
    if actual != digest:
        raise CheckpointError(
            f"{path}: checksum mismatch (expected sha256 {digest[:16]}..., got {actual[:16]}...)"
        )
    try:
        return torch.load(path, weights_only=True, map_location="cpu")  # copied to the run's device
    except Exception as e:  # a file with the right checksum that torch cannot read
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(e).__name__})") from None


# Settings that may change between a run and its resumption without changing the result.
RUN_CONTROL = {
    "out",
    "data_dir",
    "progress",
    "tensorboard",
    "threads",
    "resume",
    "overwrite",
    "checkpoint_every",
    "timeout",
    "lighthouse",  # a restarted fault-tolerant worker may find the lighthouse at another address
    "startup_timeout",
    "device",  # auto and cuda may name the same device; the device type is checked on its own
}


def check_same_config(
    saved: dict[str, Any], current: dict[str, Any], where: Path, what: str = "the checkpoint"
) -> None:
    """Raise ConfigError naming every setting (but ``RUN_CONTROL``) that differs."""
    defaults = Config().to_dict()  # a key missing from an older file had its default value
    differ = [
        key
        for key in sorted(saved.keys() | current.keys())
        if key not in RUN_CONTROL and saved.get(key, defaults.get(key)) != current.get(key, defaults.get(key))
    ]
    if differ:
        theirs = ", ".join(f"{key} = {saved.get(key, defaults.get(key))!r}" for key in differ)
        ours = ", ".join(f"{key} = {current.get(key, defaults.get(key))!r}" for key in differ)
        raise ConfigError(f"{what} in {where} was written with {theirs}, but this run has {ours}")


def check_same_device(saved: str, current: str, where: Path) -> None:
    """A run resumes on the device type it was written on (its random generators' states differ)."""
    if saved != current:
        raise ConfigError(
            f"the checkpoint in {where} was written on {saved}, but this run is on {current}; "
            f"resume it with --device {saved}"
        )


def save(
    root: Path, t: int, state: dict[str, Any], rank: int, exchange: Callable[[bytes], list[bytes]]
) -> None:
    """Every process writes its state for step ``t``; rank 0 then points ``latest`` at it.
    ``exchange`` gathers every process's bytes (its digest) in rank order; it also waits until
    every process has written."""
    mine = write_state(root, t, rank, state)
    digests = [d.decode() for d in exchange(mine.encode())]
    if rank == 0:
        commit(root, t, digests)


def restore(root: Path, rank: int, config: dict[str, Any], device_type: str) -> dict[str, Any] | None:
    """This process's state from the latest checkpoint if there is one, after checking that it was
    written with the same settings (``config``) on the same device type; else None."""
    state = read_state(root, rank)
    if state is not None:
        check_same_config(state["config"], config, root)
        check_same_device(state.get("device", "cpu"), device_type, root)
    return state
