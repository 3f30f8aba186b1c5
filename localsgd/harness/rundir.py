"""The run directory a training run writes (from rank 0): ``config.json`` (the resolved settings,
derived quantities, versions), ``metrics.jsonl`` (one row per epoch), TensorBoard scalars,
``model.pt`` and ``summary.json``. Every file is written atomically or appended line by line;
checkpoints live under ``checkpoints/`` (``localsgd.harness.checkpoint``)."""

from __future__ import annotations

import io
import json
import platform
import subprocess
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
