"""How tensors are averaged: flattened into a few buffers (per dtype and device, bucketed), reduced
over a communicator, and copied back into the tensors' existing storage (never rebinding ``.data``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from localsgd.comm import Communicator, Wait
from localsgd.schedule import Level

DEFAULT_BUCKET_BYTES = 25 * 2**20  # as DistributedDataParallel's default bucket_cap_mb


@dataclass
class _Bucket:
    indices: list[int]
    numels: list[int]
    dtype: torch.dtype
    device: torch.device
    flats: list[torch.Tensor] = field(default_factory=list)  # one per worker of this process

    @property
    def nbytes(self) -> int:
        return sum(self.numels) * self.dtype.itemsize


class FlatAverager:
    """Averages (or broadcasts) lists of tensors over a communicator with few collectives.

    Tensors are grouped by (dtype, device), in order of appearance, and each group is cut into
    buckets of at most ``bucket_bytes`` (a larger tensor gets a bucket of its own). The flat buffers
    are allocated once per tensor layout and reused. All buckets are started before the first is
    waited for, so copying back overlaps with communication.
    """

    def __init__(self, comm: Communicator, bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> None:
        if isinstance(bucket_bytes, bool) or not isinstance(bucket_bytes, int) or bucket_bytes < 1:
            raise ValueError(f"bucket_bytes must be a positive integer, got {bucket_bytes!r}")
        self.comm = comm
        self.bucket_bytes = bucket_bytes
        self._plans: dict[tuple, list[_Bucket]] = {}

    def _plan(self, tensors: list[torch.Tensor]) -> list[_Bucket]:
        key = tuple((t.dtype, t.device, t.numel()) for t in tensors)
        plan = self._plans.get(key)
        if plan is None:
            plan = []
            open_bucket: dict[tuple, _Bucket] = {}
            for i, t in enumerate(tensors):
                group = (t.dtype, t.device)
                b = open_bucket.get(group)
                if b is None or (b.numels and b.nbytes + t.numel() * t.dtype.itemsize > self.bucket_bytes):
                    b = open_bucket[group] = _Bucket([], [], t.dtype, t.device)
                    plan.append(b)
                b.indices.append(i)
                b.numels.append(t.numel())
            for b in plan:
                b.flats = [
                    torch.empty(sum(b.numels), dtype=b.dtype, device=b.device)
                    for _ in self.comm.local_workers
                ]
            self._plans[key] = plan
        return plan

    @torch.no_grad()
    def _run(self, tensors_per_worker: list[list[torch.Tensor]], start) -> int:
        if not tensors_per_worker[0]:
            return 0
        plan = self._plan(tensors_per_worker[0])
        started: list[tuple[_Bucket, Wait]] = []
        for b in plan:
            for flat, ts in zip(b.flats, tensors_per_worker, strict=True):
                torch.cat([ts[i].reshape(-1) for i in b.indices], out=flat)
            started.append((b, start(b.flats)))
        for b, wait in started:
            wait()
            for flat, ts in zip(b.flats, tensors_per_worker, strict=True):
                for i, v in zip(b.indices, flat.split(b.numels), strict=True):
                    ts[i].copy_(v.view(ts[i].shape))
        return sum(b.nbytes for b in plan)

    def average_(self, level: Level, tensors_per_worker: list[list[torch.Tensor]]) -> int:
        """Replace every tensor by its mean over the workers of its group at ``level``.

        ``tensors_per_worker[k]`` are the tensors of this process's k-th worker; every worker
        passes tensors of the same dtypes and sizes in the same order. Returns the bytes each
        worker contributed (the payload of the collectives).
        """
        return self._run(tensors_per_worker, lambda flats: self.comm.all_reduce_mean_(level, flats))

    def broadcast_(self, tensors_per_worker: list[list[torch.Tensor]]) -> int:
        """Copy worker 0's tensors into every worker's tensors."""
        return self._run(tensors_per_worker, self.comm.broadcast_)
