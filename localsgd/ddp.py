"""DistributedDataParallel under the engine: DDP's own all-reduce (overlapped with backward) does a
step's global gradient average, and is switched off for every other step (what ``no_sync()``
does), so local steps communicate nothing."""

from __future__ import annotations

from collections.abc import Sequence

import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from localsgd.comm import Communicator, DistCommunicator
from localsgd.schedule import Level


class DDPArming:
    """The DDP wrappers among the workers' models (``None`` where a model is plain)."""

    def __init__(self, models: Sequence[nn.Module], comm: Communicator, buffers: str) -> None:
        self.wrappers = [m if isinstance(m, DistributedDataParallel) else None for m in models]
        self._group_matches = [self._check(d, comm, buffers) for d in self.wrappers]

    @property
    def any(self) -> bool:
        return any(d is not None for d in self.wrappers)

    @staticmethod
    def _check(ddp: DistributedDataParallel | None, comm: Communicator, buffers: str) -> bool:
        if ddp is None:
            return False
        if not isinstance(comm, DistCommunicator):
            raise ValueError("DistributedDataParallel models need torch.distributed, not the simulator")
        # torch 2.13 renamed broadcast_buffers (now a deprecated alias) to forward_sync_buffers
        syncs_buffers = getattr(ddp, "forward_sync_buffers", None)
        if syncs_buffers is None:
            syncs_buffers = ddp.broadcast_buffers
        if syncs_buffers and buffers == "local":
            raise ValueError(
                "DistributedDataParallel overwrites every worker's buffers (BatchNorm statistics) with "
                "rank 0's at each forward, which contradicts buffers='local'; construct it with "
                "forward_sync_buffers=False (torch >= 2.13) or broadcast_buffers=False (older torch)"
            )
        ranks = dist.get_process_group_ranks
        return ranks(ddp.process_group) == ranks(comm.group)

    def syncs(self, level: Level | None) -> bool:
        """Whether DDP's own gradient all-reduce does this level's averaging."""
        return level is Level.GLOBAL and all(self._group_matches) and self.wrappers[0] is not None

    def arm(self, level: Level | None) -> None:
        """Switch DDP's gradient sync on for the next step only if it averages that step's gradients
        (``level``: the gradient level of the next step)."""
        on = self.syncs(level)
        for ddp in self.wrappers:
            if ddp is not None:
                ddp.require_backward_grad_sync = on
