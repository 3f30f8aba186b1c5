"""PyTorch Lightning (localsgd.integrations.lightning): 2 gloo processes under torchrun, no mocks.

Each multi-process test starts tests/lightning_worker.py (2 ranks, 40 optimizer steps of a small
MLP with BatchNorm, each rank its own shard) and takes 7-14 seconds on 2 busy cores.

The ranks are started by torchrun (tests/helpers.launch, as in tests/test_dist.py): Lightning
recognises torchrun's environment and uses its processes (accelerator="cpu", devices = torchrun's
processes per node, num_nodes = its nodes, gloo). Lightning's own launcher (the example's) re-runs
``sys.argv``, which under pytest would be pytest itself, and "spawn" would need every object
pickled into the children and back; torchrun also gives real multi-node rendezvous for the
hierarchical tests.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.helpers import HERE, launch, max_diff

needs_lightning = pytest.mark.skipif(
    importlib.util.find_spec("lightning") is None,
    reason="PyTorch Lightning is not installed (pip install 'localsgd[lightning]')",
)

# Global rounds in 40 steps. post_local (t' = 6, H = 4): 6 gradient averages (done by DDP's
# all-reduce) and parameter averages after steps 10, 14, ..., 38 (8). diloco (H = 6): outer steps
# after 6, 12, ..., 36. post_local_accum (accumulate_grad_batches=2: 20 optimizer steps, t' = 3,
# H = 2): 3 gradient averages and parameter averages after steps 5, 7, ..., 19 (8).
# On 2 nodes x 2 processes (Trainer(num_nodes=2); blocks are nodes), t' = 3, H = 2, H_b = 2: 3
# gradient averages, global parameter averages at u = 4, 8, ..., 36 (9) and block ones at u = 2,
# 6, ..., 34 (9); t' = 2, H = 1, H_b = 4: 2 global gradient averages, then a block gradient average
# in each of the other 38 steps and 9 global parameter averages.
ROUNDS = {
    "post_local": {"global": 14},
    "diloco": {"global": 6},
    "post_local_accum": {"global": 11},
    "post_local_manual": {"global": 14},
    "hierarchical": {"global": 12, "block": 9},
    "hierarchical_h1": {"global": 11, "block": 38},
}
STEPS = {"post_local_accum": 20}  # 40 for the others
ACCUMULATE = {"post_local_accum": 2}  # batches per optimizer step; 1 for the others
# The steps (0-based, before them) that communicate globally: every step before t', then the
# global parameter averages above (post_local: after steps 10, 14, ..., 38 counted from 1).
GLOBAL_STEPS = {
    "post_local": [*range(6), *range(9, 40, 4)],
    "diloco": [*range(5, 40, 6)],
    "post_local_accum": [*range(3), *range(4, 20, 2)],
    "post_local_manual": [*range(6), *range(9, 40, 4)],
    "hierarchical": [*range(3), *range(6, 40, 4)],
    "hierarchical_h1": [*range(2), *range(5, 40, 4)],
}
SWITCH = {
    "post_local": 6,
    "diloco": 0,
    "post_local_accum": 3,
    "post_local_manual": 6,
    "hierarchical": 3,
    "hierarchical_h1": 2,
}  # t'
NODES = {"hierarchical": 2, "hierarchical_h1": 2}  # 1 for the others


def worker(
    mode: str, out: Path, config: str, *mutation: str, env: dict[str, str] | None = None
) -> list[dict]:
    nodes = NODES.get(config, 1)
    launch(2, [str(HERE / "lightning_worker.py"), mode, str(out), config, *mutation], nodes=nodes, env=env)
    return [torch.load(out / f"{mode}_rank{r}.pt", weights_only=True) for r in range(2 * nodes)]


def test_importing_localsgd_does_not_import_lightning() -> None:
    code = "import sys, localsgd, localsgd.integrations; assert 'lightning' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_missing_lightning_is_one_clear_error() -> None:
    code = (
        "import sys; sys.modules['lightning'] = None\n"  # as if it were not installed
        "try:\n    import localsgd.integrations.lightning\n"
        "except ImportError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert "pip install 'localsgd[lightning]'" in out


@needs_lightning
@pytest.mark.parametrize(
    "config",
    ["post_local", "diloco", "post_local_accum", "post_local_manual", "hierarchical", "hierarchical_h1"],
)
def test_lightning_equals_the_plain_loop(tmp_path: Path, config: str) -> None:
    """Same init, data order and schedule: Trainer.fit with LocalSGDStrategy ends bit for bit where
    the README's own loop with a DistributedDataParallel model ends, with the rounds the schedule
    names. Without DDP the loop is bit-equal too with 2 ranks; with 4 (hierarchical) DDP's
    all-reduce of the mini-batch gradients sums in another order than localsgd's own mean
    (measured max difference after 40 steps: 2.4e-7), hence 1e-6 there. With
    accumulate_grad_batches=2 a localsgd step is an optimizer step of 2 batches (the loop
    accumulates 2 halved losses, under no_sync with DDP). With manual optimization (training_step
    calls zero_grad, manual_backward and step) Lightning's own switching of DDP's sync around
    training_step must not override localsgd's. Lightning's broadcast of a SIGTERM flag before
    every batch is made only before steps that communicate globally anyway."""
    results = worker("equal", tmp_path, config)
    for r in results:
        lightning, plain_ddp, plain = r["lightning"], r["plain_ddp"], r["plain"]
        assert lightning["t"] == plain["t"] == STEPS.get(config, 40)
        assert all(torch.equal(a, b) for a, b in zip(lightning["state"], plain_ddp["state"], strict=True))
        if NODES.get(config, 1) == 1:
            assert all(torch.equal(a, b) for a, b in zip(lightning["state"], plain["state"], strict=True))
        else:
            assert max_diff(lightning["state"], plain["state"]) <= 1e-6
        for other in (lightning, plain_ddp, plain):
            assert {level: s["rounds"] for level, s in other["stats"].items()} == ROUNDS[config]
        assert lightning["stats"] == {
            level: {**s, "seconds": lightning["stats"][level]["seconds"]}
            for level, s in plain_ddp["stats"].items()
        }  # the same bytes
        # outside localsgd's step, Python issues collectives (Lightning's SIGTERM broadcast) only
        # before steps that communicate globally, once per batch; DDP all-reduces once per step
        # before t' and never after
        outside = [t for t, _ in lightning["outside"]]
        assert sorted(set(outside)) == GLOBAL_STEPS[config]
        assert len(outside) == len(GLOBAL_STEPS[config]) * ACCUMULATE.get(config, 1)
        assert lightning["ddp_synced"] == list(range(SWITCH[config]))
    r0, r1 = (r["lightning"]["state"] for r in results[:2])
    assert max_diff(r0, r1) > 1e-4  # the last steps were local: the ranks differ, as they should


@needs_lightning
@pytest.mark.parametrize("config", ["post_local", "diloco"])
@pytest.mark.parametrize("mutation", ["no_average", "ddp_on"])
def test_a_broken_engine_is_caught(tmp_path: Path, config: str, mutation: str) -> None:
    """The equality above notices averaging left out and DDP's all-reduce left on in local steps."""
    for r in worker("equal", tmp_path, config, mutation):
        assert max_diff(r["lightning"]["state"], r["plain"]["state"]) > 1e-2


