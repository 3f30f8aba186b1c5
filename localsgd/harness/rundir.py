"""The run directory a training run writes (from rank 0): ``config.json`` (the resolved settings,
derived quantities, versions), ``metrics.jsonl`` (one row per epoch), TensorBoard scalars,
``model.pt`` and ``summary.json``. Every file is written atomically or appended line by line;
checkpoints live under ``checkpoints/`` (``localsgd.harness.checkpoint``).

A run directory has one owner: a run writes into an existing one only to continue it (``resume``)
or to replace it (``overwrite``), refuses any other non-empty folder, and holds an OS file lock on
``.lock`` for its whole life, which the kernel releases when the process ends, however it ends."""

from __future__ import annotations

import fcntl
import io
import json
import os
import platform
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import localsgd
from localsgd.harness import checkpoint
from localsgd.harness.config import ConfigError

# Fields of a metrics row or summary that measure wall-clock time: they differ between two runs of
# the same computation, and are left out when runs are compared bit for bit.
TIMING_FIELDS = ("comm_seconds", "eval_seconds", "compute_seconds", "wall_seconds", "tokens_per_second")


class RunDirectoryError(ValueError):
    """The run directory cannot be created or written (the message names the path and reason)."""


def source_commit(paths: tuple[str, ...] = ("localsgd",)) -> str | None:
    """The git commit of the localsgd source in use (``+dirty`` if files under ``paths`` differ
    from it), or None outside a git checkout (an installed package)."""
    root = Path(localsgd.__file__).resolve().parents[1]
    if not (root / ".git").exists():
        return None

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)

    try:
        head, status = git("rev-parse", "--short", "HEAD"), git("status", "--porcelain", "--", *paths)
    except OSError:
        return None
    if head.returncode:
        return None
    return head.stdout.strip() + ("+dirty" if status.stdout.strip() else "")


def versions() -> dict[str, Any]:
    return {
        "localsgd": localsgd.__version__,
        "commit": source_commit(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }


def write_text(text: str, path: Path) -> None:
    checkpoint.atomic_write_bytes(text.encode(), path)


def read_json(path: Path) -> Any:
    """A JSON file of a run directory; a file that is not UTF-8 JSON is one line naming it."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise RunDirectoryError(f"{path}: not UTF-8 text (byte {e.start}); the file is corrupt") from None
    except json.JSONDecodeError as e:
        raise RunDirectoryError(
            f"{path}: not valid JSON ({e.msg}: line {e.lineno} column {e.colno}); truncated or corrupt"
        ) from None


def metrics_rows(run: Path) -> list[dict[str, Any]]:
    """A run's ``metrics.jsonl``, one dict per row; a line that is not a JSON object (a truncated
    or corrupt file) is one line naming the file and the line."""
    path = run / "metrics.jsonl"
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise RunDirectoryError(f"{path}: not UTF-8 text (byte {e.start}); the file is corrupt") from None
    rows = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise RunDirectoryError(
                f"{path}: line {i} is not valid JSON ({e.msg}); the file is truncated or corrupt"
            ) from None
        if not isinstance(row, dict):
            raise RunDirectoryError(f"{path}: line {i} is not a metrics row (a JSON object); corrupt")
        rows.append(row)
    return rows


def model_path(run: Path, epoch: float) -> Path:
    """Where ``save_models_at`` keeps the averaged model of ``epoch``."""
    return run / "models" / f"epoch-{epoch:g}.pt"


def save_model(model: nn.Module, config: dict[str, Any], path: Path) -> None:
    """The weights on the CPU (they load anywhere) with the run's config, written atomically."""
    buf = io.BytesIO()
    weights = {k: v.cpu() for k, v in model.state_dict().items()}
    torch.save({"model": weights, "config": config}, buf)
    checkpoint.atomic_write_bytes(buf.getvalue(), path)


