"""Hugging Face Accelerate (localsgd.integrations.accelerate): 2 gloo processes under torchrun.

Each multi-process test starts tests/accelerate_worker.py (2 ranks, ``Accelerator(cpu=True)``, 40
optimizer steps of a small MLP with BatchNorm, each rank the batches Accelerate's prepared
DataLoader gives it) and takes a few seconds on 2 busy cores.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tests.helpers import HERE, launch, max_diff, same

needs_accelerate = pytest.mark.skipif(
    importlib.util.find_spec("accelerate") is None,
    reason="Hugging Face Accelerate is not installed (pip install 'localsgd[hf]')",
)

# Optimizer steps (1-based) in which anything was communicated, the collectives called from
# Python, and the global rounds. post_local (t' = 6, H = 4, 40 steps): DDP's all-reduce in steps
# 1-6, parameter averages after steps 10, 14, ..., 38 (8). post_local_accum (accelerator.accumulate
# over 2 batches: 20 optimizer steps, t' = 3, H = 2): DDP's all-reduce in steps 1-3 (once per step,
# in its second backward), averages after 5, 7, ..., 19 (8). diloco (H = 6): outer steps after 6,
# 12, ..., 36, nothing else. diloco_overlap_int8: the same rounds, each an int8 all-to-all started
# after step 6k and its all-gather when it is applied, τ = 2 steps later.
SCHEDULED = {
    "post_local": [*range(1, 7), *range(10, 41, 4)],
    "post_local_accum": [1, 2, 3, *range(5, 21, 2)],
    "diloco": list(range(6, 41, 6)),
    "diloco_overlap_int8": sorted([*range(6, 41, 6), *range(8, 41, 6)]),
}
GRADIENT_STEPS = {"post_local": 6, "post_local_accum": 3, "diloco": 0, "diloco_overlap_int8": 0}
CALLS = {
    "post_local": {"all_reduce": 8},
    "post_local_accum": {"all_reduce": 8},
    "diloco": {"all_reduce": 6},
    "diloco_overlap_int8": {"all_to_all_single": 6, "all_gather": 6},
}
ROUNDS = {"post_local": 14, "post_local_accum": 11, "diloco": 6, "diloco_overlap_int8": 6}
STEPS = {"post_local_accum": 20}  # 40 for the others
SAVE_AT = {
    "post_local": 13,
    "post_local_accum": 7,
    "diloco": 13,
    "diloco_overlap_int8": 13,
}  # as in the worker
CONFIGS = list(SCHEDULED)
MUTATIONS = {
    "post_local": ("no_average", "ddp_on", "unwrapped"),
    "post_local_accum": ("outside",),
    "diloco": ("no_average", "ddp_on", "unwrapped"),
}
RESUME_MUTATIONS = {c: ("rank0_state",) for c in ("post_local", "diloco", "diloco_overlap_int8")}


def worker(mode: str, out: Path, config: str, mutations: tuple[str, ...]) -> list[dict]:
    launch(2, [str(HERE / "accelerate_worker.py"), mode, str(out), config, ",".join(mutations)])
    return [torch.load(out / f"{mode}_rank{r}.pt", weights_only=True) for r in range(2)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, str], tuple[Path, list[dict]]]:
    """Two launches per config, shared by the tests: ``equal_then_killed`` (the Accelerate run,
    its mutations, the plain loop, then the run that saves and is killed) and ``resume``."""
    done: dict[tuple[str, str], tuple[Path, list[dict]]] = {}

    def get(mode: str, config: str) -> tuple[Path, list[dict]]:
        if (mode, config) not in done:
            if mode == "equal_then_killed":
                out = tmp_path_factory.mktemp(config)
                done[mode, config] = out, worker(mode, out, config, MUTATIONS.get(config, ()))
            else:
                out = get("equal_then_killed", config)[0]
                done[mode, config] = out, worker(mode, out, config, RESUME_MUTATIONS.get(config, ()))
        return done[mode, config]

    return get


def test_importing_localsgd_does_not_import_accelerate() -> None:
    code = "import sys, localsgd, localsgd.integrations; assert 'accelerate' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_missing_accelerate_is_one_clear_error() -> None:
    code = (
        "import sys; sys.modules['accelerate'] = None\n"  # as if it were not installed
        "try:\n    import localsgd.integrations.accelerate\n"
        "except ImportError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert "needs Hugging Face Accelerate" in out
    assert "pip install 'localsgd[hf]'" in out


@needs_accelerate
@pytest.mark.parametrize("config", CONFIGS)
def test_accelerate_equals_the_plain_loop(runs: Callable, config: str) -> None:
    """Same init, data order and schedule: the Accelerate loop (prepare, a prepared DataLoader,
    accelerator.accumulate and backward, opt.step() and zero_grad() every batch) ends bit for bit
    where LocalSGD around a plain DistributedDataParallel model ends, on both ranks, having
    communicated in exactly the scheduled steps: DDP's all-reduce in the mini-batch phase only, one
    all-reduce per parameter average (or an int8 all-to-all and all-gather), no collective of
    Accelerate's."""
    _, results = runs("equal_then_killed", config)
    for r in results:
        accelerate, plain = r["accelerate"], r["plain_ddp"]
        assert accelerate["t"] == plain["t"] == STEPS.get(config, 40)
        assert same(accelerate["state"], plain["state"])
        for run in (accelerate, plain):
            assert run["traffic"]["steps"] == SCHEDULED[config]
            assert run["traffic"]["ddp_syncs"] == GRADIENT_STEPS[config]
            assert run["traffic"]["calls"] == CALLS[config]
            assert {level: s["rounds"] for level, s in run["stats"].items()} == {"global": ROUNDS[config]}
        assert accelerate["stats"]["global"]["bytes"] == plain["stats"]["global"]["bytes"]
    r0, r1 = (r["accelerate"]["state"] for r in results)
    assert max_diff(r0, r1) > 1e-4  # the last steps were local: the ranks differ, as they should


