"""``localsgd train --fault-tolerant``: three worker processes of the harness against a torchft
lighthouse (CIFAR-10, ResNet-8, post-local SGD then DiLoCo), compared with the simulator's
``localsgd train`` of the same settings: without faults the plain run (``--random-per-step``),
after a worker was SIGKILLed and restarted the replay of the logged membership (``--membership``).
Models are compared bit for bit (ordered averaging; every side computes on this CPU)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("torchft")

from localsgd.harness.cli import main
from localsgd.harness.fault_tolerance import adopt
from localsgd.harness.rundir import RunDirectoryError
from tests.test_ft import free_port

ROOT = Path(__file__).resolve().parents[1]
CIFAR10 = ROOT.parent / "shared" / "data" / "cifar-10-batches-py"
K = 3
SETTINGS = [
    "--dataset", "cifar10", "--data-dir", str(CIFAR10), "--model", "resnet8", "--train-subset", "768",
    "--test-subset", "200", "--workers", str(K), "--local-batch-size", "16", "--epochs", "10",
    "--warmup-epochs", "1", "--local-steps", "4", "--switch-epoch", "2", "--outer-optimizer", "diloco",
    "--ordered-averaging", "--threads", "1", "--progress", "false", "--seed", "3",
]  # fmt: skip
STEPS = 160  # 16 steps per epoch

needs_cifar = pytest.mark.skipif(not CIFAR10.exists(), reason="CIFAR-10 is not in ../shared/data")


def run_workers(
    out: Path, kill_after: int | None = None, extra: tuple[str, ...] = (), timeout: float = 300.0
) -> dict[int, int]:
    """K workers against a fresh lighthouse; with ``kill_after``, worker 2 is SIGKILLed once it has
    logged that many rounds and started again with the same command. Returns each worker's starts."""
    port = free_port()
    # a round waits up to 5 s for a live worker: a restarted one that joined in the last parameter
    # round must reach the final evaluation's round too, also on a loaded machine (with 1 s it once
    # came late, and the others averaged without it)
    lighthouse = subprocess.Popen(
        [str(Path(sys.executable).parent / "torchft_lighthouse"), "--bind", f"127.0.0.1:{port}",
         "--min_replicas", "1", "--join_timeout_ms", "5000", "--quorum_tick_ms", "10",
         "--heartbeat_timeout_ms", "1000"],
        stdout=(out.parent / "lighthouse.txt").open("w"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    starts = dict.fromkeys(range(K), 0)

    def start(k: int) -> subprocess.Popen:
        starts[k] += 1
        log = (out.parent / f"log-{k}-{starts[k]}.txt").open("w")
        args = [
            "--fault-tolerant",
            "--worker",
            str(k),
            "--lighthouse",
            f"http://127.0.0.1:{port}",
            "--out",
            str(out),
        ]
        return subprocess.Popen(
            [sys.executable, "-m", "localsgd", "train", *SETTINGS, *extra, *args],
            env=env,
            stdout=log,
            stderr=log,
        )

    procs = {k: start(k) for k in range(K)}
    try:
        deadline = time.monotonic() + timeout
        while procs:
            assert time.monotonic() < deadline, f"the run did not finish in {timeout} s"
            rounds = out / "worker-2" / "rounds.jsonl"
            due = kill_after is not None and starts[2] == 1 and rounds.exists()
            if due and len(rounds.read_text().splitlines()) >= kill_after:
                procs[2].send_signal(signal.SIGKILL)
                procs[2].wait()
                procs[2] = start(2)
            for k, p in list(procs.items()):
                rc = p.poll()
                if rc is not None:
                    del procs[k]
                    log = (out.parent / f"log-{k}-{starts[k]}.txt").read_text()[-3000:]
                    assert rc == 0, f"worker {k} exited with {rc}:\n{log}"
            time.sleep(0.02)
    finally:
        for p in procs.values():
            p.kill()
        lighthouse.kill()
        lighthouse.wait()
    return starts


def simulate(out: Path, *extra: str) -> None:
    assert main(["train", *SETTINGS, "--out", str(out), *extra]) == 0


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path)["model"]


def assert_same_model(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    differ = [name for name in wa if not torch.equal(wa[name], wb[name])]
    assert not differ, f"{a} and {b} differ in {differ[:3]}"


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def rounds(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "rounds.jsonl").read_text().splitlines()]


@needs_cifar
@pytest.mark.parametrize(
    "extra",
    [(), ("--compress", "int8", "--fragments", "2", "--overlap-steps", "1")],
    ids=["plain", "int8-fragments-overlap"],
)
def test_fault_tolerant_workers_equal_the_plain_run(tmp_path: Path, extra: tuple[str, ...]) -> None:
    """Without faults: every worker's final model and every row's evaluation (the average of the
    three) equal the simulator's run with per-step random streams, bit for bit; also with the
    DiLoCo phase streamed in two fragments, each applied a step after it was sent (the epochs'
    evaluations fall inside those open rounds), its pseudo-gradients int8-compressed."""
    assert run_workers(tmp_path / "ft", extra=extra) == dict.fromkeys(range(K), 1)
    simulate(tmp_path / "plain", "--random-per-step", *extra)
    plain = rows(tmp_path / "plain")
    for k in range(K):
        worker = tmp_path / "ft" / f"worker-{k}"
        assert_same_model(worker / "model.pt", tmp_path / "plain" / "model.pt")
        mine = rows(worker)
        assert [(r["step"], r["test_loss"], r["test_acc"]) for r in mine] == [
            (r["step"], r["test_loss"], r["test_acc"]) for r in plain
        ]
        assert all(r["averaged_over"] == [0, 1, 2] and r["rounds_discarded"] == 0 for r in mine)
        assert json.loads((worker / "config.json").read_text())["derived"]["runtime"] == "fault-tolerant"
    ids = {
        json.loads((tmp_path / "ft" / f"worker-{k}" / "config.json").read_text())["derived"]["run_id"]
        for k in range(K)
    }
    assert len(ids) == 1


@needs_cifar
def test_a_killed_worker_rejoins_and_the_replay_matches(tmp_path: Path) -> None:
    """Worker 2 is SIGKILLed after 20 rounds and started again with its command: the others take
    every step, it heals from a live worker and appends to its own directory, all three end with
    the same model, and the simulator's replay of the logged rounds gives that model."""
    ft, longer = tmp_path / "ft", ("--epochs", "20")  # room for a slow restart to rejoin before the end
    assert run_workers(ft, kill_after=20, extra=longer) == {0: 1, 1: 1, 2: 2}
    trace = [r for k in range(K) for r in rounds(ft / f"worker-{k}")]
    heals = [r for r in trace if r["heals"] and r["worker"] == 2]
    assert len(heals) == 1 and heals[0]["heals"][0][0] == 2 and heals[0]["heal_seconds"] > 0
    assert any(r["members"] == [0, 1] for r in trace), "the others went on without worker 2"
    for k in (0, 1):  # the survivors: a row at every epoch
        assert [r["step"] for r in rows(ft / f"worker-{k}")] == list(range(16, 2 * STEPS + 1, 16))
    restarted = rows(ft / "worker-2")  # both lives' rows, in order; the heal in the row it fell in
    steps = [r["step"] for r in restarted]
    assert steps == sorted(set(steps)) and steps[-1] == 2 * STEPS
    assert any(h["worker"] == 2 and h["seconds"] > 0 for r in restarted for h in r["heals"])
    simulate(tmp_path / "replay", *longer, "--membership", str(ft))
    final = [json.loads((ft / f"worker-{k}" / "summary.json").read_text())["averaged_over"] for k in range(K)]
    # the final average: over all three, or over 0 and 1 if worker 2 healed in that very round
    assert final[0] == final[1] == final[2] and final[0] in ([0, 1, 2], [0, 1])
    for k in range(K):
        assert_same_model(ft / f"worker-{k}" / "model.pt", tmp_path / "replay" / "model.pt")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--fault-tolerant", "--worker", "0", "--lighthouse", "x"], r"^fault_tolerant needs workers \(K\)"),
        (["--fault-tolerant", "--workers", "3", "--worker", "3", "--lighthouse", "x"], r"^worker \(k\) = 3: .* \[0, 3\)"),
        (["--fault-tolerant", "--workers", "3", "--worker", "0"], r"needs the lighthouse's address"),
        (["--fault-tolerant", "--workers", "3", "--worker", "0", "--lighthouse", "x", "--local-steps", "4",
          "--block-steps", "2"], r"^fault_tolerant does not support hierarchical schedules yet \(block_steps = 2\)"),
        (["--fault-tolerant", "--workers", "3", "--worker", "0", "--lighthouse", "x", "--min-workers", "4"],
         r"^min_workers = 4 exceeds workers \(K\) = 3"),
        (["--worker", "1"], r"^worker = 1 needs fault_tolerant"),
        (["--membership", "nowhere"], r"^membership = 'nowhere': no worker-k/rounds.jsonl in it"),
        (["--fault-tolerant", "--membership", "x"], r"membership replays a fault-tolerant run in the simulator"),
    ],
)  # fmt: skip
def test_bad_fault_tolerance_settings_are_one_line(
    tmp_path: Path, flags: list[str], message: str, capsys: pytest.CaptureFixture
) -> None:
    """Each before any work and before the run directory exists."""
    out = tmp_path / "run"
    env = {k: os.environ.pop(k) for k in ("REPLICA_GROUP_ID", "TORCHFT_LIGHTHOUSE") if k in os.environ}
    try:
        code = main(["train", "--dataset", "cifar10", "--data-dir", str(CIFAR10), "--out", str(out), *flags])
    finally:
        os.environ.update(env)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert re.search(message, err[0].removeprefix("localsgd: error: ")), err[0]
    assert not out.exists()


