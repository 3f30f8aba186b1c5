"""Hugging Face Trainer (localsgd.integrations.transformers): 2 gloo processes under torchrun, no
mocks, a 2-layer GPT-2 built from its config class (no download).

Each multi-process test starts tests/transformers_worker.py (2 ranks, 2 epochs of 20 optimizer
steps, each rank its share of the batches, as Accelerate deals them) and takes about 10-20
seconds on 2 busy cores; torchrun's processes are what `torchrun train.py` gives a Trainer user.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.helpers import HERE, launch, max_diff, same

needs_hf = pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None or importlib.util.find_spec("accelerate") is None,
    reason="transformers or accelerate is not installed (pip install 'localsgd[hf]')",
)

# Global rounds in 40 optimizer steps. post_local (t' = 6, H = 4): 6 gradient averages (DDP's
# all-reduce) and parameter averages after steps 10, 14, ..., 38 (8). diloco (H = 6): outer steps
# after 6, 12, ..., 36. post_local_accum (gradient_accumulation_steps=2: 20 steps of 2 batches,
# t' = 3, H = 2): 3 gradient averages and parameter averages after steps 5, 7, ..., 19 (8).
# On 2 nodes x 2 processes (blocks: the nodes), t' = 2, H = 1, H_b = 4: 2 global gradient averages,
# then a block gradient average in each of the other 38 steps and 9 global parameter averages.
ROUNDS = {
    "post_local": {"global": 14},
    "diloco": {"global": 6},
    "post_local_accum": {"global": 11},
    "hierarchical_h1": {"global": 11, "block": 38},
}
STEPS = {"post_local_accum": 20}  # 40 for the others
SWITCH = {"post_local": 6, "post_local_accum": 3, "hierarchical_h1": 2, "diloco": 0}  # t''
NODES = {"hierarchical_h1": 2}  # 1 for the others


def worker(mode: str, out: Path, config: str, *mutation: str) -> list[dict]:
    nodes = NODES.get(config, 1)
    launch(2, [str(HERE / "transformers_worker.py"), mode, str(out), config, *mutation], nodes=nodes)
    return [torch.load(out / f"{mode}_rank{r}.pt", weights_only=True) for r in range(2 * nodes)]


def test_importing_localsgd_does_not_import_transformers() -> None:
    code = "import sys, localsgd, localsgd.integrations; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("package", ["transformers", "accelerate"])
def test_missing_transformers_is_one_clear_error(package: str) -> None:
    code = (
        f"import sys; sys.modules[{package!r}] = None\n"  # as if it were not installed
        "try:\n    import localsgd.integrations.transformers\n"
        "except ImportError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert "pip install 'localsgd[hf]'" in out


@needs_hf
@pytest.mark.parametrize("config", ["post_local", "diloco", "post_local_accum", "hierarchical_h1"])
def test_trainer_equals_the_plain_loop(tmp_path: Path, config: str) -> None:
    """Same init, batches and schedule: LocalSGDTrainer.train() ends bit for bit where the README's
    own loop with a DistributedDataParallel model ends (post-local with max_grad_norm=0.5, which
    localsgd applies inside its step, in the hierarchical run after its own block gradient
    averages on 2 nodes x 2 processes; DiLoCo; 2 micro-batches per step), with the rounds the
    schedule names; the Trainer fed the batches the loop uses. The only collective outside
    localsgd's step is the Trainer's own after the last step (its FLOP count), none in a step, and
    DDP's all-reduce runs once in each step before t' (on the last micro-batch), in no other."""
    steps = STEPS.get(config, 40)
    results = worker("equal", tmp_path, config)
    for r in results:
        trainer, plain = r["trainer"], r["plain"]
        assert trainer["ddp"] == "DistributedDataParallel"
        assert torch.equal(trainer["fed"], plain["fed"])
        assert trainer["t"] == plain["t"] == steps
        assert same(trainer["state"], plain["state"])
        for run in (trainer, plain):
            assert {level: s["rounds"] for level, s in run["stats"].items()} == ROUNDS[config]
        assert [t for t, _ in trainer["outside"]] == [steps]
        assert trainer["ddp_synced"] == list(range(SWITCH[config]))  # once in each step before t'
    assert (
        max_diff(results[0]["trainer"]["state"], results[-1]["trainer"]["state"]) > 1e-4
    )  # local at the end


@needs_hf
@pytest.mark.parametrize("mutation", ["no_average", "ddp_on"])
def test_a_broken_engine_is_caught(tmp_path: Path, mutation: str) -> None:
    """The equality above notices averaging left out and DDP's all-reduce left on in local steps."""
    for r in worker("equal", tmp_path, "post_local", mutation):
        assert max_diff(r["trainer"]["state"], r["plain"]["state"]) > 1e-2


@needs_hf
def test_token_counts_are_not_gathered_in_every_step(tmp_path: Path) -> None:
    """With the Trainer's average_tokens_across_devices left on, every step (local ones too) would
    gather the workers' token counts: the count of collectives notices it (the parameters do not:
    every worker has as many tokens, and the scaling by 2 is exact)."""
    for r in worker("equal", tmp_path, "post_local", "tokens"):
        assert [t for t, _ in r["trainer"]["outside"]] == [*range(40), 40]


