"""benchmarks/gpu.py on the CPU with tiny sizes: both parts run and the JSON holds what they measured."""

from __future__ import annotations

import json
import math
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu.py"

WORKERS, BATCH, H, STEPS, REPEATS = 2, 8, 2, 2, 2
EPOCHS, TRAIN_SUBSET, TEST_SUBSET = 2, 64, 32
STEPS_PER_EPOCH = math.ceil(TRAIN_SUBSET // WORKERS / BATCH)  # 4


def write_cifar10(folder: Path, n: int = 40) -> Path:
    """A tiny CIFAR-10 in the official cifar-10-batches-py layout (random images)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for file in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"labels": [i % 10 for i in range(n)],
        }
        (folder / file).write_bytes(pickle.dumps(batch, protocol=3))
    return folder


def run(*flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *flags], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def positive(values: list[float] | float) -> bool:
    values = values if isinstance(values, list) else [values]
    return bool(values) and all(isinstance(v, float) and math.isfinite(v) and v > 0 for v in values)


def test_cpu_path_measures_throughput_and_trains(tmp_path: Path) -> None:
    data = write_cifar10(tmp_path / "cifar-10-batches-py")
    out = tmp_path / "gpu.json"
    proc = run(
        "--device", "cpu", "--threads", "1", "--model", "resnet8", "--workers", str(WORKERS),
        "--local-batch-size", str(BATCH), "--local-steps", str(H), "--steps", str(STEPS),
        "--repeats", str(REPEATS), "--warmup", "1", "--epochs", str(EPOCHS), "--warmup-epochs", "0.5",
        "--train-subset", str(TRAIN_SUBSET), "--test-subset", str(TEST_SUBSET), "--data-dir", str(data),
        "--out", str(out),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "error" not in proc.stderr.lower()
    result: dict[str, Any] = json.loads(out.read_text())
    assert {"command", "commit", "machine", "device", "throughput", "train"} <= set(result)
    assert result["device"] == "cpu" and result["machine"]["device"] == "cpu"
    assert "--device cpu" in result["command"]

    # --- part 1: a row per (precision, configuration); fp32 measured, bf16 as the hardware allows
    tp = result["throughput"]
    native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    assert tp["bf16_native"] is native
    assert (tp["steps_per_repeat"], tp["repeats"], tp["model"]) == (STEPS, REPEATS, "resnet8")
    rows = {(r["precision"], r["config"]): r for r in tp["rows"]}
    assert set(rows) == {(p, c) for p in ("fp32", "bf16") for c in ("one model", "simulator")}
    for (precision, config), r in rows.items():
        assert r["images_per_step"] == WORKERS * BATCH
        if precision == "bf16" and not native:
            assert r["status"] == "skipped"
            assert "no native bf16" in r["reason"] and "is False" in r["reason"]
            assert "img_per_s" not in r
            continue
        assert r["status"] == "measured", r
        assert len(r["img_per_s"]) == REPEATS and positive(r["img_per_s"])
        assert positive(r["median_img_per_s"]) and positive(r["ratio_to_one_model"])
        assert min(r["img_per_s"]) <= r["median_img_per_s"] <= max(r["img_per_s"])
        assert math.isfinite(r["last_loss"])
        if config == "simulator":
            assert (r["workers"], r["local_batch_size"], r["local_steps"]) == (WORKERS, BATCH, H)
            assert r["averages_per_repeat"] == [STEPS // H] * REPEATS  # averaging inside every repeat
        else:
            assert r["ratio_to_one_model"] == 1.0 and r["averages_per_repeat"] is None

    # --- part 2: the paper preset with the recorded overrides, for exactly the steps asked
    tr = result["train"]
    assert tr["status"] == "finished" and tr["preset"] == "paper"
    assert tr["overrides"] == {
        "epochs": EPOCHS, "warmup_epochs": 0.5, "device": "cpu", "data_dir": str(data), "model": "resnet8",
        "workers": WORKERS, "local_batch_size": BATCH, "local_steps": H, "train_subset": TRAIN_SUBSET,
        "test_subset": TEST_SUBSET, "threads": 1,
    }  # fmt: skip
    assert tr["device"] == "cpu"
    assert result["sharded"] == {"status": "skipped", "reason": "needs 2 or more GPUs, found 0"}  # part 3
    assert tr["steps"] == tr["steps_expected"] == EPOCHS * STEPS_PER_EPOCH
    assert tr["switch_step"] == STEPS_PER_EPOCH  # t' = the first decay, half of the epochs
    assert tr["images_trained"] == EPOCHS * TRAIN_SUBSET
    assert (tr["train_images"], tr["test_images"]) == (TRAIN_SUBSET, TEST_SUBSET)
    for key in ("final_test_acc", "best_test_acc", "final_local_test_acc"):
        assert 0.0 <= tr[key] <= 1.0
    for key in ("wall_seconds", "train_img_per_s", "img_per_s_with_eval", "seconds_with_data_loading"):
        assert positive(tr[key]), key
    assert tr["wall_seconds"] <= tr["seconds_with_data_loading"]
    assert [h["step"] for h in tr["history"]] == [STEPS_PER_EPOCH * (e + 1) for e in range(EPOCHS)]
    assert tr["history"][-1]["test_acc"] == tr["final_test_acc"]
    assert sum(tr["rounds"].values()) > 0
    assert tr["run_dir"] is None  # the temporary run directory is gone

    table = proc.stdout
    assert "simulator K=2 H=2" in table and "final test accuracy" in table


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--device", "cuda"], "error: --device cuda but torch.cuda.is_available() is False"),
        (
            ["--local-steps", "4", "--steps", "6"],
            "error: --steps (6) must be a multiple of --local-steps (4)",
        ),
        (["--data-dir", "/nonexistent/cifar"], "error: CIFAR-10 not found in /nonexistent/cifar"),
        (["--workers", "0"], "error: --workers must be >= 1, got 0"),
    ],
)
def test_bad_input_is_one_line_before_any_work(tmp_path: Path, flags: list[str], message: str) -> None:
    if flags[:2] == ["--device", "cuda"] and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    out = tmp_path / "gpu.json"
    proc = run(*flags, "--out", str(out))
    assert proc.returncode == 2
    assert proc.stderr.startswith(message) and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stdout == "" and not out.exists()