class RunWriter:
    """Writes one run directory; on other ranks than 0 (``main=False``) every call does nothing.

    Args:
        out: the run directory.
        main: whether this process writes (rank 0).
        tensorboard: also log every numeric metric to ``out/tensorboard``; checked at
            construction (before any work), so a missing package is one clear error.
    """

    def __init__(self, out: Path, main: bool, tensorboard: bool) -> None:
        self.out, self.main = out, main
        self._summary_writer: Any = None
        self._make_writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError(
                    "tensorboard = true needs the tensorboard package: pip install tensorboard"
                ) from None
            self._make_writer = SummaryWriter

    def config(self, resolved: dict[str, Any]) -> None:
        """Create the directory (with ``checkpoints/``) and write ``config.json``: ``resolved``
        plus the versions. An OS error becomes one line naming the path and the reason."""
        if not self.main:
            return
        try:
            (self.out / "checkpoints").mkdir(parents=True, exist_ok=True)
            text = json.dumps({**resolved, "versions": versions()}, indent=2) + "\n"
            write_text(text, self.out / "config.json")
        except OSError as e:
            raise RunDirectoryError(f"cannot write the run directory {self.out}: {e.strerror or e}") from None
        if self._make_writer is not None:
            self._summary_writer = self._make_writer(str(self.out / "tensorboard"))

    def history(self, rows: list[dict[str, Any]]) -> None:
        """Rewrite ``metrics.jsonl`` with ``rows`` (at the start, also of a resumed run)."""
        if self.main:
            write_text("".join(json.dumps(row) + "\n" for row in rows), self.out / "metrics.jsonl")

    def append(self, row: dict[str, Any], step: int) -> None:
        """One epoch's row: a line of ``metrics.jsonl`` and its numeric values as scalars at ``step``."""
        if not self.main:
            return
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        if self._summary_writer is not None:
            for key, value in row.items():
                if isinstance(value, float | int) and key not in ("epoch", "step"):
                    self._summary_writer.add_scalar(key, value, step)

    def model_at(self, model: nn.Module, config: dict[str, Any], epoch: float) -> None:
        """The averaged model at ``epoch`` (a ``save_models_at`` epoch) as ``models/epoch-E.pt``."""
        if self.main:
            (self.out / "models").mkdir(exist_ok=True)
            save_model(model, config, model_path(self.out, epoch))

    def final(self, model: nn.Module, config: dict[str, Any], summary: dict[str, Any]) -> None:
        """``model.pt`` (the weights on the CPU: it loads anywhere, with the config) and
        ``summary.json``; closes TensorBoard."""
        if not self.main:
            return
        save_model(model, config, self.out / "model.pt")
        write_text(json.dumps(summary, indent=2) + "\n", self.out / "summary.json")
        if self._summary_writer is not None:
            self._summary_writer.close()


# What a run writes into its directory; ``overwrite`` deletes these and nothing else.
RUN_FILES = (
    "config.json",
    "metrics.jsonl",
    "summary.json",
    "model.pt",
    "sharpness.json",
    "checkpoints",
    "models",
    "tensorboard",
    "rounds.jsonl",
)
LOCK = ".lock"


@dataclass
class RunState:
    """What a folder holds, read without touching it.

    ``kind``: ``new`` (absent, or empty but for a lock file), ``run`` (a localsgd run directory) or
    ``foreign`` (anything else). For a run: its settings (``config.json``'s ``config``), whether it
    finished (``summary.json``) and the step of its last committed checkpoint."""

    path: Path
    kind: str
    config: dict[str, Any] | None = None
    derived: dict[str, Any] | None = None
    finished: bool = False
    checkpoint_step: int | None = None
    contents: tuple[str, ...] = ()

    def describe(self) -> str:
        if self.kind == "foreign":
            shown = ", ".join(self.contents[:4]) + (", ..." if len(self.contents) > 4 else "")
            return f"is not empty and is not a localsgd run directory (it holds {shown})"
        if self.finished:
            return "holds a finished run"
        if self.checkpoint_step is not None:
            return f"holds an interrupted run (last checkpoint at step {self.checkpoint_step})"
        return "holds a run that stopped before its first checkpoint"