@needs_lightning
@pytest.mark.parametrize(
    "config,every,checkpoint",
    [
        ("post_local", 0, "epoch=1-step=20.ckpt"),
        ("diloco", 0, "epoch=1-step=20.ckpt"),
        ("post_local", 13, "epoch=1-step=13.ckpt"),
    ],
)
def test_kill_and_resume_from_lightnings_checkpoint_is_bitwise(
    tmp_path: Path, config: str, every: int, checkpoint: str
) -> None:
    """ModelCheckpoint after epoch 1 (step 20), or every 13 steps (step 13, mid-epoch); either is
    mid-period, where the ranks differ. The job is killed 3 steps into epoch 2 (step 23), then
    Trainer.fit(ckpt_path=that checkpoint): the same final state on every rank as a run that was
    never interrupted, and the same rounds. Mid-epoch, the loader must be resumable
    (tests/lightning_worker.Resumable): Lightning starts a plain DataLoader's epoch over. (Which
    checkpoint last.ckpt is differs between Lightning versions: at step 20 with 2.5, 13 with 2.6.)"""
    full = worker("full_then_killed", tmp_path, config, env={"CKPT_EVERY_STEPS": str(every)})
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [checkpoint, "last.ckpt"]
    resumed = worker("resume", tmp_path, config, env={"RESUME_FROM": checkpoint})
    for f, r in zip(full, resumed, strict=True):
        f, r = f["full"], r["resumed"]
        assert r["t"] == 40
        assert all(torch.equal(a, b) for a, b in zip(f["state"], r["state"], strict=True))
        for run in (f, r):
            assert {level: s["rounds"] for level, s in run["stats"].items()} == ROUNDS[config]


