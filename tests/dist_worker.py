"""One worker of a multi-process test, started by torchrun (see helpers.torchrun).

Usage: dist_worker.py SCENARIO OUT_DIR [ARGS...]; each rank writes OUT_DIR/rank{r}.pt.
"""

from __future__ import annotations

import inspect
import io
import os
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel

from localsgd import LocalSGD, Schedule, diloco, slowmo
from tests.helpers import Toy, batch, minibatch_reference, mlp, sgd

SCHEDULES = {
    "local": (Schedule.local(3), None),
    "post_local": (Schedule.post_local(3, switch_step=4), None),
    "hierarchical": (Schedule.hierarchical(2, 2, switch_step=1), 2),
    # K' from torchrun's LOCAL_WORLD_SIZE: the processes of one node form a block
    "hierarchical_nodes": (Schedule.hierarchical(2, 2, switch_step=1), None),
    "sim_local": (Schedule.local(3), None),
    "sim_post_local": (Schedule.post_local(3, switch_step=2), None),
}


def rank_values(rank: int, name: str, buffers: str) -> dict:
    """Rank-valued parameters; SGD(lr=1) adds rank+1 per step. Records every step's values."""
    schedule, block = SCHEDULES[name]
    model = Toy(float(rank))
    opt = LocalSGD(
        torch.optim.SGD(model.parameters(), lr=1.0),
        model,
        schedule,
        workers_per_block=block,
        buffers=buffers,
        sync_initial=False,
        bucket_bytes=16,  # several buckets and dtypes
    )
    rows = []
    for _ in range(12):
        model.local_update(rank)
        opt.step()
        rows.append(model.values())
    return {"values": torch.stack(rows), "stats": {k: v.rounds for k, v in opt.stats.items()}}


def train(rank: int, schedule: Schedule, steps: int, ddp: bool = False) -> tuple[nn.Module, LocalSGD, list]:
    model = mlp(seed=1)
    net: nn.Module = ddp_without_buffer_sync(model) if ddp else model
    opt = LocalSGD(sgd(model), net, schedule)
    trajectory = []
    for t in range(steps):
        x, y = batch(seed=2, worker=rank, t=t)
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
        trajectory.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    return model, opt, trajectory


def ddp_without_buffer_sync(model: nn.Module) -> DistributedDataParallel:
    """DDP that leaves each worker's BatchNorm statistics alone, as the README tells users to build
    it: forward_sync_buffers=False from torch 2.13 on, broadcast_buffers=False before. Any deprecation
    warning from this call is an error."""
    accepted = inspect.signature(DistributedDataParallel.__init__).parameters
    option = "forward_sync_buffers" if "forward_sync_buffers" in accepted else "broadcast_buffers"
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        return DistributedDataParallel(model, **{option: False})


