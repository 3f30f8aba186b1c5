"""One rank of an Accelerate test, started by torchrun (see tests/test_accelerate.py).

Usage: accelerate_worker.py MODE OUT_DIR CONFIG [MUTATION,...]; each rank writes
OUT_DIR/{MODE}_rank{r}.pt.

MODE ``equal_then_killed``: an Accelerate loop (``localsgd.integrations.accelerate.prepare``, a
prepared DataLoader, ``accelerator.accumulate``/``backward``), the same loop once per MUTATION, and
the same training in a plain loop with ``LocalSGD`` around a plain ``DistributedDataParallel``
model; then an Accelerate run that calls ``accelerator.save_state`` after step SAVE_AT and is
killed (``os._exit``) 3 steps later. ``resume``: ``accelerator.load_state`` from that checkpoint,
``skip_first_batches`` to where it was taken, and on to the end (again once per MUTATION).
MUTATION breaks the run on purpose (the test must notice): ``no_average`` leaves averaging out,
``ddp_on`` leaves DDP's all-reduce on in local steps, ``unwrapped`` gives ``LocalSGD`` the module
inside DDP (so it cannot switch DDP's all-reduce off), ``outside`` wraps Accelerate's optimizer in
``LocalSGD`` instead of the other way round (so it counts every batch as a step), ``rank0_state`` resumes every rank from
rank 0's model and ``LocalSGD`` state (what files of the main process alone would give).
"""

from __future__ import annotations

import os
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, TensorDataset

from localsgd import LocalSGD, Schedule, diloco
from localsgd.integrations import accelerate as integration
from tests.helpers import ENGINE_MUTATIONS, broken_engine, exit_worker, mlp, recording_collectives

EPOCHS = 4
BATCHES_PER_EPOCH = 10  # per rank
BATCH = 8

# name: (schedule, inner optimizer, policy keywords, gradient accumulation steps).
CONFIGS: dict[str, tuple[Schedule, Any, dict[str, Any], int]] = {
    "post_local": (
        Schedule.post_local(local_steps=4, switch_step=6),
        lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-4),
        {},
        1,
    ),
    # accelerator.accumulate with 2 batches per optimizer step: 20 optimizer steps
    "post_local_accum": (
        Schedule.post_local(local_steps=2, switch_step=3),
        lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-4),
        {},
        2,
    ),
    "diloco": (
        Schedule.local(6),
        lambda ps: torch.optim.AdamW(ps, lr=3e-3),
        {"outer_optimizer": diloco(lr=0.7, momentum=0.9)},
        1,
    ),
    # compressed, overlapped DiLoCo: the checkpoint after step 13 holds an average in flight
    # (started after step 12, applied after step 14) and error-feedback residuals
    "diloco_overlap_int8": (
        Schedule.local(6),
        lambda ps: torch.optim.AdamW(ps, lr=3e-3),
        {"outer_optimizer": diloco(lr=0.7, momentum=0.9), "compression": "int8", "overlap_steps": 2},
        1,
    ),
}
WRAP_OUTSIDE = False  # set by the mutation ``outside``
# the killed run saves after this optimizer step (mid-epoch and mid-period: the ranks differ) and
# dies 3 steps later
SAVE_AT = {"post_local": 13, "post_local_accum": 7, "diloco": 13, "diloco_overlap_int8": 13}


def dataset(world: int) -> TensorDataset:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(world * BATCHES_PER_EPOCH * BATCH, 6, generator=g)
    y = (x[:, 0] * x[:, 1] > 0).long() + (x[:, 2] > 1).long()
    return TensorDataset(x, y)