def inspect(out: Path) -> RunState:
    """What ``out`` holds (nothing is written). An unreadable folder or file is one line naming it."""
    if not out.exists():
        return RunState(out, "new")
    if not out.is_dir():
        raise RunDirectoryError(f"the run directory {out} is a file, not a folder")
    try:
        contents = tuple(sorted(p.name for p in out.iterdir() if p.name != LOCK))
    except OSError as e:
        raise RunDirectoryError(f"cannot read the run directory {out}: {e.strerror or e}") from None
    if not contents:
        return RunState(out, "new")
    record = _run_record(out / "config.json")
    if record is None:
        return RunState(out, "foreign", contents=contents)
    pointer = out / "checkpoints" / "latest"
    step = None
    if pointer.is_file():
        try:
            step = int(json.loads(pointer.read_text())["step"])
        except (OSError, ValueError, KeyError, TypeError):
            step = None  # an unreadable pointer is named when the checkpoint is read
    finished = (out / "summary.json").is_file()
    return RunState(out, "run", record["config"], record.get("derived", {}), finished, step, contents)


def _run_record(path: Path) -> dict[str, Any] | None:
    """A localsgd ``config.json`` (settings, derived quantities and versions), None for any other
    file or none."""
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):  # none, unreadable or not JSON: not a run's
        return None
    if not (isinstance(record, dict) and "config" in record and "localsgd" in record.get("versions", {})):
        return None
    return record


def check_claim(
    state: RunState, resume: bool, overwrite: bool, config: dict[str, Any], sampling: str | None = None
) -> None:
    """Raise RunDirectoryError (one line) unless this run may write into ``state.path``: a new
    folder, or a run it continues (``resume``, with the same settings and the same ``sampling`` of
    the training data, ``tasks.sampling``) or replaces (``overwrite``)."""
    out = state.path
    if state.kind == "new":
        return
    if state.kind == "foreign":
        raise RunDirectoryError(f"the run directory {out} {state.describe()}; choose another --out")
    if overwrite:
        return
    if resume:
        what = "the finished run" if state.finished else "the run"
        checkpoint.check_same_config(state.config or {}, config, out, what)
        began = (state.derived or {}).get("sampling")
        if began != sampling:
            began = began or "columns, recorded by localsgd before it sampled text runs otherwise"
            raise RunDirectoryError(
                f"the run in {out} read its training data as {began}; this localsgd reads them as "
                f"{sampling}, so it cannot continue that run; replace it with --overwrite or choose "
                "another --out"
            )
        return
    what = "continue it with --resume, " if not state.finished else ""
    what += "replace it with --overwrite"
    raise RunDirectoryError(f"{out} {state.describe()}; {what}, or choose another --out")


class Lock:
    """An exclusive ``flock`` on ``out/.lock``, held until ``release()`` or the process's end (the
    kernel drops it then, also after SIGKILL, so no stale lock is left). The file records the
    owner (pid, host, start time) for the message a second run gets."""

    def __init__(self, out: Path) -> None:
        path = out / LOCK
        try:
            out.mkdir(parents=True, exist_ok=True)
            self.fd: int | None = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise RunDirectoryError(f"cannot write the run directory {out}: {e.strerror or e}") from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            owner = os.pread(self.fd, 256, 0).decode(errors="replace").strip() or "another process"
            os.close(self.fd)
            self.fd = None
            raise RunDirectoryError(
                f"the run directory {out} is in use by another run ({owner}); wait for it to end or "
                "choose another --out"
            ) from None
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"pid {os.getpid()} on {socket.gethostname()}, started {started}\n".encode(), 0)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the only descriptor drops the flock
            self.fd = None


def claim(out: Path, resume: bool, overwrite: bool, config: dict[str, Any], sampling: str | None) -> Lock:
    """Check that this run may write into ``out`` (``check_claim``), lock it, check again under the
    lock (another run may have written in between) and, with ``overwrite``, delete the old run's
    files (``RUN_FILES``; nothing else). Returns the held lock."""
    check_claim(inspect(out), resume, overwrite, config, sampling)
    lock = Lock(out)
    try:
        state = inspect(out)
        check_claim(state, resume, overwrite, config, sampling)
        if overwrite and state.kind == "run":
            for name in RUN_FILES:
                path = out / name
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.exists():
                    path.unlink()
    except BaseException:
        lock.release()
        raise
    return lock
