"""Real multi-process runs: torchrun with gloo on CPU (no mocks)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from localsgd import Simulator
from tests.dist_worker import SCHEDULES
from tests.helpers import batch, mlp, sgd, torchrun


def results(out: Path, nproc: int) -> list[dict]:
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(nproc)]


# Steps (1-based) after which parameters are averaged, written out by hand from the paper's
# definitions and docs/design.md's convention (periods count from the switch t').
EXPECTED = {
    # name: (mini-batch steps, {step: group size})
    "local": (set(), {3: 4, 6: 4, 9: 4, 12: 4}),
    # t' = 4 is not a multiple of H = 3: mini-batch steps 1..4, then averages after 7 and 10.
    "post_local": ({1, 2, 3, 4}, {7: 4, 10: 4}),
    # K' = 2, H = 2, H_b = 2, t' = 1: blocks after u = 2, 6, 10 local steps, all after u = 4, 8.
    "hierarchical": ({1}, {3: 2, 5: 4, 7: 2, 9: 4, 11: 2}),
}
EXPECTED["hierarchical_nodes"] = EXPECTED["hierarchical"]


def expected_values(name: str, buffers: str, workers: int = 4, steps: int = 12) -> torch.Tensor:
    minibatch, syncs = EXPECTED[name]
    params = [float(r) for r in range(workers)]
    running = [float(r) for r in range(workers)]
    out = torch.zeros(workers, steps, 3 + 2 + 2 + 1)
    for s in range(1, steps + 1):
        grads = [r + 1.0 for r in range(workers)]
        if s in minibatch:
            grads = [sum(grads) / workers] * workers
        params = [p + g for p, g in zip(params, grads, strict=True)]
        running = [b + r + 1.0 for r, b in enumerate(running)]
        if s in minibatch and buffers == "average":
            running = [sum(running) / workers] * workers
        if s in syncs:
            n = syncs[s]
            averaged = [params, running] if buffers == "average" else [params]
            for values in averaged:
                for start in range(0, workers, n):
                    mean = sum(values[start : start + n]) / n
                    values[start : start + n] = [mean] * n
        for r in range(workers):
            out[r, s - 1] = torch.tensor([params[r]] * 5 + [running[r]] * 2 + [s])
    return out


@pytest.mark.parametrize(
    "name,buffers",
    [("local", "local"), ("post_local", "local"), ("hierarchical", "local"), ("hierarchical", "average")],
)
def test_rank_values_become_exact_means_at_scheduled_steps(tmp_path: Path, name: str, buffers: str) -> None:
    """Parameters (float32 and float64, several buckets) equal the exact group mean right after the
    scheduled steps and are untouched otherwise; float buffers follow the policy; the integer
    buffer is never averaged."""
    torchrun(4, "rank_values", tmp_path, name, buffers)
    got = torch.stack([r["values"] for r in results(tmp_path, 4)])
    expected = expected_values(name, buffers)
    assert torch.equal(got, expected), (got - expected).abs().amax(-1)


def test_blocks_are_torchrun_nodes(tmp_path: Path) -> None:
    """Two torchrun agents of 2 processes each (two "nodes" meeting by c10d rendezvous): without an
    explicit K', the blocks are the nodes (LOCAL_WORLD_SIZE = 2)."""
    torchrun(2, "rank_values", tmp_path, "hierarchical_nodes", "local", nodes=2)
    got = torch.stack([r["values"] for r in results(tmp_path, 4)])
    assert torch.equal(got, expected_values("hierarchical_nodes", "local"))


def test_grad_scaler_skips_keep_workers_in_step(tmp_path: Path) -> None:
    """A GradScaler that skips an update on one worker does not derail the schedule: overflow in
    the mini-batch phase skips the step on every worker; in the local phase only on that worker,
    and the next scheduled average still happens everywhere."""
    torchrun(2, "grad_scaler", tmp_path)
    r0, r1 = results(tmp_path, 2)
    a, b = r0["trajectory"], r1["trajectory"]
    assert r0["t"] == r1["t"] == 8
    assert [torch.equal(a[i], b[i]) for i in range(8)] == [True, True, False, False, True, False, False, True]
    assert torch.equal(a[0], a[1]) and torch.equal(b[0], b[1])  # t = 1 skipped on both
    assert torch.equal(b[2], b[3]) and not torch.equal(a[2], a[3])  # t = 3 skipped on rank 1 only
    assert r0["scale"] == 2.0**7 and r1["scale"] == 2.0**6  # rank 1 backed off twice