class Traffic:
    """Which optimizer steps communicated: torch.distributed's collectives called from Python
    (localsgd's averages; anything else would show up too) and backward passes in which DDP
    all-reduces the gradients (its reducer runs in C++; a forward with ``require_backward_grad_sync``
    set prepares one)."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}
        self.ddp_syncs = 0
        self._seen = 0
        self.steps: list[int] = []  # 1-based optimizer steps that communicated

    @contextmanager
    def counting(self, ddp: DistributedDataParallel):
        def before_forward(module: DistributedDataParallel, args: Any) -> None:
            if torch.is_grad_enabled() and module.require_backward_grad_sync:
                self.ddp_syncs += 1

        hook = ddp.register_forward_pre_hook(before_forward)
        try:
            with recording_collectives(self.count):
                yield self
        finally:
            hook.remove()

    def count(self, name: str) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1

    def step_done(self, step: int) -> None:
        total = self.ddp_syncs + sum(self.calls.values())
        if total != self._seen:
            self.steps.append(step)
        self._seen = total

    def result(self) -> dict[str, Any]:
        return {"calls": dict(self.calls), "ddp_syncs": self.ddp_syncs, "steps": self.steps}


@contextmanager
def mutation(name: str | None):
    """Break the engine or the integration on purpose."""
    global WRAP_OUTSIDE
    saved = LocalSGD.__init__, integration.WorkerStates.load_state_dict
    if name in (None, *ENGINE_MUTATIONS):  # tests.helpers.broken_engine
        pass
    elif name == "unwrapped":
        init = LocalSGD.__init__

        def inner_module(self: LocalSGD, optimizer: Any, model: Any, *args: Any, **kwargs: Any) -> None:
            init(self, optimizer, model.module, *args, **kwargs)

        LocalSGD.__init__ = inner_module  # type: ignore[method-assign]
    elif name == "outside":
        WRAP_OUTSIDE = True
    elif name == "rank0_state":
        load = integration.WorkerStates.load_state_dict

        def rank0(self: integration.WorkerStates, state: Any) -> None:
            load(self, {"workers": [state["workers"][0]] * len(state["workers"])})

        integration.WorkerStates.load_state_dict = rank0  # type: ignore[method-assign]
    elif name is not None:
        raise ValueError(f"unknown mutation {name!r}")
    try:
        with broken_engine(name):
            yield
    finally:
        WRAP_OUTSIDE = False
        LocalSGD.__init__, integration.WorkerStates.load_state_dict = saved  # type: ignore[method-assign]


def state(module: torch.nn.Module) -> list[torch.Tensor]:
    return [t.detach().clone() for t in (*module.parameters(), *module.buffers())]


def accelerate_run(
    config: str, checkpoint: Path | None = None, save: bool = False, resume: bool = False
) -> dict[str, Any]:
    """The Accelerate loop. ``save``: save_state to ``checkpoint`` after step SAVE_AT, die 3 steps
    later. ``resume``: load_state from ``checkpoint`` first."""
    schedule, make_optimizer, policy, accumulate = CONFIGS[config]
    accelerator = Accelerator(
        cpu=True,
        gradient_accumulation_steps=accumulate,
        kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)],
    )
    net = mlp(seed=1)  # with BatchNorm: each rank keeps its own statistics
    if WRAP_OUTSIDE:  # the mutation ``outside``: LocalSGD around Accelerate's optimizer
        model = accelerator.prepare(net)
        opt = LocalSGD(accelerator.prepare(make_optimizer(net.parameters())), model, schedule, **policy)
    else:
        model, opt = integration.prepare(
            accelerator, net, make_optimizer(net.parameters()), schedule, **policy
        )
    loader = accelerator.prepare(DataLoader(dataset(accelerator.num_processes), batch_size=BATCH))
    engine = opt if WRAP_OUTSIDE else opt.optimizer
    done = 0  # batches of this rank already trained
    if resume:
        assert checkpoint is not None
        accelerator.load_state(str(checkpoint))
        done = engine.t * accumulate
    traffic = Traffic()
    with traffic.counting(model):
        for epoch in range(done // BATCHES_PER_EPOCH, EPOCHS):
            skip = done - epoch * BATCHES_PER_EPOCH if epoch == done // BATCHES_PER_EPOCH else 0
            batches = accelerator.skip_first_batches(loader, skip) if skip else loader
            for x, y in batches:
                with accelerator.accumulate(model):
                    loss = F.cross_entropy(model(x), y)
                    accelerator.backward(loss)
                    opt.step()
                    opt.zero_grad()
                if not accelerator.sync_gradients:
                    continue
                traffic.step_done(engine.t)
                if save and engine.t == SAVE_AT[config]:
                    assert checkpoint is not None
                    accelerator.save_state(str(checkpoint))
                if save and engine.t == SAVE_AT[config] + 3:
                    sys.stdout.flush()
                    os._exit(0)  # no teardown: as if the job were killed
    stats = {k: vars(v) for k, v in engine.stats.items()}
    return {"state": state(net), "t": engine.t, "stats": stats, "traffic": traffic.result()}


def plain_loop(config: str) -> dict[str, Any]:
    """LocalSGD around the same optimizer and a plain DistributedDataParallel model, each rank the
    batches a prepared DataLoader gives it (batches rank, rank + K, ... of the whole set), the
    loss of N accumulated batches halved N times and DDP's all-reduce only in the last backward."""
    schedule, make_optimizer, policy, accumulate = CONFIGS[config]
    rank, world = dist.get_rank(), dist.get_world_size()
    model = mlp(seed=1)
    ddp = DistributedDataParallel(model, forward_sync_buffers=False)
    opt = LocalSGD(make_optimizer(model.parameters()), ddp, schedule, **policy)
    batches = list(DataLoader(dataset(world), batch_size=BATCH))[rank::world]
    traffic = Traffic()
    with traffic.counting(ddp):
        for _ in range(EPOCHS):
            for i, (x, y) in enumerate(batches):
                last = i % accumulate == accumulate - 1
                if last:
                    (F.cross_entropy(ddp(x), y) / accumulate).backward()
                    opt.step()
                    opt.zero_grad()
                    traffic.step_done(opt.t)
                else:
                    with ddp.no_sync():
                        (F.cross_entropy(ddp(x), y) / accumulate).backward()
    stats = {k: vars(v) for k, v in opt.stats.items()}
    return {"state": state(model), "t": opt.t, "stats": stats, "traffic": traffic.result()}


def main() -> None:
    mode, out, config = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    mutations = [m for m in sys.argv[4].split(",") if m] if len(sys.argv) > 4 else []
    warnings.filterwarnings("ignore")  # torch's notice that broadcast_buffers is deprecated
    result: dict[str, Any] = {"mutated": {}}
    if mode == "equal_then_killed":
        result["accelerate"] = accelerate_run(config)
        for name in mutations:
            with mutation(name):
                result["mutated"][name] = accelerate_run(config)
        result["plain_ddp"] = plain_loop(config)
        torch.save(result, out / f"{mode}_rank{dist.get_rank()}.pt")
        accelerate_run(config, out / "checkpoint", save=True)
        raise AssertionError("the killed run was not killed")
    elif mode == "resume":
        result["resumed"] = accelerate_run(config, out / "checkpoint", resume=True)
        for name in mutations:
            with mutation(name):
                result["mutated"][name] = accelerate_run(config, out / "checkpoint", resume=True)
    else:
        raise ValueError(f"unknown mode {mode!r}")
    torch.save(result, out / f"{mode}_rank{dist.get_rank()}.pt")


if __name__ == "__main__":
    main()
    exit_worker()
