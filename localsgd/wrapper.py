"""``LocalSGD``: the optimizer wrapper a user puts into their own training loop (one worker per
process, under torchrun)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn
from typing_extensions import Unpack

from localsgd.comm import Communicator, DistCommunicator, SimCommunicator
from localsgd.engine import Engine
from localsgd.policy import Policy, PolicyKeywords, as_policy
from localsgd.schedule import Schedule
from localsgd.sharding import is_sharded, replica_communicator

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh


def default_communicator(workers_per_block: int | None = None) -> Communicator:
    """torch.distributed's world if it is initialized; a lone worker (K = 1) if this process was
    not started as one of several workers."""
    if dist.is_available() and dist.is_initialized():
        return DistCommunicator(workers_per_block=workers_per_block)
    world = os.environ.get("WORLD_SIZE", "1")
    if world != "1":
        raise RuntimeError(
            f"WORLD_SIZE={world}: this process is one of several workers, but torch.distributed "
            "is not initialized; call torch.distributed.init_process_group() before LocalSGD"
        )
    return SimCommunicator(1, workers_per_block)


class LocalSGD(Engine, torch.optim.Optimizer):
    """Local SGD around any optimizer: call it exactly like the optimizer it wraps.

    >>> opt = LocalSGD(torch.optim.SGD(model.parameters(), lr=0.1), model, Schedule.local(16))
    >>> loss_fn(model(x), y).backward(); opt.step(); opt.zero_grad()

    It shares ``param_groups`` and ``state`` with the wrapped optimizer, so learning-rate
    schedulers and ``GradScaler`` can be given the wrapper. See ``Policy`` for the policies.

    Args:
        optimizer: the local optimizer of this worker.
        model: this worker's model (plain, ``DistributedDataParallel``, or sharded over its
            group's ranks with FSDP2's ``fully_shard``: then pass ``mesh``); all of its parameters
            are averaged, whether or not they have a gradient.
        schedule: when to average (``Schedule.local``, ``.post_local``, ``.hierarchical``).
        comm: default: all ranks of torch.distributed's world, or a single worker if there is none.
        mesh: for a sharded model, the 2-D device mesh ("replicate", "shard") = (K, S) whose
            ``mesh["shard"]`` the model is sharded over: a worker is a group of S ranks, and
            this rank averages its shards with the K − 1 ranks holding them in the other groups
            (``localsgd.sharding``).
        workers_per_block: K' for hierarchical schedules (default: torchrun's LOCAL_WORLD_SIZE).
        grad_scaler: with mixed precision, pass the ``GradScaler`` here and call ``opt.step()``
            (not ``scaler.step(opt)``): a step the scaler skips on one worker must still count,
            or the workers' schedules would drift apart.
        sync_initial: copy worker 0's parameters and buffers to every worker at construction.
        policy, **policy_kwargs: how to average (``localsgd.Policy``), as a record or as its
            fields' keywords: ``outer_optimizer=diloco()`` or ``slowmo()`` (DiLoCo, SlowMo: global
            averages step an anchor with the averaged pseudo-gradient), ``compression="int8"``,
            ``overlap_steps=τ``, ``max_grad_norm=c`` (clip the gradient, in the mini-batch phase
            the averaged one), ``buffers``, ``optimizer_state``, ``bucket_bytes``,
            ``anchor_device``.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        model: nn.Module,
        schedule: Schedule,
        *,
        comm: Communicator | None = None,
        mesh: DeviceMesh | None = None,
        workers_per_block: int | None = None,
        sync_initial: bool = True,
        grad_scaler: torch.amp.GradScaler | None = None,
        policy: Policy | None = None,
        **policy_kwargs: Unpack[PolicyKeywords],
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if mesh is not None:
            if comm is not None or workers_per_block is not None:
                raise ValueError("pass mesh= alone: it defines the workers (comm, workers_per_block)")
            comm = replica_communicator(mesh)
            if mesh["shard"].size() > 1 and not is_sharded(model):
                raise ValueError(
                    f"mesh has S = {mesh['shard'].size()} ranks per worker, but the model is not sharded: "
                    "apply fully_shard(module, mesh=mesh['shard']) to its blocks and to the model first"
                )
        if comm is None:
            comm = default_communicator(workers_per_block)
        elif workers_per_block is not None:
            raise ValueError("pass workers_per_block to the communicator, not next to it")
        if len(comm.local_workers) != 1:
            raise ValueError("LocalSGD holds one worker; use localsgd.Simulator for K in one process")
        self.optimizer = optimizer
        # The torch.optim.Optimizer interface, shared with the wrapped optimizer (no copy):
        # param_groups, defaults and state are properties that read the wrapped optimizer's.
        self._optimizer_step_pre_hooks: dict = {}
        self._optimizer_step_post_hooks: dict = {}
        self._optimizer_state_dict_pre_hooks: dict = {}
        self._optimizer_state_dict_post_hooks: dict = {}
        self._optimizer_load_state_dict_pre_hooks: dict = {}
        self._optimizer_load_state_dict_post_hooks: dict = {}
        Engine.__init__(
            self,
            [model],
            [optimizer],
            comm,
            schedule,
            sync_initial=sync_initial,
            grad_scalers=None if grad_scaler is None else [grad_scaler],
            policy=as_policy(policy, policy_kwargs),
        )

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self.optimizer.state

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        """The wrapped optimizer's (its ``load_state_dict`` replaces the list; this follows it)."""
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, groups: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = groups

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, defaults: dict[str, Any]) -> None:
        self.optimizer.defaults = defaults

    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        return Engine.step(self, closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        Engine.zero_grad(self, set_to_none)

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """The wrapped optimizer's state and the wrapper's own (step, schedule, policies, counters)."""
        return {**Engine.state_dict(self), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        Engine.load_state_dict(self, state_dict)
        self.optimizer.load_state_dict(state_dict["optimizer"])

    def __repr__(self) -> str:
        return f"LocalSGD({self.schedule}, K={self.comm.workers}, t={self.t}, {self.optimizer!r})"
