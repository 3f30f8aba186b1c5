"""Resumable runs: a run killed at any moment continues from its last checkpoint to exactly the
model an uninterrupted run gives."""

from __future__ import annotations

import itertools
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from localsgd import Schedule
from localsgd.harness import checkpoint
from localsgd.harness.cli import main
from localsgd.harness.rundir import TIMING_FIELDS
from tests.helpers import HERE, launch
from tests.test_train import TINY, needs_cifar10

FLAGS = [*TINY, "--workers", "2", "--epochs", "4", "--eval-local", "never", "--progress", "false"]


def kill_after_first_checkpoint(args: list[str], out: Path) -> int:
    """Start `localsgd train` and SIGKILL it as soon as a checkpoint is committed; returns its step."""
    env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
    proc = subprocess.Popen([sys.executable, "-m", "localsgd", "train", *args, "--out", str(out)], env=env)
    pointer = out / "checkpoints" / "latest"
    try:
        deadline = time.monotonic() + 120
        while not pointer.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    return json.loads(pointer.read_text())["step"]


def same_run(a: Path, b: Path, context: str = "") -> None:
    ma = torch.load(a / "model.pt", weights_only=True)["model"]
    mb = torch.load(b / "model.pt", weights_only=True)["model"]
    assert all(torch.equal(ma[k], mb[k]) for k in ma), context  # bit for bit
    rows = [[json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()] for d in (a, b)]
    assert len(rows[0]) == len(rows[1]), context
    for ra, rb in zip(*rows, strict=True):
        assert {k: v for k, v in ra.items() if k not in TIMING_FIELDS} == {
            k: v for k, v in rb.items() if k not in TIMING_FIELDS
        }, context


@needs_cifar10
def test_killed_simulator_run_resumes_bit_for_bit(tmp_path: Path) -> None:
    assert main(["train", *FLAGS, "--out", str(tmp_path / "full")]) == 0
    step = kill_after_first_checkpoint(FLAGS, tmp_path / "killed")
    assert step % 8 == 0 and step < 32  # an epoch boundary (8 steps per epoch) before the end
    assert main(["train", *FLAGS, "--out", str(tmp_path / "killed"), "--resume"]) == 0  # a flag
    same_run(tmp_path / "full", tmp_path / "killed")
    # A finished run is not run again.
    before = (tmp_path / "killed" / "model.pt").stat().st_mtime_ns
    assert main(["train", *FLAGS, "--out", str(tmp_path / "killed"), "--resume", "true"]) == 0
    assert (tmp_path / "killed" / "model.pt").stat().st_mtime_ns == before


@needs_cifar10
def test_torchrun_run_resumes_bit_for_bit(tmp_path: Path) -> None:
    """Two gloo processes: killed after a checkpoint, resumed with --resume: the same model as an
    uninterrupted torchrun run."""
    cmd = ["-m", "localsgd", "train", *FLAGS]
    launch(2, [*cmd, "--out", str(tmp_path / "full")])
    launch(2, [*cmd, "--out", str(tmp_path / "resumed"), "--checkpoint-every", "2"])
    # Cut the finished run back to its checkpoint, as a crash after epoch 2 would have left it.
    for name in ("model.pt", "summary.json"):
        (tmp_path / "resumed" / name).unlink()
    launch(2, [*cmd, "--out", str(tmp_path / "resumed"), "--checkpoint-every", "2", "--resume", "true"])
    same_run(tmp_path / "full", tmp_path / "resumed")


@needs_cifar10
def test_torchrun_restart_after_sigkill_at_a_random_step_resumes_bit_for_bit(tmp_path: Path) -> None:
    """torchrun --max-restarts 1: one worker is SIGKILLed before a random step of the first attempt;
    the restarted group resumes from the last checkpoint on its own (TORCHELASTIC_RESTART_COUNT) and
    ends with the model of an uninterrupted run."""
    seed = int(os.environ.get("LOCALSGD_TEST_SEED", random.randrange(2**31)))
    step = random.Random(seed).randrange(32)  # 4 epochs of 8 steps, a checkpoint after each epoch
    context = f"kill step {step} (LOCALSGD_TEST_SEED={seed} repeats it)"
    cmd = ["-m", "localsgd", "train", *FLAGS]
    launch(2, [*cmd, "--out", str(tmp_path / "full")])
    _, log = launch(
        2,
        [str(HERE / "restart_worker.py"), "train", *FLAGS, "--out", str(tmp_path / "restarted")],
        options=("--max-restarts", "1"),
        env={"KILL_RANK": "1", "KILL_AT_STEP": str(step)},
    )
    # the victim (exit -9) or its survivor (a one-line error) is what torchrun reports first
    killed = "exitcode: -9" in log or "a worker is gone, stuck or unreachable" in log
    assert killed, f"no worker was killed, {context}:\n{log}"
    same_run(tmp_path / "full", tmp_path / "restarted", context)


