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

from tests.helpers import HERE, free_port, port_collision
from tests.test_resume import FLAGS
from tests.test_train import needs_cifar10


def start_two_workers(out: Path, timeout: float) -> list[subprocess.Popen]:
    """Two `localsgd train` processes that meet through env:// (no torchrun watching them), once
    their first checkpoint is committed (a port taken meanwhile: again, on another port)."""
    for _ in range(3):
        procs = _start(out, timeout)
        deadline = time.monotonic() + 300
        pointer = out / "checkpoints" / "latest"
        while not pointer.exists() and time.monotonic() < deadline and all(p.poll() is None for p in procs):
            time.sleep(0.02)
        if pointer.exists():
            return procs
        logs = []
        for p in procs:
            p.kill()
            logs.append(p.communicate()[1])
        if not any(port_collision(log) for log in logs):
            raise AssertionError("the workers never committed a checkpoint:\n" + "\n".join(logs))
    raise AssertionError("no free port after 3 attempts")


def _start(out: Path, timeout: float) -> list[subprocess.Popen]:
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
    return procs


@needs_cifar10
@pytest.mark.parametrize("fault", ["dies", "hangs"])
def test_survivor_stops_with_a_clear_error(tmp_path: Path, fault: str) -> None:
    """The survivor of a dead (SIGKILL) or stuck (SIGSTOP) peer exits 2 with the project's one-line
    error and no traceback: a dead peer is noticed at once, a stuck one after the 5 s timeout.
    The time limits are generous (a machine this size needs well under a second beyond the
    timeout); what they catch is a survivor that hangs or ignores the timeout."""
    procs = start_two_workers(tmp_path / "run", timeout=5)
    try:
        if fault == "dies":
            procs[1].send_signal(signal.SIGKILL)
        else:
            procs[1].send_signal(signal.SIGSTOP)  # alive, holding its sockets, never answering
        start = time.monotonic()
        _, err = procs[0].communicate(timeout=180)
        seconds = time.monotonic() - start
    finally:
        for p in procs:
            p.send_signal(signal.SIGCONT)
            p.kill()
            p.wait()
    assert procs[0].returncode == 2, err
    ours = [line for line in err.splitlines() if line.startswith("localsgd: error: ")]
    assert len(ours) == 1 and "Traceback" not in err, err
    assert (
        "averaging at step " in ours[0] and "failed; a worker is gone, stuck or unreachable (" in ours[0]
    ), err
    if fault == "dies":
        assert seconds < 60, err
    else:
        assert 4 < seconds < 5 + 60, (seconds, err)  # not before the timeout, not long after it
