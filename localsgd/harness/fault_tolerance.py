"""``localsgd train --fault-tolerant``: one worker of a run whose workers may die and rejoin
(``localsgd.ft``), and ``--membership``: the replay of such a run in the simulator.

Worker k writes its own run directory, ``<out>/worker-k``: ``config.json`` (with the run's id,
the same in every worker), ``metrics.jsonl`` (rows of its own training batches and of the
average of the workers present, with the rounds of the row), ``rounds.jsonl`` (one record per
global round it was in: ``localsgd.membership``, with the wall time) and, at the end,
``model.pt`` and ``summary.json``. A worker that is restarted with the same command keeps its
directory: it heals from a live worker, then learns the run's id and appends to its files if
they are that run's (another run's are kept unless ``overwrite``)."""

from __future__ import annotations

import json
import shutil
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from localsgd.harness import rundir
from localsgd.harness.config import Config, ConfigError
from localsgd.harness.rundir import RunDirectoryError
from localsgd.harness.tasks import sampling
from localsgd.membership import RoundRecord, merge

ROUNDS = "rounds.jsonl"


def worker_dir(cfg: Config, out: Path) -> Path:
    """Where worker k of a fault-tolerant run writes: ``out/worker-k``."""
    return out / f"worker-{cfg.worker}"


def claim(cfg: Config, out: Path) -> rundir.Lock:
    """Check that worker k may write into ``out`` and lock it: a new folder, or this worker's
    directory of an unfinished run with the same settings (a restarted worker: ``adopt`` decides
    once it knows the run); a finished run, other settings or other files only with
    ``overwrite``, and their deletion waits for ``adopt`` too."""

    def check() -> None:
        state = rundir.inspect(out)
        if state.kind == "foreign" or (state.kind == "run" and not cfg.overwrite):
            if state.finished:
                raise RunDirectoryError(
                    f"{out} holds a finished run; replace it with --overwrite, or choose another --out"
                )
            rundir.check_claim(state, True, False, cfg.to_dict(), sampling(cfg))

    check()
    lock = rundir.Lock(out)
    try:
        check()  # again under the lock: another process may have written in between
    except BaseException:
        lock.release()
        raise
    return lock


def adopt(out: Path, run_id: int, overwrite: bool) -> list[dict[str, Any]]:
    """Once the worker has joined run ``run_id``: its earlier rows if ``out`` holds this run's
    directory (the worker was restarted), none for a new one; another run's directory is an error
    unless ``overwrite``, which deletes its files now."""
    state = rundir.inspect(out)
    if state.kind != "run":
        return []
    theirs = (state.derived or {}).get("run_id")
    if theirs == run_id:
        return rundir.metrics_rows(out)
    if not overwrite:
        raise RunDirectoryError(
            f"{out} holds a worker of another run (run id {theirs}; this run's is {run_id}); replace it "
            "with --overwrite, or choose another --out"
        )
    for name in rundir.RUN_FILES:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    return []


class RoundLog:
    """This worker's round records (``on_round``): appended to ``rounds.jsonl`` with the wall time
    (kept in memory until ``open``: a restarted worker's first round comes before it knows its
    directory is its own) and collected per metrics row (``take``)."""

    def __init__(self) -> None:
        self.path: Path | None = None
        self.pending: list[dict[str, Any]] = []
        self.row: list[dict[str, Any]] = []

    def __call__(self, record: dict[str, Any]) -> None:
        record = {**record, "time": time.time()}
        self.row.append(record)
        if self.path is None:
            self.pending.append(record)
        else:
            self._write([record])

    def open(self, path: Path) -> None:
        self.path = path
        self._write(self.pending)
        self.pending = []

    def _write(self, records: list[dict[str, Any]]) -> None:
        assert self.path is not None
        with open(self.path, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)

    def take(self, worker: int) -> dict[str, Any]:
        """The row's fields: its rounds committed and discarded, the fewest workers present in one,
        the heals (with this worker's own heal time)."""
        records, self.row = self.row, []
        committed = [r for r in records if r["committed"]]
        heals = [
            {"t": r["t"], "worker": w, "source": s}
            | ({"seconds": r["heal_seconds"]} if w == worker and "heal_seconds" in r else {})
            for r in records
            for w, s in r["heals"]
        ]
        return {
            "rounds_committed": len(committed),
            "rounds_discarded": len(records) - len(committed),
            "fewest_members": min((len(r["members"]) for r in records), default=None),
            "heals": heals,
        }


def communicator(cfg: Config, on_round: RoundLog) -> Any:
    """Worker k's fault-tolerant communicator (torchft is imported here only)."""
    from localsgd.ft import FaultTolerantCommunicator

    assert cfg.worker is not None and cfg.workers is not None
    return FaultTolerantCommunicator(
        cfg.worker, cfg.workers, lighthouse=cfg.lighthouse, min_workers=cfg.min_workers,
        ordered=cfg.ordered_averaging, timeout=timedelta(seconds=cfg.timeout),
        startup_timeout=cfg.startup_timeout, on_round=on_round,
    )  # fmt: skip


def membership(cfg: Config) -> dict[tuple[int, str], RoundRecord] | None:
    """The trace ``membership`` names: every ``worker-k/rounds.jsonl`` under the run directory
    (or one rounds file), merged; checked before any work."""
    if cfg.membership is None:
        return None
    path = Path(cfg.membership)
    files = [path] if path.is_file() else sorted(path.glob(f"worker-*/{ROUNDS}"))
    if not files:
        raise ConfigError(
            f"membership = {cfg.membership!r}: no worker-k/{ROUNDS} in it (the run directory of a "
            "fault-tolerant run, or one rounds file)"
        )
    records = []
    for file in files:
        for i, line in enumerate(file.read_text().splitlines(), 1):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ConfigError(f"membership: {file} line {i} is not valid JSON ({e.msg})") from None
    try:
        trace = merge(records)
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"membership: the records in {path} are not a run's rounds ({e})") from None
    named = sorted({w for r in trace.values() for w in r.members})
    if named and named[-1] >= (cfg.workers or 0):
        raise ConfigError(
            f"membership: the trace names workers up to {named[-1]}, but workers (K) = {cfg.workers}"
        )
    return trace
