"""One rank of a Lightning test, started by torchrun (see tests/test_lightning.py).

Usage: lightning_worker.py MODE OUT_DIR CONFIG [MUTATION]; each rank writes OUT_DIR/{MODE}_rank{r}.pt.

MODE ``equal``: a Lightning run (``LocalSGDStrategy``) and the same training in a plain loop with
``LocalSGD`` (with and without DistributedDataParallel). ``full_then_killed``: an uninterrupted
Lightning run, then one that checkpoints every epoch and is killed (``os._exit``) a few steps into
epoch 2. ``resume``: ``Trainer.fit(ckpt_path=...)`` from the killed run's checkpoint named by
``RESUME_FROM``.
MUTATION breaks the run on purpose (the test must notice): ``no_average`` leaves averaging out,
``ddp_on`` leaves DDP's all-reduce on in local steps, ``rank0_state`` resumes every rank from rank
0's state (what a checkpoint of rank 0 alone would give), ``inner_optimizer_only`` resumes each
rank's model and inner optimizer but not the engine (step counter, anchor, outer momentum).
"""

from __future__ import annotations

import os
import sys
import warnings
from contextlib import ExitStack, contextmanager, nullcontext
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, TensorDataset

from localsgd import LocalSGD, Schedule, diloco
from localsgd.integrations.lightning import LocalSGDStrategy
from tests.helpers import ENGINE_MUTATIONS, broken_engine, exit_worker, mlp, recording_collectives

EPOCHS = 4
BATCHES_PER_EPOCH = 10
BATCH = 8
KILL_AT = (2, 3)  # (epoch, batch): the killed run dies here, after the checkpoint of epoch 1

# name: (schedule, inner optimizer, policy keywords). Epoch ends (every 10 steps) fall mid-period.
CONFIGS: dict[str, tuple[Schedule, Any, dict[str, Any]]] = {
    "post_local": (
        Schedule.post_local(local_steps=4, switch_step=6),
        lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-4),
        {},
    ),
    # Trainer(accumulate_grad_batches=2): 20 optimizer steps, each of 2 batches
    "post_local_accum": (
        Schedule.post_local(local_steps=2, switch_step=3),
        lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-4),
        {},
    ),
    # the same with manual optimization (training_step calls zero_grad, manual_backward, step)
    "post_local_manual": (
        Schedule.post_local(local_steps=4, switch_step=6),
        lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-4),
        {},
    ),
    # 2 nodes x 2 processes (blocks: the nodes). H = 2, H_b = 2: block and global parameter
    # averages; H = 1, H_b = 4: a block gradient average every step, done by localsgd, not DDP
    "hierarchical": (
        Schedule.hierarchical(local_steps=2, block_steps=2, switch_step=3),
        lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-4),
        {},
    ),
    "hierarchical_h1": (
        Schedule.hierarchical(local_steps=1, block_steps=4, switch_step=2),
        lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-4),
        {},
    ),
    "diloco": (
        Schedule.local(6),
        lambda ps: torch.optim.AdamW(ps, lr=3e-3),
        {"outer_optimizer": diloco(lr=0.7, momentum=0.9)},
    ),
}

ACCUMULATE = {"post_local_accum": 2}


class Resumable(DataLoader):
    """A DataLoader that Lightning resumes mid-epoch: it has the ``state_dict``/``load_state_dict``
    Lightning looks for (as torchdata's ``StatefulDataLoader`` has), and skips the batches the
    checkpoint's run had taken. Lightning starts a plain DataLoader's epoch over at a mid-epoch
    checkpoint (it warns), so the resumed run would see other batches than the uninterrupted one."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.taken = self.skip = 0

    def __iter__(self) -> Any:
        batches = super().__iter__()
        for _ in range(self.skip):
            next(batches)
        self.taken, self.skip = self.skip, 0
        for batch in batches:
            self.taken += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"taken": self.taken}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.skip = state["taken"]


def shard(rank: int, world: int) -> DataLoader:
    """This rank's data: every world-th sample of one synthetic set, in order."""
    g = torch.Generator().manual_seed(7)
    n = world * BATCHES_PER_EPOCH * BATCH
    x = torch.randn(n, 6, generator=g)
    y = (x[:, 0] * x[:, 1] > 0).long() + (x[:, 2] > 1).long()
    return Resumable(TensorDataset(x[rank::world], y[rank::world]), batch_size=BATCH, shuffle=False)