def test_a_directory_of_another_run_is_kept(tmp_path: Path) -> None:
    """A restarted worker appends to its directory only if it holds the same run (its id); another
    run's is an error, and replaced only with overwrite."""
    out = tmp_path / "worker-0"
    out.mkdir()
    (out / "config.json").write_text(
        json.dumps({"config": {}, "derived": {"run_id": 7}, "versions": {"localsgd": "x"}})
    )
    (out / "metrics.jsonl").write_text('{"step": 16}\n')
    assert adopt(out, 7, overwrite=False) == [{"step": 16}]
    with pytest.raises(
        RunDirectoryError, match=r"holds a worker of another run \(run id 7; this run's is 8\)"
    ):
        adopt(out, 8, overwrite=False)
    assert (out / "metrics.jsonl").exists()
    assert adopt(out, 8, overwrite=True) == [] and not (out / "metrics.jsonl").exists()


@needs_cifar
def test_a_worker_that_joins_at_the_last_round_writes_the_final_row(tmp_path: Path) -> None:
    """A fault-tolerant worker healed in the run's last round takes no step in its new life: its
    directory still gets the final row (the evaluation of the last average, no training sums), and
    the summary reports that evaluation, not the last row of its first life. Staged in the
    simulator: the run set up, then started at its last step with the first life's rows."""
    from localsgd.harness import train as T
    from localsgd.harness.config import from_mapping
    from localsgd.harness.rundir import RunWriter
    from localsgd.harness.runtime import Runtime
    from localsgd.harness.tasks import make_task

    cfg = from_mapping(
        {"dataset": "cifar10", "data_dir": str(CIFAR10), "model": "resnet8", "train_subset": 64,
         "test_subset": 50, "workers": 2, "local_batch_size": 16, "epochs": 2, "warmup_epochs": 0.5,
         "local_steps": 2, "progress": False, "threads": 1},
        "test",
    )  # fmt: skip
    cfg.validate()
    runtime, task = Runtime(cfg), make_task(cfg, torch.device("cpu"))
    plan = T.make_plan(cfg, task.steps_per_epoch)
    out = tmp_path / "run"
    run = T.Run.setup(cfg, out, runtime, RunWriter(out, True, False), task, plan, {})
    first_life = {"epoch": 1.0, "step": plan.steps_per_epoch, "lr": 0.1, "train_loss": 2.0, "test_acc": 0.5}
    run.history, run.first_step = [first_life], plan.total_steps
    run.engine.t = plan.total_steps
    result = T.run_steps(run)
    last = result.history[-1]
    assert last["step"] == plan.total_steps and "train_loss" not in last and "test_acc" in last
    assert result.summary["final_test_acc"] == last["test_acc"] and result.summary["final_train_loss"] is None
