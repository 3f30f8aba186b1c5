"""Sharded workers: a worker is a group of S ranks holding its model sharded with FSDP2.

Under torchrun with W = K·S processes, a 2-D device mesh (``"replicate"`` × ``"shard"``, K × S)
says who is who: each group (a row) shards the model over ``mesh["shard"]`` with ``fully_shard``
and trains it fully synchronously (FSDP's all-gathers and reduce-scatters, over the fast links);
localsgd runs its schedule across the K groups over ``mesh["replicate"]`` (the slow links). Every
rank averages only its own shards with the ranks that hold the same shards in the other groups, so
it sends model_bytes/S per average and keeps anchors, outer-optimizer state and error-feedback
residuals for its shards only.

Gradients of a step that averages them (the mini-batch phase) are averaged across the groups by an
all-reduce hook FSDP runs on each reduce-scattered gradient inside backward (overlapped, as FSDP's
own HSDP would); in local steps the hook does nothing. FSDP's native HSDP (a model sharded on the
2-D mesh) cannot serve here: with its all-reduce switched off (``set_requires_all_reduce(False)``)
FSDP holds the gradients back for a later step's all-reduce (gradient accumulation) and never hands
them to the optimizer.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

from localsgd.averaging import FlatAverager
from localsgd.comm import Communicator, DistCommunicator
from localsgd.schedule import Level

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

MESH_DIMS = ("replicate", "shard")


def _is_dtensor(t: object) -> bool:
    # Without importing torch.distributed.tensor (half a second): no DTensor exists before it is.
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``t``: the local shard of a ``DTensor`` (a view of FSDP's own storage,
    so writing into it writes the parameter), else ``t`` itself."""
    return t._local_tensor if _is_dtensor(t) else t  # type: ignore[attr-defined]


def shards(model: nn.Module) -> list[torch.Tensor]:
    """This rank's part of each of ``model``'s parameters, in ``model.parameters()`` order."""
    return [local(p) for p in model.parameters()]