@needs_cifar10
def test_torchrun_restart_with_a_fragment_in_flight_resumes_bit_for_bit(tmp_path: Path) -> None:
    """Post-local into Streaming DiLoCo (N = 2, H = 4, delta, τ = 1, int8): a fragment's average is
    in flight at the checkpoints of epochs 2 and 3 (sent after the epoch's last step, applied after
    the next). One worker is SIGKILLed at a random step past the first of them; the restarted group
    resends the fragment from the checkpoint (snapshots, anchor, residuals) and ends with an
    uninterrupted run's model."""
    seed = int(os.environ.get("LOCALSGD_TEST_SEED", random.randrange(2**31)))
    step = random.Random(seed).randrange(17, 32)  # after the checkpoint of step 16
    context = f"kill step {step} (LOCALSGD_TEST_SEED={seed} repeats it)"
    streaming = ["--outer-optimizer", "diloco", "--local-steps", "4", "--fragments", "2", "--merge", "delta",
                 "--overlap-steps", "1", "--compress", "int8"]  # fmt: skip
    cmd = ["-m", "localsgd", "train", *FLAGS, *streaming]
    launch(2, [*cmd, "--out", str(tmp_path / "full")])
    _, log = launch(
        2,
        [str(HERE / "restart_worker.py"), "train", *FLAGS, *streaming, "--out", str(tmp_path / "restarted")],
        options=("--max-restarts", "1"),
        env={"KILL_RANK": "0", "KILL_AT_STEP": str(step)},
    )
    killed = "exitcode: -9" in log or "a worker is gone, stuck or unreachable" in log
    assert killed, f"no worker was killed, {context}:\n{log}"
    # post-local from t' = 8 (epoch 1): a fragment is sent after the last step of epochs 2 and 3
    # (0-based steps 15 and 23) and applied after the next step
    assert all(Schedule.post_local(4, switch_step=8).fragment_at(t, 2) is not None for t in (15, 23))
    same_run(tmp_path / "full", tmp_path / "restarted", context)


