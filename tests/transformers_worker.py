"""One rank of a Hugging Face Trainer test, started by torchrun (see tests/test_transformers.py).

Usage: transformers_worker.py MODE OUT_DIR CONFIG [MUTATION]; each rank writes OUT_DIR/{MODE}_rank{r}.pt.

MODE ``equal``: a ``LocalSGDTrainer`` run (a 2-layer GPT-2 built from its config, 2 epochs) and
the same training in a plain loop with ``LocalSGD`` around a ``DistributedDataParallel`` model;
the run also records the batches the Trainer fed and every collective issued outside localsgd's
step. ``full_then_killed``: an uninterrupted run, then one that saves a checkpoint every 13 steps
and is killed (``os._exit``) at step 16. ``resume``: ``trainer.train(resume_from_checkpoint=...)``
from the killed run's checkpoint-13. MUTATION breaks the run on purpose (the test must notice):
``no_average`` leaves averaging out, ``ddp_on`` leaves DDP's all-reduce on in local steps,
``tokens`` leaves ``average_tokens_across_devices`` on, ``rank0_state`` resumes every rank from
rank 0's localsgd state (what the Trainer's own rank-0 checkpoint would give).
"""

from __future__ import annotations

import os
import sys
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset, SequentialSampler
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    TrainerCallback,
    TrainingArguments,
    get_linear_schedule_with_warmup,
)
from transformers.utils import logging as hf_logging

from localsgd import LocalSGD, Schedule, diloco
from localsgd.integrations import transformers as integration
from localsgd.integrations.transformers import LocalSGDTrainer
from tests.helpers import ENGINE_MUTATIONS, broken_engine, exit_worker, recording_collectives

EPOCHS = 2
BATCH = 4  # per device
SEQ = 16
VOCAB = 64
SAVE_EVERY, KILL_AT = 13, 16  # mid-period, and within epoch 1 (of 0, 1) for accumulation 1

# name: (schedule, inner optimizer, policy keywords, gradient accumulation steps, max_grad_norm)
CONFIGS: dict[str, tuple[Schedule, Any, dict[str, Any], int, float]] = {
    "post_local": (
        Schedule.post_local(local_steps=4, switch_step=6),
        lambda ps: torch.optim.SGD(ps, lr=0.2, momentum=0.9, nesterov=True, weight_decay=1e-4),
        {},
        1,
        0.5,
    ),
    "post_local_accum": (
        Schedule.post_local(local_steps=2, switch_step=3),
        lambda ps: torch.optim.SGD(ps, lr=0.2, momentum=0.9, nesterov=True, weight_decay=1e-4),
        {},
        2,
        0.5,
    ),
    # 2 nodes x 2 processes (blocks: the nodes): a block gradient average in every local step,
    # done by localsgd, not DDP; the clipping must come after it
    "hierarchical_h1": (
        Schedule.hierarchical(local_steps=1, block_steps=4, switch_step=2),
        lambda ps: torch.optim.SGD(ps, lr=0.2, momentum=0.9, nesterov=True, weight_decay=1e-4),
        {},
        1,
        0.5,
    ),
    "diloco": (
        Schedule.local(6),
        lambda ps: torch.optim.AdamW(ps, lr=3e-3),
        {"outer_optimizer": diloco(lr=0.7, momentum=0.9)},
        1,
        0.0,
    ),
}


class Sequences(Dataset):
    """Counting sequences mod VOCAB with a random start and stride: learnable, no download."""

    def __init__(self, n: int) -> None:
        g = torch.Generator().manual_seed(7)
        start = torch.randint(0, VOCAB, (n, 1), generator=g)
        stride = torch.randint(1, 5, (n, 1), generator=g)
        self.ids = (start + stride * torch.arange(SEQ)) % VOCAB

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def dataset() -> Sequences:
    return Sequences(int(os.environ["WORLD_SIZE"]) * 20 * BATCH)  # 20 batches per rank per epoch


def gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(1)
    config = GPT2Config(
        vocab_size=VOCAB, n_positions=SEQ, n_embd=32, n_layer=2, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    model = GPT2LMHeadModel(config)
    # GPT2LMHeadModel's class name names no loss type, so the Trainer would count every label
    # (not the SEQ - 1 shifted ones) when it normalises the loss; name it
    model.loss_type = "ForCausalLM"
    return model


class Recording(LocalSGDTrainer):
    """Sequential sampling (the plain loop's order, checked against the batches recorded here);
    records the batches and in which steps DDP all-reduced the gradients."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fed: list[torch.Tensor] = []
        self.synced: list[tuple[int, bool]] = []

    def _get_train_sampler(self, train_dataset: Any = None) -> SequentialSampler:
        return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)

    def compute_loss(self, model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        self.fed.append(inputs["input_ids"].detach().clone())
        # whether DDP all-reduces this micro-batch's gradients (it reads the flag in forward)
        self.synced.append((self.localsgd.t, bool(model.require_backward_grad_sync)))
        return super().compute_loss(model, inputs, *args, **kwargs)


class Kill(TrainerCallback):
    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == KILL_AT:
            sys.stdout.flush()
            os._exit(0)  # no teardown: as if the job were killed


@contextmanager
def mutation(name: str | None):
    """``no_average``, ``ddp_on`` (tests.helpers.broken_engine); ``rank0_state`` loads rank 0's
    localsgd state on every rank; ``tokens`` is applied in ``trainer_run``."""
    worker_file = integration.worker_file
    if name == "rank0_state":
        integration.worker_file = lambda checkpoint, rank: worker_file(checkpoint, 0)  # type: ignore[assignment]
    elif name not in (None, "tokens", *ENGINE_MUTATIONS):
        raise ValueError(f"unknown mutation {name!r}")
    try:
        with broken_engine(name):
            yield
    finally:
        integration.worker_file = worker_file  # type: ignore[assignment]


def state(model: torch.nn.Module) -> list[torch.Tensor]:
    return [t.detach().clone() for t in model.parameters()]


def trainer_run(
    config: str, out: Path, callbacks: list, resume: str | None = None, mutate: str | None = None
) -> dict:
    schedule, make_optimizer, policy, accumulate, norm = CONFIGS[config]
    model = gpt2()
    every = SAVE_EVERY if callbacks else None
    args = TrainingArguments(
        output_dir=str(out / "trainer"),
        per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=accumulate,
        num_train_epochs=EPOCHS,
        max_grad_norm=norm,
        lr_scheduler_type="linear",  # to 0 at the last step: resumed, it must reach the optimizer
        save_strategy="steps" if every else "no",
        save_steps=every or 500,
        logging_steps=1000,
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        dataloader_num_workers=0,
    )
    trainer = Recording(
        model=model,
        args=args,
        train_dataset=dataset(),
        optimizers=(make_optimizer(model.parameters()), None),
        callbacks=callbacks,
        schedule=schedule,
        **policy,
    )
    if mutate == "tokens":
        trainer.args.average_tokens_across_devices = True
    calls: list[tuple[int, str]] = []  # (localsgd's step counter, collective) outside its step

    def record(name: str) -> None:
        engine = getattr(trainer.optimizer, "optimizer", None)
        if isinstance(engine, LocalSGD):  # once the Trainer has set up its LocalSGD
            calls.append((engine.t, name))

    with recording_collectives(record, outside_step=True):
        trainer.train(resume_from_checkpoint=resume)
    engine = trainer.localsgd
    return {
        "state": state(model),
        "t": engine.t,
        "stats": {k: vars(v) for k, v in engine.stats.items()},
        "fed": torch.stack(trainer.fed),
        "outside": calls,
        "ddp_synced": [t for t, on in trainer.synced if on],
        "ddp": type(trainer.model_wrapped).__name__,
    }


def plain_loop(config: str) -> dict:
    """The README's own loop: LocalSGD around the same optimizer, same data, same schedule, the
    Trainer's default learning-rate decay; the loss as the Trainer's (summed over the step's
    tokens, divided by their number)."""
    schedule, make_optimizer, policy, accumulate, norm = CONFIGS[config]
    model = gpt2()
    wrapped = DistributedDataParallel(model, broadcast_buffers=False, find_unused_parameters=True)
    clip = {"max_grad_norm": norm} if norm > 0 else {}
    opt = LocalSGD(make_optimizer(model.parameters()), wrapped, schedule, **policy, **clip)
    ids = dataset().ids
    rank, world = dist.get_rank(), dist.get_world_size()
    batches = [ids[i * BATCH : (i + 1) * BATCH] for i in range(len(ids) // BATCH)][rank::world]
    learning_rate = get_linear_schedule_with_warmup(opt, 0, EPOCHS * len(batches) // accumulate)
    fed = []
    for _ in range(EPOCHS):
        for first in range(0, len(batches), accumulate):
            step = batches[first : first + accumulate]
            tokens = sum(b[:, 1:].ne(-100).sum() for b in step)  # a tensor, as the Trainer counts
            for i, b in enumerate(step):
                fed.append(b)
                with nullcontext() if i == len(step) - 1 else wrapped.no_sync():
                    wrapped(input_ids=b, labels=b, num_items_in_batch=tokens).loss.backward()
            opt.step()
            learning_rate.step()
            opt.zero_grad()
    return {"state": state(model), "t": opt.t, "stats": {k: vars(v) for k, v in opt.stats.items()},
            "fed": torch.stack(fed)}  # fmt: skip


def main() -> None:
    mode, out, config = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    mutate = sys.argv[4] if len(sys.argv) > 4 else None
    warnings.filterwarnings("ignore")
    hf_logging.set_verbosity_error()
    rank = int(os.environ["RANK"])
    result: dict[str, Any] = {}
    if mode == "equal":
        with mutation(mutate):
            result["trainer"] = trainer_run(config, out, [], mutate=mutate)
        result["plain"] = plain_loop(config)
    elif mode == "full_then_killed":
        result["full"] = trainer_run(config, out / "full", [])
        torch.save(result, out / f"{mode}_rank{rank}.pt")
        trainer_run(config, out, [Kill()])
        raise AssertionError("the killed run was not killed")
    elif mode == "resume":
        with mutation(mutate):
            checkpoint = out / "trainer" / f"checkpoint-{SAVE_EVERY}"
            result["resumed"] = trainer_run(config, out, [], resume=str(checkpoint))
    else:
        raise ValueError(f"unknown mode {mode!r}")
    torch.save(result, out / f"{mode}_rank{rank}.pt")


if __name__ == "__main__":
    main()
    exit_worker()