def test_minibatch_equals_minibatch_sgd_with_bn(tmp_path: Path) -> None:
    """H = 1 is mini-batch SGD (Nesterov momentum, weight decay) over the workers' batches, with
    per-worker BatchNorm statistics."""
    torchrun(2, "minibatch", tmp_path, "plain")
    r0, r1 = results(tmp_path, 2)
    for r in (r0, r1):
        diff = max((p - q).abs().max().item() for p, q in zip(r["params"], r["reference"], strict=True))
        assert diff <= 1e-6
        assert r["rounds"] == 20
    assert not torch.allclose(r0["running_mean"], r1["running_mean"])  # per-worker BN statistics


def test_minibatch_with_ddp_lets_ddp_average(tmp_path: Path) -> None:
    """With DistributedDataParallel, DDP's own all-reduce does the mini-batch phase: the wrapper
    issues no all-reduce of its own and the result is still mini-batch SGD."""
    torchrun(2, "minibatch", tmp_path, "ddp")
    for r in results(tmp_path, 2):
        diff = max((p - q).abs().max().item() for p, q in zip(r["params"], r["reference"], strict=True))
        assert diff <= 1e-6
        assert r["python_all_reduces"] == 0
        assert r["rounds"] == 20


def test_ddp_sync_is_off_during_local_steps(tmp_path: Path) -> None:
    """Post-local SGD (t' = 2, H = 3) through DDP: replicas equal after mini-batch steps and averages
    only, and the trajectory equals the run without DDP."""
    torchrun(2, "ddp_local", tmp_path)
    r0, r1 = results(tmp_path, 2)
    same = [torch.equal(a, b) for a, b in zip(r0["ddp"], r1["ddp"], strict=True)]
    assert same == [True, True, False, False, True, False, False, True]
    for r in (r0, r1):
        assert (r["ddp"] - r["plain"]).abs().max() <= 1e-6


@pytest.mark.parametrize("name", ["sim_local", "sim_post_local"])
def test_simulator_equals_torchrun(tmp_path: Path, name: str) -> None:
    """Same seed and data: the in-process simulator and 4 gloo processes end equal (9 steps, H = 3)."""
    torchrun(4, "sim_vs_dist", tmp_path, name)
    sim = Simulator(mlp(seed=1), sgd, SCHEDULES[name][0], workers=4)
    for t in range(9):
        for k, (model, _) in enumerate(sim.replicas):
            x, y = batch(seed=2, worker=k, t=t)
            F.cross_entropy(model(x), y).backward()
        sim.step()
        sim.zero_grad()
    for k, r in enumerate(results(tmp_path, 4)):
        diff = max(
            (p - q).abs().max().item() for p, q in zip(sim.models[k].parameters(), r["params"], strict=True)
        )
        assert diff <= 1e-5
        for level, stats in sim.state_dict()["stats"].items():
            assert stats["rounds"] == r["stats"][level]["rounds"]
            assert stats["bytes"] == r["stats"][level]["bytes"]


def test_state_dict_mid_period_continues_bitwise(tmp_path: Path) -> None:
    torchrun(2, "resume", tmp_path)
    for r in results(tmp_path, 2):
        assert r["t"] == 12
        assert all(torch.equal(a, b) for a, b in zip(r["full"], r["resumed"], strict=True))


def test_mismatched_parameters_fail_fast_with_a_clear_error(tmp_path: Path) -> None:
    seconds = torchrun(2, "mismatch", tmp_path)
    for r in results(tmp_path, 2):
        assert r["error"] == (
            "localsgd: workers disagree before the first average: worker 0 has 6 parameters and "
            "worker 1 has 8; '4.weight' (3, 3) float32 is only on worker 1"
        )
        assert r["seconds"] < 5
    assert seconds < 60