def _fsdp_modules(model: nn.Module) -> list[nn.Module]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` (or a submodule) was sharded with FSDP2's ``fully_shard``."""
    return any(_is_dtensor(p) for p in model.parameters())


def _ranks(mesh: DeviceMesh) -> list[int]:
    return [int(r) for r in mesh.mesh.flatten().tolist()]


def shard_mesh(model: nn.Module) -> DeviceMesh:
    """The mesh ``model``'s parameters are sharded over; ValueError unless it is one 1-D mesh for
    all of them and every parameter is sharded."""
    meshes = {(m.ndim, *_ranks(m)): m for m in (p.device_mesh for p in model.parameters() if _is_dtensor(p))}
    plain = [name for name, p in model.named_parameters() if not _is_dtensor(p)]
    if plain:
        raise ValueError(
            f"parameter {plain[0]!r} is not sharded while others are: apply fully_shard to the root "
            "module too (after its blocks), so every parameter is sharded"
        )
    if len(meshes) != 1:
        raise ValueError(f"the model's parameters are sharded over {len(meshes)} meshes; localsgd needs one")
    (mesh,) = meshes.values()
    if mesh.ndim != 1:
        raise ValueError(
            f"the model is sharded over a {mesh.ndim}-D mesh (FSDP's HSDP); shard each worker's model over "
            "mesh['shard'] only and pass the 2-D mesh to localsgd, which averages across mesh['replicate']"
        )
    return mesh


def shard_model(model: nn.Module, mesh: DeviceMesh) -> nn.Module:
    """``fully_shard`` each of ``model.blocks`` (if it has them) and then ``model`` itself over
    ``mesh["shard"]``: what users do, and what localsgd's harness does with its models."""
    from torch.distributed.fsdp import fully_shard

    shard = check_mesh(mesh)["shard"]
    for block in getattr(model, "blocks", ()):
        fully_shard(block, mesh=shard)
    fully_shard(model, mesh=shard)
    return model


def check_mesh(mesh: object) -> DeviceMesh:
    """``mesh`` if it is a 2-D device mesh with dimensions named ("replicate", "shard"), else
    ValueError naming what it is."""
    from torch.distributed.device_mesh import DeviceMesh

    if not isinstance(mesh, DeviceMesh):
        raise TypeError(f"mesh must be a torch.distributed.device_mesh.DeviceMesh, got {type(mesh).__name__}")
    if mesh.ndim != 2 or tuple(mesh.mesh_dim_names or ()) != MESH_DIMS:
        raise ValueError(
            f"mesh must be 2-D with mesh_dim_names=('replicate', 'shard') (K workers x S shards), got "
            f"{mesh.ndim}-D with names {mesh.mesh_dim_names}"
        )
    return mesh


def replica_communicator(mesh: DeviceMesh, ordered: bool = False) -> DistCommunicator:
    """The K workers of a (replicate x shard) mesh: this rank and the ranks holding the same shards
    in the other groups."""
    return DistCommunicator(check_mesh(mesh).get_group("replicate"), ordered=ordered)


def check_sharded(models: Sequence[nn.Module], comm: Communicator) -> bool:
    """Whether the workers are sharded (then ValueError unless ``comm`` averages across groups:
    its group meets the model's shard group in this rank only)."""
    sharded = [is_sharded(m) for m in models]
    if not any(sharded):
        return False
    if not isinstance(comm, DistCommunicator):
        raise ValueError("sharded (fully_shard) models need torch.distributed, not the simulator")
    mesh = shard_mesh(models[0])
    across = set(dist.get_process_group_ranks(comm.group))
    if across & set(_ranks(mesh)) != {dist.get_rank()}:
        raise ValueError(
            f"the model is sharded over ranks {_ranks(mesh)}, but localsgd would take ranks "
            f"{sorted(across)} for separate workers; pass mesh= (the 2-D 'replicate' x 'shard' mesh whose "
            "mesh['shard'] the model is sharded over), so that a worker is a group of ranks"
        )
    return True


class FSDPArming:
    """Averages the gradients of steps that average them across the K groups, inside FSDP's
    backward: a hook on every reduce-scattered gradient (already the mean over the group's S ranks)
    all-reduces it across the groups; ``arm`` switches it on for the next step only if that step
    averages gradients globally. The interface of ``localsgd.ddp.DDPArming``."""

    def __init__(self, model: nn.Module, comm: Communicator, buffers: str) -> None:
        if buffers != "local":
            raise ValueError(
                "buffers='average' is not supported with sharded models (FSDP keeps every rank's "
                "buffers apart); use buffers='local'"
            )
        self.comm = comm
        self.on = False
        for module in _fsdp_modules(model):
            module.set_all_reduce_hook(self._hook)  # type: ignore[operator]

    any = True  # the gradients of every sharded step are reduced by FSDP, never by the engine

    def _hook(self, reduce_output: torch.Tensor) -> None:
        if self.on:
            self.comm.all_reduce_mean_(Level.GLOBAL, [reduce_output])()

    def syncs(self, level: Level | None) -> bool:
        return level is Level.GLOBAL

    def arm(self, level: Level | None) -> None:
        self.on = self.syncs(level)


@torch.no_grad()
def average_into(averager: FlatAverager, model: nn.Module, into: nn.Module) -> nn.Module:
    """``into`` (``model`` unsharded) set to the mean of the K workers' sharded ``model``: each
    rank averages its shards across the groups, then the group gathers them whole; floating
    buffers are averaged over all ranks of the world."""
    named = dict(into.named_parameters())
    params = dict(model.named_parameters())
    if named.keys() != params.keys():
        missing = sorted(named.keys() ^ params.keys())[0]
        raise ValueError(f"into= is not the same model: parameter {missing!r} is in only one of them")
    from torch.distributed.tensor import DTensor

    means = [local(p).detach().clone() for p in params.values()]
    averager.average_(Level.GLOBAL, [means])
    for (name, p), mean in zip(params.items(), means, strict=True):
        whole = DTensor.from_local(
            mean, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride()
        )
        named[name].copy_(whole.full_tensor())
    buffers = dict(model.named_buffers())
    for name, mine in into.named_buffers():
        if not mine.is_floating_point():
            continue
        theirs = buffers[name]
        mean = theirs.detach().clone()
        dist.all_reduce(mean)
        mine.copy_(mean.div_(dist.get_world_size()))
    return into