@needs_hf
@pytest.mark.parametrize("config", ["post_local", "diloco"])
def test_kill_and_resume_from_the_trainers_checkpoint_is_bitwise(tmp_path: Path, config: str) -> None:
    """A checkpoint every 13 steps (mid-period, mid-epoch: the ranks differ), the job killed at
    step 16, then train(resume_from_checkpoint=checkpoint-13): the same final parameters on every
    rank as a run that was never interrupted (the learning rate decaying as before), and the same
    rounds. The Trainer's model file holds every parameter of rank 0's model (GPT-2's output
    layer shares the embedding's weight: 28 tensors). Each rank wrote its own state
    beside the Trainer's files. Resuming every rank from rank 0's state instead (what the
    Trainer's own rank-0 files give) does not continue the run."""
    from safetensors.torch import load_file

    full = worker("full_then_killed", tmp_path, config)
    checkpoint = tmp_path / "trainer" / "checkpoint-13"
    assert {"localsgd_worker_0.pt", "localsgd_worker_1.pt", "optimizer.pt"} <= {
        p.name for p in checkpoint.iterdir()
    }
    model_file = load_file(checkpoint / "model.safetensors")  # the Trainer's: rank 0's worker
    rank0 = torch.load(checkpoint / "localsgd_worker_0.pt", weights_only=True)["model"]
    assert len(model_file) == 28 and all(torch.equal(model_file[k], rank0[k]) for k in model_file)
    resumed = worker("resume", tmp_path, config)
    for f, r in zip(full, resumed, strict=True):
        f, r = f["full"], r["resumed"]
        assert r["t"] == 40 and len(r["fed"]) == 40 - 13
        assert same(f["state"], r["state"])
        for run in (f, r):
            assert {level: s["rounds"] for level, s in run["stats"].items()} == ROUNDS[config]
    if config == "diloco":
        for f, r in zip(full, worker("resume", tmp_path, config, "rank0_state"), strict=True):
            assert max_diff(f["full"]["state"], r["resumed"]["state"]) > 1e-2


def one_process_trainer(out: Path, **kwargs: Any) -> Any:  # transformers is imported lazily
    """A LocalSGDTrainer of a single worker (no torchrun: K = 1, no DDP)."""
    from transformers import TrainingArguments

    from localsgd import Schedule
    from localsgd.integrations.transformers import LocalSGDTrainer
    from tests.transformers_worker import Sequences, gpt2

    model = gpt2()
    defaults = {"per_device_train_batch_size": 4, "max_steps": 6, "report_to": "none", "use_cpu": True,
                "save_strategy": "steps", "save_steps": 3, "disable_tqdm": True}  # fmt: skip
    args = TrainingArguments(output_dir=str(out), **defaults)
    kwargs = {"schedule": Schedule.local(2), **kwargs}
    return LocalSGDTrainer(model=model, args=args, train_dataset=Sequences(24), **kwargs)


@needs_hf
def test_refused_settings_and_checkpoints_are_clear_errors(tmp_path: Path) -> None:
    from localsgd.integrations.transformers import worker_file

    with pytest.raises(TypeError, match=r"localsgd\.Schedule"):
        one_process_trainer(tmp_path, schedule=4)
    with pytest.raises(ValueError, match=r"TrainingArguments\(max_grad_norm=0.5\)"):
        one_process_trainer(tmp_path, max_grad_norm=0.5)
    trainer = one_process_trainer(tmp_path)
    assert trainer.policy.max_grad_norm == 1.0  # the Trainer's default, applied by localsgd
    assert not trainer.args.average_tokens_across_devices
    trainer.train()
    assert trainer.localsgd.t == 6 and trainer.localsgd.stats["global"].rounds == 0  # K = 1: nothing to send
    checkpoint = tmp_path / "checkpoint-3"
    state = torch.load(worker_file(checkpoint, 0), weights_only=True)
    state["workers"] = 2
    torch.save(state, worker_file(checkpoint, 0))
    with pytest.raises(ValueError, match="written by 2 workers, but this run has 1"):
        one_process_trainer(tmp_path).train(resume_from_checkpoint=str(checkpoint))
    os.remove(worker_file(checkpoint, 0))
    with pytest.raises(FileNotFoundError, match=r"localsgd_worker_0\.pt is missing"):
        one_process_trainer(tmp_path).train(resume_from_checkpoint=str(checkpoint))


@needs_hf
def test_fp16_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """fp16's GradScaler may skip a step on one rank only (TrainingArguments refuses fp16 on a CPU,
    so the check is run on a Trainer whose arguments say fp16)."""
    from localsgd.integrations.transformers import LocalSGDTrainer

    trainer = one_process_trainer(tmp_path)
    monkeypatch.setattr(trainer.args, "fp16", True)
    with pytest.raises(ValueError, match="fp16"):
        LocalSGDTrainer._check_supported(trainer)


@needs_hf
def test_example_runs_in_one_command() -> None:
    """examples/transformers_post_local.py under torchrun (2 CPU processes, gloo)."""
    example = HERE.parent / "examples" / "transformers_post_local.py"
    env = {"OMP_NUM_THREADS": "1"}
    _, log = launch(2, [str(example)], env=env)
    line = next(s for s in log.splitlines() if "after " in s and "steps:" in s)
    assert "after 300 steps:" in line and "rounds=" in line, log
    first, last = (float(v) for v in line.split("loss ")[1].split(" ")[0].split("->"))
    assert last < first / 2, line
