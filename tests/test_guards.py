"""Advertised paths and guards that had no test: the initial broadcast and the optimizer-state
policies across real processes, misuse of the API, the demo, hierarchical runs, `plan` and
`download` through the command line, `study --max-hours`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from localsgd import Engine, LocalSGD, Schedule, SimCommunicator, Simulator
from localsgd.engine import first_line
from localsgd.harness.cli import main
from localsgd.harness.rows import TrainingError, check_finite
from tests.helpers import mlp, sgd, torchrun
from tests.test_train import CIFAR10, TINY, needs_cifar10


def results(out: Path, n: int) -> list[dict]:
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(n)]


def test_initial_broadcast_across_processes_and_the_ddp_buffer_guard(tmp_path: Path) -> None:
    """Ranks built from different seeds (and different BatchNorm statistics) hold rank 0's
    parameters and buffers once LocalSGD is constructed; a DDP wrapper that would overwrite every
    rank's BatchNorm statistics at each forward is refused with the fix in the message."""
    torchrun(2, "sync_initial", tmp_path)
    r0, r1 = results(tmp_path, 2)
    assert not all(torch.equal(a, b) for a, b in zip(r0["before"], r1["before"], strict=True))
    assert all(torch.equal(a, b) for a, b in zip(r0["after"], r1["after"], strict=True))
    assert all(torch.equal(a, b) for a, b in zip(r0["after"], r0["before"], strict=True))  # rank 0's
    for r in (r0, r1):
        assert (
            "contradicts buffers='local'" in r["ddp_error"] and "forward_sync_buffers=False" in r["ddp_error"]
        )


@pytest.mark.parametrize("policy", ["average", "reset"])
def test_optimizer_state_policies_across_processes(tmp_path: Path, policy: str) -> None:
    """After each parameter average (steps 3 and 6), the momentum is the ranks' mean ("average":
    equal on both ranks, and the mean of what local would have) or cleared ("reset")."""
    torchrun(2, "optimizer_state", tmp_path, policy)
    local = tmp_path / "local"
    local.mkdir()
    torchrun(2, "optimizer_state", local, "local")
    got, alone = results(tmp_path, 2), results(local, 2)
    for step in (2, 5):  # 0-based: right after the averages
        if policy == "reset":
            assert got[0]["momentum"][step] is None and got[1]["momentum"][step] is None
        else:
            assert torch.equal(got[0]["momentum"][step], got[1]["momentum"][step])
    # before any average the policies agree; at the first average "average" is the local mean
    assert torch.equal(got[0]["momentum"][1], alone[0]["momentum"][1])
    if policy == "average":
        mean = (alone[0]["momentum"][2] + alone[1]["momentum"][2]) / 2
        assert torch.allclose(got[0]["momentum"][2], mean, rtol=0, atol=1e-7)


def test_misuse_of_the_api_is_a_clear_error() -> None:
    model = mlp(seed=1)
    opts = [sgd(model)]
    with pytest.raises(ValueError, match="need one GradScaler per optimizer: 1 optimizers, 2 scalers"):
        Engine(
            [model],
            opts,
            SimCommunicator(1),
            Schedule.local(2),
            grad_scalers=[torch.amp.GradScaler("cpu")] * 2,
        )
    sim = Simulator(mlp(seed=1), sgd, Schedule.local(2), workers=2)
    with pytest.raises(ValueError, match="a closure needs a single worker; the simulator holds several"):
        sim.step(lambda: torch.zeros(()))
    other = mlp(seed=2)
    with pytest.raises(
        ValueError, match=r"the optimizer holds a parameter of shape .* that is not a parameter of the model"
    ):
        LocalSGD(sgd(other), model, Schedule.local(2))


def test_first_line_is_one_line_for_the_user() -> None:
    """The one error text of the engine's messages and the command's last line: an OS error's
    path(s) and reason, else the first non-blank line, else the error's type."""
    assert first_line(FileNotFoundError(2, "No such file or directory", "runs/a")) == (
        "runs/a: No such file or directory"
    )
    assert (
        first_line(OSError(18, "Invalid cross-device link", "a", None, "b"))
        == "a -> b: Invalid cross-device link"
    )
    assert first_line(OSError(28, "No space left on device")) == "No space left on device"
    assert first_line(OSError("no errno")) == "no errno"
    assert (
        first_line(RuntimeError("\n  gloo: Connection closed by peer  \n at ..."))
        == "gloo: Connection closed by peer"
    )
    assert first_line(KeyError("model")) == "'model'"
    assert first_line(ValueError()) == "ValueError"