@needs_lightning
@pytest.mark.parametrize(
    "config,mutation", [("post_local", "rank0_state"), ("diloco", "inner_optimizer_only")]
)
def test_resuming_with_less_state_would_differ(tmp_path: Path, config: str, mutation: str) -> None:
    """Why every rank's whole state is in the checkpoint: restoring rank 0's on both ranks (what a
    checkpoint of rank 0 alone gives), or each rank's model and inner optimizer without the engine
    (step counter, DiLoCo's anchor and outer momentum), does not continue the run."""
    full = worker("full_then_killed", tmp_path, config)
    resumed = worker("resume", tmp_path, config, mutation, env={"RESUME_FROM": "epoch=1-step=20.ckpt"})
    for f, r in zip(full, resumed, strict=True):
        assert max_diff(f["full"]["state"], r["resumed"]["state"]) > 1e-2


@needs_lightning
def test_refused_settings_are_clear_errors() -> None:
    from localsgd import Schedule
    from localsgd.integrations.lightning import LocalSGDStrategy

    with pytest.raises(ValueError, match="model_averaging_period"):
        LocalSGDStrategy(Schedule.local(4), model_averaging_period=4)
    with pytest.raises(TypeError, match=r"localsgd\.Schedule"):
        LocalSGDStrategy(4)  # type: ignore[arg-type]
    strategy = LocalSGDStrategy(Schedule.local(4), max_grad_norm=1.0, find_unused_parameters=True)
    assert strategy.policy.max_grad_norm == 1.0
    buffers = {k: v for k, v in strategy._ddp_kwargs.items() if k != "find_unused_parameters"}
    assert buffers in ({"forward_sync_buffers": False}, {"broadcast_buffers": False})  # per-rank BatchNorm


@needs_lightning
def test_checkpoints_of_another_strategy_or_world_size_are_refused() -> None:
    from localsgd import Schedule
    from localsgd.integrations.lightning import LocalSGDStrategy

    strategy = LocalSGDStrategy(Schedule.local(4))  # no cluster environment: a world of 1
    strategy.optimizers = [torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)]
    with pytest.raises(ValueError, match="not written by LocalSGDStrategy"):
        strategy.load_optimizer_state_dict({"optimizer_states": [{"state": {}, "param_groups": []}]})
    with pytest.raises(ValueError, match="written by 2 workers, but this run has 1"):
        strategy.load_optimizer_state_dict({"optimizer_states": [{"localsgd_workers": [{}, {}]}]})
    with pytest.raises(ValueError, match="holds 2 optimizer states, this run has 1"):
        strategy.load_optimizer_state_dict({"optimizer_states": [{}, {}]})


@needs_lightning
def test_gradient_clip_val_is_refused_for_max_grad_norm(tmp_path: Path) -> None:
    """Trainer(gradient_clip_val=...) clips inside Lightning's closure, before localsgd's own
    gradient averages; the error names the strategy's max_grad_norm instead."""
    for r in worker("refuse", tmp_path, "post_local", "gradient_clip_val"):
        assert r["error"].startswith("LocalSGDStrategy: Trainer(gradient_clip_val=...)")
        assert "max_grad_norm" in r["error"]


@needs_lightning
def test_16_bit_mixed_precision_is_refused() -> None:
    """Its GradScaler may skip a step on one rank only (on a CPU Lightning turns '16-mixed' into
    bf16, so the refusal is checked on the strategy directly)."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    from localsgd import Schedule
    from localsgd.integrations.lightning import LocalSGDStrategy

    strategy = LocalSGDStrategy(Schedule.local(4), precision_plugin=MixedPrecision("16-mixed", "cpu"))
    with pytest.raises(ValueError, match="16-mixed"):
        strategy.setup(SimpleNamespace(gradient_clip_val=None))  # type: ignore[arg-type]


@needs_lightning
def test_example_runs_in_one_command() -> None:
    """examples/lightning_post_local.py under Lightning's own launcher (2 CPU processes, gloo):
    640 steps, 200 mini-batch rounds, 27 averages after t' and the final average_now()."""
    example = HERE.parent / "examples" / "lightning_post_local.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent)}
    run = subprocess.run([sys.executable, str(example)], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    line = next(s for s in run.stdout.splitlines() if s.startswith("after "))
    assert line.startswith("after 640 steps: training accuracy ")
    assert "rounds=228," in line
    assert float(line.split("accuracy ")[1].split("%")[0]) > 85
