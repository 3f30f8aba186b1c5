"""One rank of a sharded-worker test (tests/test_sharding.py), started by torchrun.

Usage: sharded_worker.py CONFIG[,CONFIG...] OUT_DIR SHARDS [MUTATION]

SHARDS = S: the W processes form K = W/S workers of S ranks each. With S > 1 each worker's model is
sharded over its group with FSDP2 (per layer and at the root) and each rank trains on its own
micro-batch; with S = 1 (the unsharded twin) each worker trains on the union of the micro-batches
its group's ranks would take (S = 2). Every rank writes OUT_DIR/CONFIG/rank{r}.pt: the full parameters of its
worker's model (gathered), the engine's counters, and the bytes of parameters, inner optimizer state
and localsgd state this rank holds.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from localsgd import LocalSGD, Schedule, diloco
from localsgd.sharding import local
from tests.helpers import exit_worker

SHARDS_OF_TWIN = 2  # the micro-batches one unsharded twin worker takes per step
MICRO = 4  # samples per rank and step


def make_model() -> nn.Module:
    """Rows 13 and 7 do not divide by 2: FSDP pads the last shard."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 13), nn.Tanh(), nn.Linear(13, 7), nn.Tanh(), nn.Linear(7, 3))


CONFIGS = {
    # name: (schedule, steps, inner optimizer, policy)
    "local": (Schedule.local(4), 12, "sgd", {}),
    "post_local": (Schedule.post_local(4, switch_step=5), 17, "sgd", {"max_grad_norm": 0.5}),
    "state_average": (Schedule.post_local(4, switch_step=5), 13, "sgd", {"optimizer_state": "average"}),
    "state_reset": (Schedule.local(4), 12, "adamw", {"optimizer_state": "reset"}),
    "diloco": (Schedule.local(4), 12, "adamw", {"outer_optimizer": diloco(0.7, 0.9)}),
    "diloco_int8": (
        Schedule.local(4),
        12,
        "adamw",
        {"outer_optimizer": diloco(0.7, 0.9), "compression": "int8"},
    ),
    "diloco_fragments": (
        Schedule.local(4),
        13,
        "adamw",
        {
            "outer_optimizer": diloco(0.7, 0.9),
            "fragments": 2,
            "merge": "mix",
            "alpha": 0.5,
            "overlap_steps": 1,
        },
    ),
    "diloco_overlap": (
        Schedule.local(4),
        13,
        "adamw",
        {"outer_optimizer": diloco(0.7, 0.9), "overlap_steps": 1},
    ),
}


def micro_batch(worker: int, part: int, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1_000_003 * worker + 10_007 * part + t)
    return torch.randn(MICRO, 6, generator=g), torch.randint(0, 3, (MICRO,), generator=g)


def inner_optimizer(name: str, model: nn.Module) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)


def nbytes(tensors) -> int:
    return sum(local(t).numel() * t.element_size() for t in tensors if torch.is_tensor(t))


def main(configs: str, out: Path, shards: int, mutation: str | None) -> None:
    dist.init_process_group("gloo")
    for config in configs.split(","):
        (out / config).mkdir(parents=True, exist_ok=True)
        run(config, out / config, shards, mutation)


def run(config: str, out: Path, shards: int, mutation: str | None) -> None:
    model, opt, worker, part = build(config, shards, mutation)
    train(model, opt, worker, part, range(CONFIGS[config][1]))
    write(model, opt, out, shards)


def build(
    config: str, shards: int, mutation: str | None = None
) -> tuple[nn.Module, LocalSGD, int, int | None]:
    """This rank's model and LocalSGD; its worker k and its part of the worker's batch (None: all)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    schedule, _, inner, policy = CONFIGS[config]
    model = make_model()
    if shards == 1:
        return model, LocalSGD(inner_optimizer(inner, model), model, schedule, **policy), rank, None
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world // shards, shards), mesh_dim_names=("replicate", "shard"))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh["shard"])
    fully_shard(model, mesh=mesh["shard"])
    opt = LocalSGD(inner_optimizer(inner, model), model, schedule, mesh=mesh, **policy)
    arming = opt._ddp
    if mutation == "all_reduce_always":  # the cross-group gradient all-reduce left on in local steps
        arming.arm = lambda level: setattr(arming, "on", True)
    if mutation == "all_reduce_never":  # ... and off in the mini-batch phase
        arming.arm = lambda level: setattr(arming, "on", False)
    worker, part = divmod(rank, shards)
    return model, opt, worker, part


def train(model: nn.Module, opt: LocalSGD, worker: int, part: int | None, steps: range) -> None:
    for t in steps:
        parts = [part] if part is not None else range(SHARDS_OF_TWIN)
        x, y = (torch.cat(z) for z in zip(*(micro_batch(worker, p, t) for p in parts), strict=True))
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def full_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        name: getattr(p, "full_tensor", p.detach)().detach().clone() for name, p in model.named_parameters()
    }


def write(model: nn.Module, opt: LocalSGD, out: Path, shards: int) -> None:
    """The worker's full parameters (after applying an average in flight), counters and bytes held."""
    opt.flush()
    held = {
        "parameters": nbytes(model.parameters()),
        "inner": nbytes(v for s in opt.optimizer.state.values() for k, v in s.items() if k != "step"),
        "outer": sum(
            nbytes(o.anchor) + nbytes(v for s in o.optimizer.state.values() for v in s.values())
            for o in opt._outer_steps()
        ),
    }
    stats = {level: vars(s) for level, s in opt.stats.items()}
    result = {"params": full_parameters(model), "stats": stats, "held": held, "t": opt.t}
    out.mkdir(parents=True, exist_ok=True)
    torch.save(result, out / f"rank{dist.get_rank()}.pt")


