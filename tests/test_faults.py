"""A peer that dies or hangs in the middle of training: the survivors stop with one clear line
within the configured timeout instead of hanging or printing a backend traceback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import HERE, free_port
from tests.test_resume import FLAGS
from tests.test_train import needs_cifar10


def start_two_workers(out: Path, timeout: float) -> list[subprocess.Popen]:
    """Two `localsgd train` processes that meet through env:// (no torchrun watching them)."""
    port = str(free_port())
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent), "RANK": str(rank),
               "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}  # fmt: skip
        cmd = [sys.executable, "-m", "localsgd", "train", *FLAGS, "--epochs", "30", "--timeout", str(timeout)]
        procs.append(
            subprocess.Popen(
                [*cmd, "--out", str(out)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    deadline = time.monotonic() + 120
    while not (out / "checkpoints" / "latest").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    return procs


@needs_cifar10
@pytest.mark.parametrize("fault", ["dies", "hangs"])
def test_survivor_stops_with_a_clear_error(tmp_path: Path, fault: str) -> None:
    procs = start_two_workers(tmp_path / "run", timeout=5)
    try:
        if fault == "dies":
            procs[1].send_signal(signal.SIGKILL)
        else:
            procs[1].send_signal(signal.SIGSTOP)  # alive, holding its sockets, never answering
        start = time.monotonic()
        _, err = procs[0].communicate(timeout=60)
        seconds = time.monotonic() - start
    finally:
        for p in procs:
            p.send_signal(signal.SIGCONT)
            p.kill()
            p.wait()
    assert procs[0].returncode == 2, err
    assert err.startswith("localsgd: error: ") and err.count("\n") == 1, err
    assert "averaging at step " in err and "failed; a worker is gone, stuck or unreachable (" in err, err
    assert seconds < (
        10 if fault == "dies" else 5 + 10
    )  # a dead peer is noticed at once, a stuck one at the timeout
