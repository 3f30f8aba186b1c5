"""The README's code runs as written: the own-loop script under torchrun, the simulator snippet
in a plain process."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.helpers import HERE, launch

README = (HERE.parent / "README.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", README, re.S)


def block(marker: str) -> str:
    """The README's one Python block that contains ``marker``."""
    found = [b for b in BLOCKS if marker in b]
    assert len(found) == 1, f"{len(found)} README blocks contain {marker!r}"
    return found[0]


def accuracy(log: str, before: str) -> float:
    match = re.search(rf"{before} (\d+\.\d)%", log)
    assert match, log
    return float(match.group(1)) / 100


def test_own_loop_script_runs_under_torchrun_as_written(tmp_path: Path) -> None:
    script = tmp_path / "own_loop.py"
    script.write_text(block("init_process_group()"))
    _, log = launch(2, [str(script)])
    assert "after 640 steps: training accuracy" in log, log  # 8192 / 2 workers / 32 x 5 epochs
    assert accuracy(log, "training accuracy") > 0.8  # it learned the toy task (about 96%)


def test_simulator_snippet_runs_as_written(tmp_path: Path) -> None:
    script = tmp_path / "simulator.py"
    script.write_text(block("Simulator(model"))
    env = {**os.environ, "PYTHONPATH": str(HERE.parent), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert accuracy(done.stdout, "accuracy of the average") > 0.8, done.stdout  # about 95%


def test_sharded_script_runs_under_torchrun_as_written(tmp_path: Path) -> None:
    script = tmp_path / "sharded.py"
    script.write_text(block("fully_shard(model"))
    _, log = launch(4, [str(script)], cwd=tmp_path)  # it writes its checkpoint there
    assert "after 256 steps: training accuracy" in log, log  # 4096 samples per worker, 64 a step, 4 epochs
    assert (tmp_path / "checkpoint" / ".metadata").is_file()
    assert accuracy(log, "training accuracy") > 0.8  # it learned the toy task