class Net(pl.LightningModule):
    def __init__(self, config: str) -> None:
        super().__init__()
        self.net = mlp(seed=1)  # with BatchNorm: each rank keeps its own statistics
        self.make_optimizer = CONFIGS[config][1]
        self.automatic_optimization = not config.endswith("_manual")

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        if not self.automatic_optimization:
            opt = self.optimizers()
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.make_optimizer(self.parameters())


class Kill(pl.Callback):
    def on_train_batch_start(self, trainer: pl.Trainer, module: Any, batch: Any, batch_idx: int) -> None:
        if (trainer.current_epoch, batch_idx) == KILL_AT:
            sys.stdout.flush()
            os._exit(0)  # no teardown, no final checkpoint: as if the job were killed


@contextmanager
def mutation(name: str | None):
    """``no_average``, ``ddp_on`` (tests.helpers.broken_engine), or a resume with less state."""
    saved = LocalSGDStrategy.load_optimizer_state_dict
    if name in (None, *ENGINE_MUTATIONS):
        pass
    elif name == "rank0_state":
        load = LocalSGDStrategy.load_optimizer_state_dict

        def rank0(self: LocalSGDStrategy, checkpoint: Any) -> None:
            states = [{key: [w[0]] * len(w) for key, w in s.items()} for s in checkpoint["optimizer_states"]]
            load(self, {**checkpoint, "optimizer_states": states})

        LocalSGDStrategy.load_optimizer_state_dict = rank0  # type: ignore[method-assign]
    elif name == "inner_optimizer_only":  # what checkpointing only the wrapped optimizer would give
        load = LocalSGDStrategy.load_optimizer_state_dict

        def inner_only(self: LocalSGDStrategy, checkpoint: Any) -> None:
            for optimizer, state in zip(self.optimizers, checkpoint["optimizer_states"], strict=True):
                mine = state["localsgd_workers"][self.global_rank]
                self.lightning_module.load_state_dict(mine["model"])
                optimizer.optimizer.load_state_dict(mine["optimizer"]["optimizer"])

        LocalSGDStrategy.load_optimizer_state_dict = inner_only  # type: ignore[method-assign]
    elif name is not None:
        raise ValueError(f"unknown mutation {name!r}")
    try:
        with broken_engine(name):
            yield
    finally:
        LocalSGDStrategy.load_optimizer_state_dict = saved  # type: ignore[method-assign]


def state(module: torch.nn.Module) -> list[torch.Tensor]:
    return [t.detach().clone() for t in (*module.parameters(), *module.buffers())]


class Communication(pl.Callback):
    """Records, by localsgd's step counter, every collective Python issues outside localsgd's own
    step while training, and every forward after which DDP all-reduces the gradients (DDP reads
    ``require_backward_grad_sync`` when its forward starts)."""

    def __init__(self, strategy: LocalSGDStrategy) -> None:
        self.strategy, self.outside, self.ddp_synced = strategy, [], []
        self.recording = ExitStack()

    def on_train_start(self, trainer: pl.Trainer, module: Any) -> None:
        self.recording.enter_context(recording_collectives(self.record, outside_step=True))
        trainer.strategy.model.register_forward_pre_hook(self.forward)

    def record(self, name: str) -> None:
        self.outside.append((self.strategy.engine.t, name))

    def forward(self, ddp: DistributedDataParallel, args: Any) -> None:
        if ddp.require_backward_grad_sync:
            self.ddp_synced.append(self.strategy.engine.t)

    def on_train_end(self, trainer: pl.Trainer, module: Any) -> None:
        self.recording.close()


