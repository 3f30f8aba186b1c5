"""``Simulator``: K workers in one process, trained with the same schedule and averaging code as
``LocalSGD`` under torch.distributed. On a CPU a plain loop over the replicas is the fastest way
to run them (see docs/design.md)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import nn
from typing_extensions import Unpack

from localsgd.comm import SimCommunicator
from localsgd.engine import Engine
from localsgd.membership import ReplayCommunicator, RoundRecord
from localsgd.policy import Policy, PolicyKeywords, as_policy
from localsgd.schedule import Schedule
from localsgd.sharding import is_sharded


class Replica(NamedTuple):
    """One simulated worker."""

    model: nn.Module
    optimizer: torch.optim.Optimizer


class Simulator(Engine):
    """K workers in one process.

    >>> make_opt = lambda m: torch.optim.SGD(m.parameters(), lr=0.1)
    >>> sim = Simulator(model, make_opt, Schedule.local(4), workers=8)
    >>> for k, (model_k, _) in enumerate(sim.replicas):
    ...     loss_fn(model_k(x[k]), y[k]).backward()
    >>> sim.step(); sim.zero_grad()

    Args:
        model: worker 0's model; workers 1..K-1 get deep copies (the same initial weights).
        optimizer_fn: builds a worker's optimizer from its model.
        schedule: when to average.
        workers: K.
        workers_per_block: K', for hierarchical schedules.
        membership: replay a fault-tolerant run: its global rounds' records, merged
            (``localsgd.membership.merge`` of every worker's records).
        policy, **policy_kwargs: how to average (``localsgd.Policy``), as a record or as its
            fields' keywords (``buffers="average"``, ``outer_optimizer=diloco()``, ...).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer_fn: Callable[[nn.Module], torch.optim.Optimizer],
        schedule: Schedule,
        workers: int,
        *,
        workers_per_block: int | None = None,
        membership: dict[tuple[int, str], RoundRecord] | None = None,
        policy: Policy | None = None,
        **policy_kwargs: Unpack[PolicyKeywords],
    ) -> None:
        if is_sharded(model):
            raise ValueError("sharded (fully_shard) models need torch.distributed, not the simulator")
        if membership is None:
            comm = SimCommunicator(workers, workers_per_block)
        elif workers_per_block is not None:
            raise ValueError(
                "a fault-tolerant run's membership is replayed without blocks (workers_per_block)"
            )
        else:
            comm = ReplayCommunicator(workers, membership)
        models = [model] + [copy.deepcopy(model) for _ in range(workers - 1)]
        optimizers = [optimizer_fn(m) for m in models]
        super().__init__(models, optimizers, comm, schedule, policy=as_policy(policy, policy_kwargs))

    @property
    def replicas(self) -> list[Replica]:
        return [Replica(m, o) for m, o in zip(self.models, self.optimizers, strict=True)]

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue: the engine's state and every worker's model and optimizer."""
        return {
            **super().state_dict(),
            "replicas": [
                {"model": m.state_dict(), "optimizer": o.state_dict()}
                for m, o in zip(self.models, self.optimizers, strict=True)
            ],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if len(state_dict["replicas"]) != len(self.models):
            raise ValueError(
                f"the checkpoint holds {len(state_dict['replicas'])} workers, "
                f"but this simulator has K={len(self.models)}"
            )
        super().load_state_dict(state_dict)
        for m, o, s in zip(self.models, self.optimizers, state_dict["replicas"], strict=True):
            m.load_state_dict(s["model"])
            o.load_state_dict(s["optimizer"])

    def __repr__(self) -> str:
        return f"Simulator({self.schedule}, K={self.comm.workers}, t={self.t})"
