"""A short demo: mini-batch, local, post-local and hierarchical local SGD on a synthetic task.

The same code runs K workers in the simulator (``localsgd demo``) or one worker per process under
torchrun (``torchrun --nproc-per-node 4 -m localsgd demo``), and prints the same table.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from localsgd import Engine, LocalSGD, Schedule, Simulator
from localsgd.harness.measures import ACCURACY
from localsgd.harness.tables import Column, render

FEATURES, CLASSES = 32, 10


def make_data(seed: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs labelled by a fixed random teacher network (the same for every seed)."""
    teacher = torch.Generator().manual_seed(12345)
    w1 = torch.randn(FEATURES, 64, generator=teacher) / math.sqrt(FEATURES)
    w2 = torch.randn(64, CLASSES, generator=teacher) / 8
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, FEATURES, generator=g)
    y = (torch.tanh(x @ w1) @ w2).argmax(1)
    return x, y


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(FEATURES, 128),
        nn.BatchNorm1d(128),
        nn.ReLU(),
        nn.Linear(128, 128),
        nn.BatchNorm1d(128),
        nn.ReLU(),
        nn.Linear(128, CLASSES),
    )


@dataclass
class Result:
    method: str
    schedule: Schedule
    train_loss: float
    test_accuracy: float
    global_rounds: int
    block_rounds: int
    megabytes: float
    seconds: float


def run(
    method: str,
    schedule: Schedule,
    workers: int,
    workers_per_block: int | None,
    epochs: int,
    local_batch_size: int,
    seed: int,
    show_progress: bool,
) -> Result:
    x, y = make_data(seed, 16384)
    x_test, y_test = make_data(seed + 1, 4096)
    model = make_model(seed)
    lr = 0.05 * workers  # linear scaling of a per-worker rate

    def make_opt(m: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=1e-4)

    engine: Engine
    if dist.is_initialized():
        engine = LocalSGD(make_opt(model), model, schedule, workers_per_block=workers_per_block)
    else:
        engine = Simulator(model, make_opt, schedule, workers, workers_per_block=workers_per_block)
    per_worker = len(x) // workers
    steps_per_epoch = per_worker // local_batch_size
    total = epochs * steps_per_epoch
    progress = tqdm(total=total, desc=f"{method:<13}", unit="step", disable=not show_progress)
    start = time.perf_counter()
    losses: list[torch.Tensor] = []  # read once per epoch, not per step
    for epoch in range(epochs):
        # A fresh random disjoint shard per worker every epoch (the same permutation on all ranks).
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed * 1000 + epoch))
        for i in range(steps_per_epoch):
            for k, m in zip(engine.comm.local_workers, engine.models, strict=True):
                idx = order[k * per_worker + i * local_batch_size :][:local_batch_size]
                loss = F.cross_entropy(m(x[idx]), y[idx])
                loss.backward()
                losses.append(loss.detach())
            engine.step()
            engine.zero_grad()
            progress.update()
        progress.set_postfix_str(f"loss {torch.stack(losses[-50:]).mean().item():.3f}")
    progress.close()
    seconds = time.perf_counter() - start
    stats = {level: copy.copy(s) for level, s in engine.stats.items()}  # training communication only
    engine.average_now(buffers=True)  # evaluate the averaged model, with averaged BN statistics
    model = engine.models[0].eval()
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    losses_read = torch.stack(losses).tolist()
    train_loss = sum(losses_read[-steps_per_epoch:]) / steps_per_epoch
    if dist.is_initialized():  # every rank's recent losses, averaged
        t = torch.tensor([train_loss])
        dist.all_reduce(t)
        train_loss = t.item() / dist.get_world_size()
    else:
        train_loss = sum(losses_read[-steps_per_epoch * workers :]) / (steps_per_epoch * workers)
    return Result(
        method=method,
        schedule=schedule,
        train_loss=train_loss,
        test_accuracy=accuracy,
        global_rounds=stats["global"].rounds,
        block_rounds=stats["block"].rounds if "block" in stats else 0,
        megabytes=sum(s.bytes for s in stats.values()) / 1e6,
        seconds=seconds,
    )


def methods(steps: int, local_steps: int) -> list[tuple[str, Schedule]]:
    return [
        ("mini-batch", Schedule.local(1)),
        ("local", Schedule.local(local_steps)),
        ("post-local", Schedule.post_local(local_steps, switch_step=steps // 2)),
        ("hierarchical", Schedule.hierarchical(max(local_steps // 4, 1), 4, switch_step=steps // 2)),
    ]


def table(results: list[Result]) -> str:
    columns = [
        Column("method", 13, lambda r: r.method, left=True),
        Column("schedule", 26, lambda r: str(r.schedule), left=True),
        Column("train loss", 10, lambda r: f"{r.train_loss:.4f}"),
        Column("test acc", 8, lambda r: ACCURACY.cell(r.test_accuracy)),
        Column("global rounds", 13, lambda r: str(r.global_rounds)),
        Column("block rounds", 12, lambda r: str(r.block_rounds)),
        Column("MB/worker", 9, lambda r: f"{r.megabytes:.2f}"),
        Column("seconds", 7, lambda r: f"{r.seconds:.1f}"),
    ]
    return render(columns, results)


def main(workers: int, epochs: int, local_steps: int, local_batch_size: int, seed: int) -> list[Result]:
    rank = 0
    if dist.is_initialized():
        workers, rank = dist.get_world_size(), dist.get_rank()
    workers_per_block = workers // 2 if workers % 2 == 0 and workers > 1 else 1
    steps = epochs * ((16384 // workers) // local_batch_size)
    if rank == 0:
        where = "torchrun processes" if dist.is_initialized() else "simulated workers"
        print(
            f"localsgd demo: K={workers} {where}, B_loc={local_batch_size}, {epochs} epochs "
            f"({steps} steps), K'={workers_per_block} for the hierarchical run"
        )
    results = [
        run(name, s, workers, workers_per_block, epochs, local_batch_size, seed, rank == 0)
        for name, s in methods(steps, local_steps)
    ]
    if rank == 0:
        print(table(results))
    return results