@needs_cifar10
def test_corrupt_or_foreign_checkpoints_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    flags = [*FLAGS, "--epochs", "2", "--out", str(out)]
    assert main(["train", *flags]) == 0
    (out / "summary.json").unlink()  # pretend it was interrupted after the epoch-1 checkpoint
    state = next((out / "checkpoints").glob("step-*/process-0.pt"))
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit
    state.write_bytes(bytes(data))
    assert main(["train", *flags, "--resume", "true"]) == 2
    assert "checksum mismatch" in capsys.readouterr().err
    data[len(data) // 2] ^= 0x01
    state.write_bytes(bytes(data))
    assert main(["train", *flags, "--resume", "true", "--local-steps", "4"]) == 2
    err = capsys.readouterr().err
    assert "written with local_steps = 2, but this run has local_steps = 4" in err and err.count("\n") == 1


def poison(monkeypatch: pytest.MonkeyPatch, step: int, worker: int, workers: int) -> None:
    """Make worker ``worker``'s batch at step ``step`` all NaN (deterministic on every CPU, unlike
    the step at which a large learning rate diverges), and make every average assert that its
    inputs are finite."""
    from localsgd.averaging import FlatAverager
    from localsgd.harness import tasks as task_module

    calls = itertools.count()  # the loop augments worker 0..K-1's batches in order, step by step
    real_augment, real_average = task_module.augment, FlatAverager.average_

    def augment(x: torch.Tensor, *args: object) -> torch.Tensor:
        out = real_augment(x, *args)
        return torch.full_like(out, float("nan")) if next(calls) == step * workers + worker else out

    def average_(self: FlatAverager, level: object, tensors: list[list[torch.Tensor]], *rest: object) -> int:
        assert all(torch.isfinite(t).all() for ts in tensors for t in ts), "a non-finite value was averaged"
        return real_average(self, level, tensors, *rest)

    monkeypatch.setattr(task_module, "augment", augment)
    monkeypatch.setattr(FlatAverager, "average_", average_)


@needs_cifar10
@pytest.mark.parametrize(
    "step,worker,phase", [(3, 1, "mini-batch"), (12, 0, "local"), (13, 1, "local")]
)  # 8 steps per epoch; mini-batch SGD (gradient averages) for epoch 1, then H = 2
def test_non_finite_loss_stops_with_step_and_worker(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
    step: int, worker: int, phase: str,
) -> None:  # fmt: skip
    """A NaN batch for one worker at one step: the run stops with one line naming that step, its
    epoch and the worker, before the NaN reaches any average (gradients in the mini-batch phase,
    parameters in the local phase) or a checkpoint; the last checkpoint stays intact and finite.
    Catches a check placed after the average, a check only at epoch ends, a wrong step or worker."""
    out = tmp_path / "run"
    poison(monkeypatch, step, worker, workers=2)
    assert main(["train", *FLAGS, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    where = (
        f"the last good checkpoint is in {out / 'checkpoints'}"
        if step >= 8
        else "no checkpoint was written before"
    )
    assert (
        err
        == f"localsgd: error: loss is nan at step {step} (epoch {step // 8 + 1}) on worker {worker}; {where}\n"
    )
    state = checkpoint.read_state(out / "checkpoints", 0)
    if step < 8:
        assert state is None
    else:  # intact, and finite
        assert state is not None and state["engine"]["t"] == 8
        for replica in state["engine"]["replicas"]:
            assert all(torch.isfinite(v).all() for v in replica["model"].values() if v.is_floating_point())
    assert not (out / "model.pt").exists()


@needs_cifar10
def test_checkpoint_from_another_device_type_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A checkpoint written on a GPU (its generator states are CUDA's) does not resume on the CPU:
    one line saying where it was written and what to pass."""
    out = tmp_path / "run"
    flags = [*FLAGS, "--epochs", "2", "--out", str(out)]
    assert main(["train", *flags]) == 0
    (out / "summary.json").unlink()
    pointer = out / "checkpoints" / "latest"
    p = json.loads(pointer.read_text())
    path = checkpoint.step_dir(out / "checkpoints", p["step"]) / "process-0.pt"
    state = torch.load(path, weights_only=True)
    assert state["device"] == "cpu"
    state["device"] = "cuda"
    torch.save(state, path)
    p["files"]["process-0.pt"] = checkpoint.sha256(path)
    pointer.write_text(json.dumps(p))
    assert main(["train", *flags, "--resume"]) == 2
    assert capsys.readouterr().err == (
        f"localsgd: error: the checkpoint in {out / 'checkpoints'} was written on cuda, but this run is on "
        "cpu; resume it with --device cuda\n"
    )


class Exploit:
    """Unpickling this would run a shell command (if anything ever unpickled it unrestricted)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@needs_cifar10
def test_truncated_malicious_and_half_written_checkpoints(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A truncated state file fails its checksum; a state file that would run code is refused by
    the weights-only loader (and runs nothing); a step that was being written when the run died
    (no pointer to it) is ignored."""
    out = tmp_path / "run"
    flags = [*FLAGS, "--epochs", "2", "--out", str(out)]
    assert main(["train", *flags]) == 0
    (out / "summary.json").unlink()
    pointer = out / "checkpoints" / "latest"
    state = out / "checkpoints" / f"step-{json.loads(pointer.read_text())['step']:09d}" / "process-0.pt"
    good = state.read_bytes()

    state.write_bytes(good[: len(good) // 3])
    assert main(["train", *flags, "--resume", "true"]) == 2
    assert "checksum mismatch" in capsys.readouterr().err

    marker = tmp_path / "pwned"
    import pickle

    state.write_bytes(pickle.dumps({"engine": Exploit(marker)}, protocol=2))
    p = json.loads(pointer.read_text())
    p["files"]["process-0.pt"] = checkpoint.sha256(state)
    pointer.write_text(json.dumps(p))
    assert main(["train", *flags, "--resume", "true"]) == 2
    err = capsys.readouterr().err
    assert "unreadable checkpoint" in err and err.count("\n") == 1, err
    assert not marker.exists()

    state.write_bytes(good)
    p["files"]["process-0.pt"] = checkpoint.sha256(state)
    pointer.write_text(json.dumps(p))
    half = out / "checkpoints" / "step-999999999"
    half.mkdir()
    (half / "process-0.pt.tmp").write_bytes(good[:100])
    assert main(["train", *flags, "--resume", "true"]) == 0
    assert (out / "model.pt").exists()
