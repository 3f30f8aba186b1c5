"""Checkpoints of sharded workers through ``torch.distributed.checkpoint`` (DCP).

``save(path, model, optimizer)`` writes the model, the inner optimizer and all of localsgd's state
as one DCP checkpoint; ``load(path, model, optimizer)`` restores them, every rank at once.

What lives like the parameters (the anchor θ̄, the outer optimizer's per-parameter state, the
snapshots of an overlapped average in flight) is saved as DTensors sharded like the parameters,
under the parameter's name, so a checkpoint loads into another number of shards S (DCP reshards),
as the model and the inner optimizer do (``torch.distributed.checkpoint.state_dict``). The rest of
localsgd's state (step, schedule, counters) is small and saved per rank. The error-feedback
residuals of compressed averages are laid out per rank (flat buffers of its shards, cut into K
chunks), and so is the state of Streaming DiLoCo's fragments (``fragments`` > 1): both load only
at the layout they were written at.

A DCP checkpoint is complete once its ``.metadata`` file exists (written last); a save that died
before leaves a folder ``load`` refuses. Write each checkpoint to a new folder.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from localsgd.engine import Engine
from localsgd.sharding import local
from localsgd.wrapper import LocalSGD

PREFIX = "localsgd"
_MARK = "__localsgd_param__"  # (mark, role, parameter index): where a parameter-like tensor was


def _param_like(tensor: Any, shard: torch.Tensor) -> bool:
    return torch.is_tensor(tensor) and tensor.shape == shard.shape and tensor.dtype.is_floating_point


def _split(engine_state: dict[str, Any], names: list[str], shards: list[torch.Tensor]) -> tuple[dict, dict]:
    """The engine's state as (parameter-like local tensors keyed "role.name", the rest) with each
    parameter-like tensor replaced by a mark."""
    state = dict(engine_state)
    tensors: dict[str, torch.Tensor] = {}

    def take(role: str, i: int, tensor: torch.Tensor) -> tuple[str, str, int]:
        tensors[f"{role}.{names[i]}"] = tensor
        return (_MARK, role, i)

    if "outer" in state:
        outer = dict(state["outer"])
        outer["anchor"] = [take("anchor", i, a) for i, a in enumerate(outer["anchor"])]
        optimizer = dict(outer["optimizer"])
        optimizer["state"] = {
            i: {
                key: take(f"outer_{key}", i, value) if _param_like(value, shards[i]) else value
                for key, value in per_param.items()
            }
            for i, per_param in optimizer["state"].items()
        }
        outer["optimizer"] = optimizer
        state["outer"] = outer
    if state.get("delayed") is not None:
        delayed = dict(state["delayed"])
        (snapshot,) = delayed["snapshots"]  # one worker per process
        delayed["snapshots"] = [[take("snapshot", i, s) for i, s in enumerate(snapshot)]]
        state["delayed"] = delayed
    return tensors, state


def _join(value: Any, tensors: dict[str, torch.Tensor], names: list[str]) -> Any:
    """``_split`` undone: each mark replaced by its loaded tensor (this rank's shard)."""
    if isinstance(value, tuple) and len(value) == 3 and value[0] == _MARK:
        _, role, i = value
        return local(tensors[f"{role}.{names[i]}"])
    if isinstance(value, dict):
        return {k: _join(v, tensors, names) for k, v in value.items()}
    if isinstance(value, list):
        return [_join(v, tensors, names) for v in value]
    return value


def _layout(optimizer: LocalSGD) -> dict[str, int]:
    """K workers x S ranks each."""
    workers = optimizer.comm.workers
    return {"workers": workers, "shards": dist.get_world_size() // workers}


def _check(optimizer: object) -> LocalSGD:
    if not isinstance(optimizer, LocalSGD):
        raise TypeError(f"optimizer must be a localsgd.LocalSGD, got {type(optimizer).__name__}")
    return optimizer


def save(path: str | Path, model: nn.Module, optimizer: LocalSGD) -> None:
    """Write the model, the inner optimizer and localsgd's state to the DCP checkpoint ``path``
    (a new folder). Collective: every rank calls it."""
    from torch.distributed.checkpoint import save as dcp_save

    names, by_name = _names(model)
    shards = [local(p) for p in by_name.values()]
    tensors, rest = _split(Engine.state_dict(_check(optimizer)), names, shards)
    state = _template(model, optimizer, rest)
    for key, tensor in tensors.items():
        state[_worker(optimizer)][PREFIX][key] = _like(by_name[key.split(".", 1)[1]], tensor)
    dcp_save(state, checkpoint_id=str(path))


def load(path: str | Path, model: nn.Module, optimizer: LocalSGD) -> None:
    """Restore what ``save`` wrote into ``model`` and ``optimizer`` (built as for a fresh run with
    the same K, and any number of shards S; compression residuals and fragments' states need the
    S they were saved at). Collective: every rank calls it."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint import load as dcp_load
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    _check(optimizer)
    path = Path(path)
    if not (path / ".metadata").is_file():
        raise ValueError(f"{path}: not a complete DCP checkpoint (no .metadata: the save did not finish)")
    saved = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    if f"{PREFIX}.rank0" not in saved:
        raise ValueError(f"{path}: not a localsgd checkpoint (no localsgd state)")
    names, by_name = _names(model)
    worker = _worker(optimizer)
    mine = f"{PREFIX}.rank{dist.get_rank()}"
    state = _template(model, optimizer, None)
    if mine not in saved:  # more ranks now than then: the per-rank state of a rank that was there
        state[f"{PREFIX}.rank0"] = state.pop(mine)
        mine = f"{PREFIX}.rank0"
    own = f"{worker}.{PREFIX}."
    if not any(key.startswith(f"{worker}.") for key in saved):
        raise ValueError(f"{path}: holds no state for {worker} (written with fewer workers K?)")
    tensors: dict[str, torch.Tensor] = {}
    for key in saved:
        if key.startswith(own):
            role_name = key.removeprefix(own)
            name = role_name.split(".", 1)[1]
            if name not in by_name:
                raise ValueError(
                    f"{path}: holds localsgd state for parameter {name!r}, which this model lacks"
                )
            tensors[role_name] = state[worker][PREFIX][role_name] = torch.empty_like(by_name[name])
    dcp_load(state, checkpoint_id=str(path))
    rest = _from_bytes(state[mine])
    written, now = state[f"{PREFIX}.layout"], _layout(optimizer)
    if written["workers"] != now["workers"]:
        raise ValueError(
            f"{path}: written by K = {written['workers']} workers, loaded by K = {now['workers']}"
        )
    if written != now:
        per_rank = {"compression": "compression residuals", "streaming": "fragments' states"}
        kept = next((what for key, what in per_rank.items() if key in rest), None)
        if kept is not None:
            raise ValueError(
                f"{path}: written with S = {written['shards']} ranks per worker, loaded with "
                f"S = {now['shards']}; {kept} load only at the S they were saved at"
            )
        rest["stats"] = {level: {**s, "bytes": 0, "seconds": 0.0} for level, s in rest["stats"].items()}
    set_model_state_dict(model, state[worker]["model"])
    set_optimizer_state_dict(model, optimizer.optimizer, state[worker]["optimizer"])
    Engine.load_state_dict(optimizer, _join(rest, tensors, names))


def _names(model: nn.Module) -> tuple[list[str], dict[str, torch.Tensor]]:
    by_name = dict(model.named_parameters())
    return list(by_name), by_name


def _worker(optimizer: LocalSGD) -> str:
    return f"worker{optimizer.comm.local_workers[0]}"


def _template(model: nn.Module, optimizer: LocalSGD, rest: dict[str, Any] | None) -> dict[str, Any]:
    """What this rank saves (``rest``: its per-rank state) or loads into (``rest`` None): its
    worker's model and inner optimizer under the worker's name, since the K workers' models
    differ between averages and DCP would keep one copy of tensors saved under one name."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    return {
        _worker(optimizer): {
            "model": get_model_state_dict(model),
            "optimizer": get_optimizer_state_dict(model, optimizer.optimizer),
            PREFIX: {},
        },
        f"{PREFIX}.layout": _layout(optimizer),
        f"{PREFIX}.rank{dist.get_rank()}": None if rest is None else _to_bytes(rest),
    }


def _like(param: torch.Tensor, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` (this rank's shard) as a DTensor laid out like ``param``."""
    from torch.distributed.tensor import DTensor

    if not isinstance(param, DTensor):
        return tensor
    return DTensor.from_local(
        tensor, param.device_mesh, param.placements, run_check=False, shape=param.shape, stride=param.stride()
    )


def _to_bytes(value: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def _from_bytes(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), weights_only=False)