def test_ddp_in_the_simulator_is_refused(tmp_path: Path) -> None:
    """DDP needs a process group: one in this process (a file store), for the length of the test."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        model = DistributedDataParallel(mlp(seed=1))
        with pytest.raises(
            ValueError, match=r"DistributedDataParallel models need torch\.distributed, not the simulator"
        ):
            Engine([model], [sgd(model.module)], SimCommunicator(1), Schedule.local(2))
    finally:
        dist.destroy_process_group()


def test_check_finite_names_the_tensor_the_step_and_the_worker(tmp_path: Path) -> None:
    models = [mlp(seed=1), mlp(seed=1)]
    check_finite(list(enumerate(models)), 7, tmp_path)  # all finite: nothing
    with torch.no_grad():
        models[1][1].running_var[3] = float("inf")
    with pytest.raises(
        TrainingError, match=r"^1\.running_var is not finite after step 7 on worker 1; no checkpoint"
    ):
        check_finite(list(enumerate(models)), 7, tmp_path)


def test_demo_prints_the_same_table_in_both_runtimes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`localsgd demo` with K = 2 simulated workers and under torchrun with 2 processes: the same
    methods, rounds and bytes, and accuracies within a point (the order of sums differs)."""
    from tests.helpers import launch

    assert main(["demo", "--workers", "2", "--epochs", "1"]) == 0
    sim = capsys.readouterr().out
    _, dist_out = launch(2, ["-m", "localsgd", "demo", "--epochs", "1"])

    def rows(text: str) -> list[list[str]]:
        lines = text.splitlines()
        start = next(i for i, line in enumerate(lines) if line.startswith("method"))
        return [line.split() for line in lines[start + 2 : start + 6]]

    a, b = rows(sim), rows(dist_out)
    assert [r[0] for r in a] == ["mini-batch", "local", "post-local", "hierarchical"]
    for ra, rb in zip(a, b, strict=True):
        assert ra[0] == rb[0] and ra[-4:-1] == rb[-4:-1]  # method; rounds, block rounds, MB
        # test accuracy: the runtimes sum in other orders and training amplifies it (0.14 points seen)
        assert abs(float(ra[-5].rstrip("%")) - float(rb[-5].rstrip("%"))) <= 1.0


@needs_cifar10
def test_hierarchical_local_sgd_through_the_cli(tmp_path: Path) -> None:
    """--workers-per-block 2 --block-steps 2 with H = 2 after the mini-batch epoch (K = 4, 4 steps
    per epoch of 64 images): block averages after local steps 2 and 6, global after 4 and 8."""
    out = tmp_path / "run"
    flags = [*TINY, "--train-subset", "256", "--local-batch-size", "16", "--epochs", "3", "--switch-epoch", "1",
             "--workers-per-block", "2", "--block-steps", "2", "--no-progress", "--eval-local", "never"]  # fmt: skip
    assert main(["train", *flags, "--out", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["rounds"] for r in rows] == [
        {"global": 4, "block": 0},  # mini-batch epoch: 4 gradient averages
        {"global": 4 + 1, "block": 1},  # local steps 1-4: a block average after 2, global after 4
        {"global": 4 + 2, "block": 2},
    ]


def test_plan_through_the_cli(capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(["plan", "--compute-ms", "130", "--workers", "2", "--bandwidth", "100mbit", "--latency-ms", "1"])
        == 0
    )
    out = capsys.readouterr().out
    assert "speed-up" in out.lower() or "speedup" in out.lower(), out
    assert main(["plan", "--compute-ms", "130", "--workers", "2", "--bandwidth", "fast"]) == 2


def test_study_max_hours_stops_starting_new_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A budget of 36 ms: the first piece starts (checked microseconds after the study starts), the
    others do not (a piece takes seconds); the command says how many are left."""
    if not CIFAR10.is_dir():
        pytest.skip("needs CIFAR-10")
    root = tmp_path / "s"
    assert (
        main(["study", "smoke", "--out", str(root), "--data-dir", str(CIFAR10), "--max-hours", "1e-5"]) == 0
    )
    finished = sorted(
        p.parent.name + "/" + p.name for p in root.rglob("seed-*") if (p / "summary.json").is_file()
    )
    assert len(finished) == 1, finished
    assert "time budget spent; 3 pieces left" in capsys.readouterr().out