def count_all_reduce() -> list[int]:
    """Count Python-level all_reduce calls (ours; DDP's reducer does not go through here)."""
    calls = [0]
    original = dist.all_reduce

    def counting(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    dist.all_reduce = counting
    return calls


def minibatch(rank: int, ddp: bool) -> dict:
    """H = 1 against mini-batch SGD over all workers' batches (computed on every rank)."""
    calls = count_all_reduce()
    model, opt, _ = train(rank, Schedule.local(1), steps=20, ddp=ddp)
    ref = minibatch_reference(dist.get_world_size(), steps=20)
    return {
        "params": [p.detach() for p in model.parameters()],
        "reference": [p.detach() for p in ref.parameters()],
        "running_mean": model[1].running_mean.clone(),
        "python_all_reduces": calls[0],
        "rounds": opt.stats["global"].rounds,
    }


def ddp_local(rank: int) -> dict:
    """Post-local SGD with and without DistributedDataParallel: the same trajectory."""
    schedule = Schedule.post_local(3, switch_step=2)
    _, _, with_ddp = train(rank, schedule, steps=8, ddp=True)
    _, _, without = train(rank, schedule, steps=8, ddp=False)
    return {"ddp": torch.stack(with_ddp), "plain": torch.stack(without)}


def sim_vs_dist(rank: int, name: str) -> dict:
    model, opt, _ = train(rank, SCHEDULES[name][0], steps=9)
    return {"params": [p.detach() for p in model.parameters()], "stats": opt.state_dict()["stats"]}


def resume(rank: int) -> dict:
    """Stop mid-period, save, rebuild everything from scratch, load, continue: bitwise equal."""
    schedule = Schedule.post_local(4, switch_step=2)
    full, _, _ = train(rank, schedule, steps=12)
    model, opt, _ = train(rank, schedule, steps=7)  # u = 5: one step into the second period
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model = mlp(seed=99)  # different weights: the checkpoint must restore everything
    opt = LocalSGD(sgd(model, lr=0.5), model, schedule)
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    for t in range(opt.t, 12):
        x, y = batch(seed=2, worker=rank, t=t)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return {
        "full": [p.detach() for p in full.state_dict().values()],
        "resumed": [p.detach() for p in model.state_dict().values()],
        "t": opt.t,
    }


def grad_scaler(rank: int) -> dict:
    """Rank 1's gradients overflow at t = 1 (mini-batch phase) and t = 3 (local phase)."""
    model = mlp(seed=1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    opt = LocalSGD(sgd(model), model, Schedule.post_local(3, switch_step=2), grad_scaler=scaler)
    trajectory = []
    for t in range(8):
        x, y = batch(seed=2, worker=rank, t=t)
        opt.zero_grad()
        scaler.scale(F.cross_entropy(model(x), y)).backward()
        if rank == 1 and t in (1, 3):
            model[0].weight.grad[0, 0] = float("inf")
        opt.step()
        scaler.update()
        trajectory.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    return {"trajectory": torch.stack(trajectory), "t": opt.t, "scale": scaler.get_scale()}


def streaming(rank: int) -> dict:
    """Streaming DiLoCo, N = 4 fragments, int8, τ = 1, mix (tests/test_streaming.py's model and
    batches), averaged in worker order; every parameter after the last average is applied."""
    from localsgd import DistCommunicator
    from tests.test_streaming import STREAMING, backward, inner, model, sending

    m = model()
    opt = LocalSGD(inner(m), m, Schedule.local(8), comm=DistCommunicator(ordered=True), **STREAMING)
    sent = sending(opt, lambda t: backward([m], t, first=rank), 27)
    return {"params": [p.detach() for p in m.parameters()], "sent": sent}


def outer(rank: int, name: str) -> dict:
    """The exact dyadic model of tests/test_golden.py with an outer optimizer (one per process)."""
    from tests.test_golden import Dyadic, optimizer
    from tests.test_outer import inner_lr_at

    schedule, make_outer, tau, codec = {
        "diloco": (Schedule.post_local(2, switch_step=4), diloco(0.5, 0.5), 0, None),
        "slowmo": (Schedule.hierarchical(2, 2, switch_step=1), slowmo(1.0, 0.5), 0, None),
        "diloco overlapped": (Schedule.post_local(3, switch_step=2), diloco(0.5, 0.5), 2, None),
        "diloco overlapped int8": (Schedule.post_local(3, switch_step=2), diloco(0.5, 0.5), 2, "int8"),
    }[name]
    model = Dyadic()
    opt = LocalSGD(optimizer(model), model, schedule, workers_per_block=2, outer_optimizer=make_outer,
                   overlap_steps=tau, compression=codec)  # fmt: skip
    for t in range(14):
        opt.param_groups[0]["lr"] = inner_lr_at(t)
        model.local_update(rank, t)
        opt.step()
        opt.zero_grad()
    return {"params": [p.detach() for p in model.parameters()], "stats": opt.state_dict()["stats"]}


def compressed(rank: int, codec: str) -> dict:
    """DiLoCo with compressed pseudo-gradients on the exact dyadic model; records what this rank
    handed to the all-to-all and all-gather collectives during training."""
    from tests.test_golden import Dyadic, optimizer
    from tests.test_outer import inner_lr_at

    model = Dyadic()
    opt = LocalSGD(optimizer(model), model, Schedule.post_local(2, switch_step=3),
                   outer_optimizer=diloco(0.5, 0.5), compression=codec)  # fmt: skip
    seen = {"a2a": 0, "gather": 0, "dtypes": set()}
    real_a2a, real_gather = dist.all_to_all_single, dist.all_gather

    def a2a(out: torch.Tensor, send: torch.Tensor, **kwargs: object) -> object:
        seen["a2a"] += send.numel() * send.element_size()
        seen["dtypes"].add(str(send.dtype))
        return real_a2a(out, send, **kwargs)

    def gather(out: list, mine: torch.Tensor, **kwargs: object) -> object:
        seen["gather"] += mine.numel() * mine.element_size()
        seen["dtypes"].add(str(mine.dtype))
        return real_gather(out, mine, **kwargs)

    dist.all_to_all_single, dist.all_gather = a2a, gather
    before = 0
    for t in range(14):
        if t == 3:
            before = opt.stats["global"].bytes  # the mini-batch phase's (uncompressed) gradients
        opt.param_groups[0]["lr"] = inner_lr_at(t)
        model.local_update(rank, t)
        opt.step()
        opt.zero_grad()
    dist.all_to_all_single, dist.all_gather = real_a2a, real_gather
    return {
        "params": [p.detach() for p in model.parameters()],
        "stats": opt.state_dict()["stats"],
        "compressed_bytes": opt.stats["global"].bytes - before,
        "a2a": seen["a2a"],
        "gather": seen["gather"],
        "dtypes": seen["dtypes"],
    }


def sync_initial(rank: int) -> dict:
    """Every rank builds its model from its own seed; LocalSGD's construction gives all of them
    rank 0's parameters and buffers. A DDP wrapper that syncs buffers at every forward is refused."""
    model = mlp(seed=10 + rank)
    with torch.no_grad():
        model[1].running_mean.fill_(float(rank + 1))  # a buffer that differs too
    before = [t.detach().clone() for t in model.state_dict().values()]
    LocalSGD(sgd(model), model, Schedule.local(2))
    after = [t.detach().clone() for t in model.state_dict().values()]
    guarded = mlp(seed=1)
    syncing = DistributedDataParallel(guarded)  # forward buffer sync on (the default)
    try:
        LocalSGD(sgd(guarded), syncing, Schedule.local(2))
        error = ""
    except ValueError as e:
        error = str(e)
    return {"before": before, "after": after, "ddp_error": error}


def optimizer_state(rank: int, policy: str) -> dict:
    """Momentum after each parameter average under the optimizer-state policy."""
    model = mlp(seed=1)
    opt = LocalSGD(sgd(model), model, Schedule.local(3), optimizer_state=policy)
    momentum = []
    for t in range(6):
        x, y = batch(seed=2, worker=rank, t=t)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        state = opt.optimizer.state.get(model[0].weight, {})
        momentum.append(state["momentum_buffer"].clone() if "momentum_buffer" in state else None)
    return {"momentum": momentum}


def mismatch(rank: int) -> dict:
    """Rank 1 has one more layer than the others."""
    model = mlp(seed=1, extra=rank == 1)
    start = time.perf_counter()
    try:
        LocalSGD(sgd(model), model, Schedule.local(4))
        error = ""
    except ValueError as e:
        error = str(e)
    return {"error": error, "seconds": time.perf_counter() - start}


def main() -> None:
    scenario, out, *args = sys.argv[1:]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    if scenario == "rank_values":
        result = rank_values(rank, *args)
    elif scenario == "minibatch":
        result = minibatch(rank, ddp=args[0] == "ddp")
    elif scenario == "ddp_local":
        result = ddp_local(rank)
    elif scenario == "sim_vs_dist":
        result = sim_vs_dist(rank, *args)
    elif scenario == "resume":
        result = resume(rank)
    elif scenario == "grad_scaler":
        result = grad_scaler(rank)
    elif scenario == "compressed":
        result = compressed(rank, *args)
    elif scenario == "outer":
        result = outer(rank, *args)
    elif scenario == "sync_initial":
        result = sync_initial(rank)
    elif scenario == "optimizer_state":
        result = optimizer_state(rank, *args)
    elif scenario == "mismatch":
        result = mismatch(rank)
    elif scenario == "streaming":
        result = streaming(rank)
    else:
        raise SystemExit(f"unknown scenario {scenario!r}")
    torch.save(result, Path(out) / f"rank{rank}.pt")
    dist.barrier()  # no rank tears its connections down while a peer still uses them
    dist.destroy_process_group()
    # torch 2.13's gloo backend sometimes aborts in C++ static destructors after Python has
    # finished ("terminate called without an active exception"); everything is written by now.
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
