"""A run directory has one owner: nothing a run wrote is replaced or mixed without the user saying
so, a second run on a folder in use stops at once, and Ctrl-C or SIGTERM stops a run cleanly, to
be continued bit for bit with --resume."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import localsgd
from localsgd.harness import rundir
from localsgd.harness import train as train_module
from localsgd.harness.cli import main
from tests.helpers import HERE, launch
from tests.test_resume import FLAGS, same_run
from tests.test_train import needs_cifar10

pytestmark = needs_cifar10
STEPS_PER_EPOCH = 8  # FLAGS: 256 images, K = 2, B_loc = 16
PACKAGE = str(Path(localsgd.__file__).resolve().parent) + os.sep  # in a traceback through localsgd


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (the lock file aside) with the sha256 of its bytes."""
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != rundir.LOCK
    }


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert err.startswith("localsgd: error: ") and err.count("\n") == 1, err
    return err


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A finished run and the same run cut back to its epoch-2 checkpoint (as a kill after epoch 2
    leaves it: ``model.pt`` and ``summary.json`` not yet written)."""
    root = tmp_path_factory.mktemp("runs")
    assert main(["train", *FLAGS, "--out", str(root / "finished")]) == 0
    assert main(["train", *FLAGS, "--out", str(root / "cut"), "--checkpoint-every", "2"]) == 0
    for name in ("model.pt", "summary.json"):
        (root / "cut" / name).unlink()
    return {"finished": root / "finished", "interrupted": root / "cut"}


def copy_of(runs: dict[str, Path], kind: str, tmp_path: Path) -> Path:
    out = tmp_path / kind
    shutil.copytree(runs[kind], out)
    return out


def test_finished_run_is_not_replaced_without_overwrite(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = copy_of(runs, "finished", tmp_path)
    before = snapshot(out)
    assert main(["train", *FLAGS, "--out", str(out)]) == 2
    assert f"localsgd: error: {out} holds a finished run; replace it with --overwrite" in one_error_line(capsys)
    assert snapshot(out) == before


def test_interrupted_run_is_not_restarted_without_resume(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = copy_of(runs, "interrupted", tmp_path)
    before = snapshot(out)
    assert main(["train", *FLAGS, "--out", str(out), "--checkpoint-every", "2"]) == 2
    err = one_error_line(capsys)
    assert f"{out} holds an interrupted run (last checkpoint at step 16); continue it with --resume" in err
    assert snapshot(out) == before  # the checkpoint is still there


@pytest.mark.parametrize("kind", ["interrupted", "finished"])
def test_resume_with_other_settings_names_every_difference_and_touches_nothing(
    kind: str, runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = copy_of(runs, kind, tmp_path)
    before = snapshot(out)
    flags = [*FLAGS, "--out", str(out), "--resume", "--local-steps", "4", "--seed", "5"]
    assert main(["train", *flags]) == 2
    err = one_error_line(capsys)
    assert f"in {out} was written with local_steps = 2, seed = 3, but this run has local_steps = 4, seed = 5" in err
    assert snapshot(out) == before  # config.json included


def test_folder_that_is_not_a_run_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    foreign = tmp_path / "model-files"
    foreign.mkdir()
    (foreign / "config.json").write_text('{"model_type": "gpt2"}')  # another program's config.json
    (foreign / "weights.bin").write_bytes(b"\0" * 8)
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    for out, says in [
        (foreign, "is not empty and is not a localsgd run directory (it holds config.json, weights.bin)"),
        (a_file, "is a file, not a folder"),
    ]:
        before = snapshot(tmp_path)
        for extra in ([], ["--overwrite"], ["--resume"]):
            assert main(["train", *FLAGS, "--out", str(out), *extra]) == 2
            assert f"{out} {says}" in one_error_line(capsys)
        assert snapshot(tmp_path) == before


def test_overwrite_replaces_the_run_and_keeps_files_it_did_not_write(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = copy_of(runs, "finished", tmp_path)
    (out / "notes.txt").write_text("the user's own file")
    assert main(["train", *FLAGS, "--epochs", "1", "--out", str(out), "--overwrite"]) == 0
    assert main(["train", *FLAGS, "--epochs", "1", "--out", str(tmp_path / "fresh")]) == 0
    same_run(tmp_path / "fresh", out)  # nothing of the old run is mixed in
    assert json.loads((out / "config.json").read_text())["config"]["epochs"] == 1
    assert [p.name for p in (out / "checkpoints").iterdir()] == []  # the old run's checkpoints are gone
    assert (out / "notes.txt").read_text() == "the user's own file"


def hold_lock(out: Path) -> subprocess.Popen:
    """Another process that holds ``out``'s lock until it is killed."""
    code = "import sys, time; from pathlib import Path; from localsgd.harness.rundir import Lock; "
    code += "Lock(Path(sys.argv[1])); print('locked', flush=True); time.sleep(600)"
    env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
    proc = subprocess.Popen([sys.executable, "-c", code, str(out)], env=env, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline() == "locked\n"
    return proc


def test_a_second_run_on_a_folder_in_use_stops_at_once_and_a_killed_owner_leaves_no_lock(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    owner = hold_lock(out)
    try:
        assert main(["train", *FLAGS, "--out", str(out), "--resume"]) == 2
        err = one_error_line(capsys)
        assert f"the run directory {out} is in use by another run (pid {owner.pid} on " in err
        assert snapshot(out) == {}  # nothing written, no training before the refusal
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait()
    assert main(["train", *FLAGS, "--epochs", "1", "--out", str(out), "--resume"]) == 0  # the kernel freed it
    # The lock is held for the run's whole life: a run that has returned has let it go.
    rundir.Lock(out).release()


def test_a_second_torchrun_run_on_a_folder_in_use_stops_at_once(tmp_path: Path) -> None:
    out = tmp_path / "run"
    owner = rundir.Lock(out)  # this test process owns it
    try:
        with pytest.raises(AssertionError) as failed:
            launch(2, ["-m", "localsgd", "train", *FLAGS, "--out", str(out)])
    finally:
        owner.release()
    log = str(failed.value)
    assert f"localsgd: error: the run directory {out} is in use by another run (pid {os.getpid()} on" in log, log
    assert PACKAGE not in log and snapshot(out) == {}


def signal_at(monkeypatch: pytest.MonkeyPatch, step: int, signum: int, times: int = 1) -> None:
    """Deliver ``signum`` to this process ``times`` times while step ``step`` runs (as a Ctrl-C or a
    batch system's SIGTERM would, at a step chosen for the test)."""
    lr_at = train_module.lr_at

    def lr_at_and_signal(cfg, plan, t):  # type: ignore[no-untyped-def]
        if t == step:
            for _ in range(times):
                os.kill(os.getpid(), signum)
        return lr_at(cfg, plan, t)

    monkeypatch.setattr(train_module, "lr_at", lr_at_and_signal)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_stops_the_simulator_between_steps_with_a_checkpoint_that_resumes_bit_for_bit(
    signum: int,
    runs: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = tmp_path / "run"
    handler = signal.getsignal(signum)
    with monkeypatch.context() as m:
        signal_at(m, 10, signum)  # in the middle of epoch 2's row
        assert main(["train", *FLAGS, "--out", str(out)]) == 128 + signum
    name = signal.Signals(signum).name
    assert capsys.readouterr().err == (
        f"localsgd: interrupted ({name}) at step 11; continue with --resume (from there)\n"
    )
    assert signal.getsignal(signum) == handler  # the caller's handler is back
    assert json.loads((out / "checkpoints" / "latest").read_text())["step"] == 11
    assert not (out / "summary.json").exists()
    assert main(["train", *FLAGS, "--out", str(out), "--resume"]) == 0
    same_run(runs["finished"], out)  # the row cut at step 11 too


def test_a_second_ctrl_c_stops_at_once_keeping_the_last_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        signal_at(m, 10, signal.SIGINT, times=2)
        assert main(["train", *FLAGS, "--out", str(out)]) == 130
    assert capsys.readouterr().err == (
        "localsgd: interrupted; a run continues with --resume from its checkpoint\n"
    )
    assert json.loads((out / "checkpoints" / "latest").read_text())["step"] == STEPS_PER_EPOCH


def test_ctrl_c_under_torchrun_stops_every_rank_in_one_line_and_resumes_bit_for_bit(tmp_path: Path) -> None:
    """A real Ctrl-C: SIGINT to torchrun's whole process group (torchrun passes it to its workers
    too) once the first checkpoint is written. Every worker stops at a step boundary; --resume
    continues from the last checkpoint to the model of an uninterrupted torchrun run."""
    flags = [*FLAGS, "--epochs", "6"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    cmd += ["-m", "localsgd", "train", *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent)}
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [*cmd, "--out", str(out)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not (out / "checkpoints" / "latest").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGINT)
        log = proc.communicate(timeout=120)[0]
    finally:
        proc.kill()
    assert proc.returncode != 0 and not (out / "summary.json").exists(), log
    lines = [line for line in log.splitlines() if line.startswith("localsgd:")]
    assert len(lines) == 1, log
    step = int(re.match(r"localsgd: interrupted \(SIGINT\) at step (\d+); ", lines[0]).group(1))
    saved = json.loads((out / "checkpoints" / "latest").read_text())["step"]
    # the last checkpoint: the step the ranks stopped at if the signal came right after it
    where = "from there" if step == saved else f"from the checkpoint of step {saved}"
    assert lines[0].endswith(f"continue with --resume ({where})"), log
    assert PACKAGE not in log  # torchrun reports its own signal; no traceback through localsgd
    launch(2, ["-m", "localsgd", "train", *flags, "--out", str(out), "--resume"])
    launch(2, ["-m", "localsgd", "train", *flags, "--out", str(tmp_path / "full")])
    same_run(tmp_path / "full", out)


def test_plot_without_out_writes_beside_the_runs(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    here = tmp_path / "cwd"
    here.mkdir()
    monkeypatch.chdir(here)  # where a default of "runs.png" would have gone
    a = copy_of(runs, "finished", tmp_path / "study")
    b = copy_of(runs, "interrupted", tmp_path / "study")
    assert main(["plot", str(a), str(b)]) == 0
    assert (tmp_path / "study" / "runs.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list(here.iterdir()) == []
    elsewhere = copy_of(runs, "finished", tmp_path / "elsewhere")
    capsys.readouterr()
    assert main(["plot", str(a), str(elsewhere)]) == 2
    assert "the runs are in different folders; say where the plot goes with --out FILE.png" in one_error_line(capsys)


def test_a_text_run_is_continued_only_with_the_sampling_it_began_with(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A text run from before localsgd sampled the GPT's windows at random (its config.json records
    no sampling) cannot be continued or reused by a study as if it had been: one line, nothing
    touched."""
    from tests.test_language_task import LM

    out = tmp_path / "run"
    flags = [*LM, "--epochs", "0.0006", "--out", str(out)]  # 20 steps, a row and checkpoint every 10
    assert main(["train", *flags]) == 0
    record = json.loads((out / "config.json").read_text())
    assert record["derived"]["sampling"].startswith("windows in a seeded permutation")
    del record["derived"]["sampling"]  # as localsgd wrote it before
    (out / "config.json").write_text(json.dumps(record))
    (out / "summary.json").unlink()
    before = snapshot(out)
    capsys.readouterr()
    assert main(["train", *flags, "--resume"]) == 2
    err = one_error_line(capsys)
    assert f"the run in {out} read its training data as columns, recorded by localsgd before" in err
    assert "this localsgd reads them as windows in a seeded permutation per epoch" in err
    assert snapshot(out) == before


def test_an_interrupted_study_says_how_it_continues(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A study has no --resume: it continues when the same command runs again."""
    from tests.test_train import CIFAR10

    with monkeypatch.context() as m:
        signal_at(m, 2, signal.SIGINT)
        assert main(["study", "smoke", "--out", str(tmp_path), "--data-dir", str(CIFAR10)]) == 130
    err = capsys.readouterr().err
    assert err.endswith(
        "localsgd: interrupted (SIGINT) at step 3; continue by running the same command again (from there)\n"
    ), err