def resume(config: str, out: Path, shards: int, phase: str, save_at: int) -> None:
    """``save``: train, write a DCP checkpoint after step SAVE_AT into OUT/ckpt, train on to the end
    (OUT/full). ``load``: a fresh model and LocalSGD (any S) load OUT/ckpt and train on to the end
    (OUT/resumed-S{S}); what they loaded, before training, is in OUT/loaded-S{S}."""
    from localsgd import dcp

    dist.init_process_group("gloo")
    steps = CONFIGS[config][1]
    model, opt, worker, part = build(config, shards)
    if phase == "save":
        train(model, opt, worker, part, range(save_at))
        dcp.save(out / "ckpt", model, opt)
        torch.save({"params": full_parameters(model), "t": opt.t}, out / f"saved-rank{dist.get_rank()}.pt")
        train(model, opt, worker, part, range(save_at, steps))
        write(model, opt, out / "full", shards)
    else:
        dcp.load(out / "ckpt", model, opt)
        loaded = {"params": full_parameters(model), "t": opt.t}
        if opt._outer_steps():
            loaded["anchor"] = [a.clone() for o in opt._outer_steps() for a in o.anchor]
        torch.save(loaded, out / f"loaded-S{shards}-rank{dist.get_rank()}.pt")
        train(model, opt, worker, part, range(opt.t, steps))
        write(model, opt, out / f"resumed-S{shards}", shards)


def bad_inputs(out: Path) -> None:
    """Each bad input's error (type and message), as every rank saw it, in OUT_DIR/errors{rank}.json."""
    import json

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from localsgd import Simulator
    from localsgd.comm import DistCommunicator

    dist.init_process_group("gloo")
    world = dist.get_world_size()
    mesh = init_device_mesh("cpu", (1, world), mesh_dim_names=("replicate", "shard"))

    def sharded(on=None, root: bool = True) -> nn.Module:
        model = make_model()
        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=on if on is not None else mesh["shard"])
        if root:
            fully_shard(model, mesh=on if on is not None else mesh["shard"])
        return model

    def with_norm() -> nn.Module:  # a parameter outside every sharded block, root left plain
        model = nn.Sequential(nn.Linear(6, 4), nn.LayerNorm(4))
        fully_shard(model[0], mesh=mesh["shard"])
        return model

    def sgd(model: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(model.parameters(), lr=0.1)

    def make(model: nn.Module, schedule: Schedule | None = None, **kwargs) -> LocalSGD:
        return LocalSGD(sgd(model), model, schedule or Schedule.local(4), **kwargs)

    cases = {
        "no_mesh": lambda: make(sharded()),
        "not_sharded": lambda: make(make_model(), mesh=mesh),
        "mesh_1d": lambda: make(sharded(), mesh=mesh["shard"]),
        "mesh_names": lambda: make(
            sharded(), mesh=init_device_mesh("cpu", (1, world), mesh_dim_names=("dp", "fsdp"))
        ),
        "hsdp": lambda: make(sharded(on=mesh), mesh=mesh),
        "root_plain": lambda: make(with_norm(), mesh=mesh),
        "mesh_and_comm": lambda: make(sharded(), mesh=mesh, comm=DistCommunicator()),
        "hierarchical": lambda: make(sharded(), Schedule.hierarchical(2, 2), mesh=mesh),
        "buffers": lambda: make(sharded(), mesh=mesh, buffers="average"),
        "compression_state": lambda: make(
            sharded(), mesh=mesh, compression="int8", optimizer_state="average"
        ),
        "averaged_model": lambda: make(sharded(), mesh=mesh).averaged_model(),
        "simulator": lambda: Simulator(sharded(), sgd, Schedule.local(4), 2),
    }
    seen = {}
    for name, case in cases.items():
        try:
            case()
            seen[name] = None
        except Exception as e:
            seen[name] = f"{type(e).__name__}: {e}"
    (out / f"errors{dist.get_rank()}.json").write_text(json.dumps(seen, indent=1))


if __name__ == "__main__":
    if sys.argv[1] == "bad_inputs":
        bad_inputs(Path(sys.argv[2]))
    elif sys.argv[1] == "resume":  # resume CONFIG OUT SHARDS save|load SAVE_AT
        resume(sys.argv[2], Path(sys.argv[3]), int(sys.argv[4]), sys.argv[5], int(sys.argv[6]))
    else:
        main(sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4] if len(sys.argv) > 4 else None)
    exit_worker()
