"""scripts/compare_runs.py: the check behind a "reproduces bit for bit" claim. It must ignore
timings and the run's own path, and report any other difference, down to one ulp of one value."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "compare_runs.py"


def write_run(d: Path, wall: float) -> Path:
    """A run directory in the harness's layout, with `wall` in its timing fields (a text run's
    `tokens_per_second` among them)."""
    (d / "models").mkdir(parents=True)
    lines = [
        {"epoch": float(e), "test_acc": 0.5 + e / 100, "wall_seconds": wall, "tokens_per_second": 1 / wall}
        for e in (1, 2)
    ]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    (d / "summary.json").write_text(json.dumps({"final_test_acc": 0.52, "compute_seconds": wall}))
    (d / "config.json").write_text(json.dumps({"out": str(d)}))
    (d / "sharpness.json").write_text(json.dumps({"run": str(d), "eigenvalue": 28.0}))
    torch.manual_seed(0)
    state = {"model": {"w": torch.randn(3, 4), "n": torch.tensor(7)}, "config": {}}
    torch.save(state, d / "model.pt")
    torch.save(state, d / "models" / "epoch-1.pt")
    return d


def run(a: Path, b: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), str(a), str(b)], capture_output=True, text=True, timeout=120
    )


def test_equal_runs_pass_though_timings_and_paths_differ(tmp_path: Path) -> None:
    proc = run(write_run(tmp_path / "a", 1.0), write_run(tmp_path / "b", 2.0))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.splitlines()[-1] == "all equal"
    assert "model.pt                 equal (2 tensors, 13 values)" in proc.stdout


def test_one_ulp_in_a_kept_model_fails(tmp_path: Path) -> None:
    a, b = write_run(tmp_path / "a", 1.0), write_run(tmp_path / "b", 1.0)
    state = torch.load(b / "models" / "epoch-1.pt")
    w = state["model"]["w"]
    w[1, 2] = torch.nextafter(w[1, 2], torch.tensor(float("inf")))
    torch.save(state, b / "models" / "epoch-1.pt")
    proc = run(a, b)
    assert proc.returncode == 1
    assert "models/epoch-1.pt        different in 1 tensors" in proc.stdout
    assert "model.pt                 equal" in proc.stdout


def test_a_metric_a_sharpness_value_or_a_missing_file_fails(tmp_path: Path) -> None:
    a = write_run(tmp_path / "a", 1.0)
    for name, edit in [
        ("metrics.jsonl", lambda t: t.replace('"test_acc": 0.52', '"test_acc": 0.5201')),
        ("sharpness.json", lambda t: t.replace("28.0", "28.000000000000004")),
    ]:
        b = tmp_path / f"b-{name}"
        shutil.copytree(a, b)
        (b / name).write_text(edit((b / name).read_text()))
        proc = run(a, b)
        assert proc.returncode == 1, name
        assert f"{name:<24} different" in proc.stdout
    (b / "summary.json").unlink()
    assert "summary.json             missing in one of them" in run(a, b).stdout
    (a / "models" / "epoch-9.pt").write_bytes((a / "model.pt").read_bytes())  # in the original only
    assert "models/epoch-9.pt        missing in one of them" in run(b, a).stdout