@needs_accelerate
@pytest.mark.parametrize("config,mutation", [(c, m) for c, ms in MUTATIONS.items() for m in ms])
def test_a_broken_engine_is_caught(runs: Callable, config: str, mutation: str) -> None:
    """The equality above notices averaging left out, DDP's all-reduce left on in local steps,
    LocalSGD given the module inside DDP (it cannot switch DDP's all-reduce off then), and, with
    gradient accumulation, LocalSGD wrapped around Accelerate's optimizer rather than inside it
    (every batch would count as a step)."""
    for r in runs("equal_then_killed", config)[1]:
        assert max_diff(r["mutated"][mutation]["state"], r["plain_ddp"]["state"]) > 1e-2


@needs_accelerate
@pytest.mark.parametrize("config", CONFIGS)
def test_kill_and_resume_through_save_state_is_bitwise(runs: Callable, config: str) -> None:
    """accelerator.save_state after step SAVE_AT (mid-epoch and mid-period: the ranks differ), the
    job killed 3 steps later, then accelerator.load_state and skip_first_batches: the same final
    state on every rank as a run that was never interrupted, with the same rounds (with
    diloco_overlap_int8 the checkpoint holds an average in flight and error-feedback residuals;
    loading sends the average again). The model is in WorkerStates' file only, not in a model
    file of Accelerate's."""
    out, full = runs("equal_then_killed", config)
    files = sorted(p.name for p in (out / "checkpoint").iterdir())
    assert files == ["custom_checkpoint_0.pkl", "optimizer.bin", "random_states_0.pkl", "random_states_1.pkl"]
    for f, r in zip(full, runs("resume", config)[1], strict=True):
        f, r = f["accelerate"], r["resumed"]
        assert r["t"] == STEPS.get(config, 40)
        assert same(f["state"], r["state"])
        assert f["stats"]["global"]["rounds"] == r["stats"]["global"]["rounds"] == ROUNDS[config]
        assert r["traffic"]["steps"] == [s for s in SCHEDULED[config] if s > SAVE_AT[config]]


@needs_accelerate
@pytest.mark.parametrize("config", list(RESUME_MUTATIONS))
def test_resuming_every_rank_from_rank_0s_state_would_differ(runs: Callable, config: str) -> None:
    """Why every rank's state is saved: resuming every rank from the main process's model and
    LocalSGD state (what Accelerate's own files hold) does not continue the run."""
    for f, r in zip(runs("equal_then_killed", config)[1], runs("resume", config)[1], strict=True):
        assert max_diff(f["accelerate"]["state"], r["mutated"]["rank0_state"]["state"]) > 1e-2


@needs_accelerate
def test_refused_settings_are_clear_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    """One process (no torch.distributed): DistributedType.NO works as one worker; the settings
    that would break local SGD are refused before anything is wrapped."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    from localsgd import LocalSGD, Schedule
    from localsgd.integrations.accelerate import WorkerStates, prepare

    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(3, 2)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match=r"before accelerator\.prepare"):
        prepare(accelerator, model, accelerator.prepare(sgd), Schedule.local(4))
    monkeypatch.setattr(Accelerator, "distributed_type", property(lambda self: DistributedType.FSDP))
    with pytest.raises(ValueError, match="not FSDP"):
        prepare(accelerator, model, torch.optim.SGD(model.parameters(), lr=0.1), Schedule.local(4))
    monkeypatch.setattr(Accelerator, "distributed_type", property(lambda self: DistributedType.NO))
    monkeypatch.setattr(accelerator, "scaler", torch.amp.GradScaler("cpu"))
    with pytest.raises(ValueError, match="fp16"):
        prepare(accelerator, model, torch.optim.SGD(model.parameters(), lr=0.1), Schedule.local(4))
    monkeypatch.setattr(accelerator, "scaler", None)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"cpu=True"):
        prepare(accelerator, model, torch.optim.SGD(model.parameters(), lr=0.1), Schedule.local(4))
    monkeypatch.delenv("WORLD_SIZE")
    with monkeypatch.context() as m:  # DDP's buffer broadcast on (Accelerate's default), 2 processes
        m.setattr(Accelerator, "num_processes", property(lambda self: 2))
        with pytest.raises(ValueError, match=r"DistributedDataParallelKwargs\(broadcast_buffers=False\)"):
            prepare(accelerator, model, torch.optim.SGD(model.parameters(), lr=0.1), Schedule.local(4))
    model, opt = prepare(accelerator, model, torch.optim.SGD(model.parameters(), lr=0.1), Schedule.local(4))
    assert isinstance(opt.optimizer, LocalSGD) and opt.optimizer.comm.workers == 1
    states = WorkerStates(model, opt.optimizer)
    with pytest.raises(ValueError, match="written by 2 workers, but this run has 1"):
        states.load_state_dict({"workers": [{}, {}]})
    with pytest.raises(ValueError, match="no per-worker states"):
        states.load_state_dict({"state": {}})


@needs_accelerate
def test_example_runs_in_one_command() -> None:
    """examples/accelerate_post_local.py under torchrun (2 CPU processes, gloo)."""
    example = HERE.parent / "examples" / "accelerate_post_local.py"
    _, log = launch(2, [str(example)])
    line = next(s for s in log.splitlines() if s.startswith("after "))
    assert line.startswith("after 640 steps: training accuracy ")
    assert "rounds=228," in line
    assert float(line.split("accuracy ")[1].split("%")[0]) > 85