def lightning_run(
    config: str, epochs: int, callbacks: list, ckpt_path: str | None = None, **trainer_kwargs: Any
) -> dict:
    schedule, _, policy = CONFIGS[config]
    strategy = LocalSGDStrategy(schedule, **policy)
    communication = Communication(strategy)
    callbacks = [*callbacks, communication]
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=int(os.environ["LOCAL_WORLD_SIZE"]),
        num_nodes=int(os.environ["WORLD_SIZE"]) // int(os.environ["LOCAL_WORLD_SIZE"]),
        strategy=strategy,
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,  # each rank's shard is made explicitly, as in the plain loop
        num_sanity_val_steps=0,
        accumulate_grad_batches=ACCUMULATE.get(config, 1),
        **trainer_kwargs,
    )
    module = Net(config)
    trainer.fit(module, shard(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])), ckpt_path=ckpt_path)
    engine = strategy.engine
    return {
        "state": state(module.net),
        "t": engine.t,
        "stats": {k: vars(v) for k, v in engine.stats.items()},
        "outside": communication.outside,
        "ddp_synced": communication.ddp_synced,
    }


def plain_loop(config: str, ddp: bool) -> dict:
    """The README's own loop: LocalSGD around the same optimizer, same data, same schedule."""
    schedule, make_optimizer, policy = CONFIGS[config]
    model = mlp(seed=1)
    wrapped = DistributedDataParallel(model, forward_sync_buffers=False) if ddp else model
    opt = LocalSGD(make_optimizer(model.parameters()), wrapped, schedule, **policy)
    loader = shard(dist.get_rank(), dist.get_world_size())
    accumulate = ACCUMULATE.get(config, 1)
    for _ in range(EPOCHS):
        for i, (x, y) in enumerate(loader):
            if i % accumulate == 0:
                opt.zero_grad()
            last = i % accumulate == accumulate - 1
            with nullcontext() if last or not ddp else wrapped.no_sync():  # DDP: all-reduce once
                (F.cross_entropy(wrapped(x), y) / accumulate).backward()
            if last:
                opt.step()
    return {"state": state(model), "t": opt.t, "stats": {k: vars(v) for k, v in opt.stats.items()}}


def main() -> None:
    mode, out, config = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    mutate = sys.argv[4] if len(sys.argv) > 4 else None
    warnings.filterwarnings("ignore")  # Lightning's advice (num_workers, ...) is noise here
    rank = int(os.environ["RANK"])
    result: dict[str, Any] = {}
    if mode == "equal":
        with mutation(mutate):
            result["lightning"] = lightning_run(config, EPOCHS, [])
        result["plain_ddp"] = plain_loop(config, ddp=True)
        result["plain"] = plain_loop(config, ddp=False)
    elif mode == "full_then_killed":
        result["full"] = lightning_run(config, EPOCHS, [])
        torch.save(result, out / f"{mode}_rank{rank}.pt")
        every = int(os.environ.get("CKPT_EVERY_STEPS", "0")) or None  # default: at epoch ends
        checkpoints = ModelCheckpoint(dirpath=out / "checkpoints", save_last=True, every_n_train_steps=every)
        lightning_run(config, EPOCHS, [checkpoints, Kill()])
        raise AssertionError("the killed run was not killed")
    elif mode == "resume":
        with mutation(mutate):
            result["resumed"] = lightning_run(
                config, EPOCHS, [], ckpt_path=str(out / "checkpoints" / os.environ["RESUME_FROM"])
            )
    elif mode == "refuse":  # MUTATION names the Trainer setting that must be refused
        try:
            lightning_run(config, EPOCHS, [], **{mutate: 1.0})
        except ValueError as e:
            result["error"] = str(e)
    else:
        raise ValueError(f"unknown mode {mode!r}")
    torch.save(result, out / f"{mode}_rank{rank}.pt")


if __name__ == "__main__":
    main()
    exit_worker()
