"""How tensors are averaged: laid out in a few flat buffers (per dtype and device, bucketed) and
reduced over a communicator.

Two paths, same result:

- **Packed** (``FlatAverager.pack_``): the tensors' storage is moved into persistent flat buffers,
  each tensor a contiguous view (``.data`` rebound once; the same ``Parameter`` objects, so
  optimizers and hooks are unaffected). Averaging them is then one in-place collective per bucket
  with no copies. The engine packs every worker's parameters, and its gradient windows
  (``localsgd.gradients``).
- **Copied**: any other tensors (buffers, optimizer state, gradients that are not windows) are
  copied into reusable flat buffers, reduced, and copied back into their own storage.

A packed tensor whose ``.data`` was replaced later (``model.to(...)``, a user's ``p.data = ...``)
is noticed at the next average (by its address) and packed again.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from localsgd._validate import is_int
from localsgd.comm import Communicator, Wait
from localsgd.compression import CompressedMean
from localsgd.schedule import Level

DEFAULT_BUCKET_BYTES = 25 * 2**20  # as DistributedDataParallel's default bucket_cap_mb
ALIGN_BYTES = 64  # packed tensors start on cache-line boundaries
PACKED_BUCKET_BYTES = 2**62  # packed tensors: one buffer per (dtype, device)


def _is_dense(t: torch.Tensor) -> bool:
    """Whether ``t`` covers exactly ``t.numel()`` consecutive elements (any dimension order)."""
    expected = 1
    for d in sorted(range(t.dim()), key=t.stride):
        if t.size(d) == 1:
            continue
        if t.stride(d) != expected:
            return False
        expected *= t.size(d)
    return True


def _view(flat: torch.Tensor, offset: int, like: torch.Tensor) -> torch.Tensor:
    """The ``like``-shaped contiguous window of ``flat`` at ``offset``.

    Always row-major, whatever ``like``'s strides: every worker must lay a tensor out in the same
    element order, and only the logical order is the same on every worker by construction.
    """
    return flat[offset : offset + like.numel()].view(like.shape)


def _overlap(tensors: list[torch.Tensor]) -> bool:
    """Whether two of these dense tensors share memory (views of each other, a tensor twice)."""
    spans = sorted((t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in tensors if t.numel())
    return any(end > start for (_, end), (start, _) in itertools.pairwise(spans))


def _nothing() -> None:
    return None


# (bucket index, its flat buffers) -> (wait, bytes): a compressed mean of one packed bucket
PackedMean = Callable[[int, list[torch.Tensor]], tuple[Wait, int]]


def _copy_(dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
    torch._foreach_copy_(dst, src)


@dataclass
class _Bucket:
    indices: list[int]
    numels: list[int]
    offsets: list[int]
    dtype: torch.dtype
    device: torch.device
    flats: list[torch.Tensor] = field(default_factory=list)  # one per worker of this process
    views: list[list[torch.Tensor]] = field(default_factory=list)  # per worker, per tensor

    @property
    def nbytes(self) -> int:
        """Payload bytes (without alignment padding)."""
        return sum(self.numels) * self.dtype.itemsize

    def zero_gaps_(self) -> None:
        """Zero the alignment padding between the tensors (it holds no tensor, but a compressed
        mean encodes the whole buffer, which must not depend on what the padding held before)."""
        ends = [o + n for o, n in zip(self.offsets, self.numels, strict=True)]
        for end, start in zip(ends, self.offsets[1:], strict=False):
            if start > end:
                for flat in self.flats:
                    flat[end:start].zero_()


def _layout(tensors: list[torch.Tensor], bucket_bytes: int, align_bytes: int) -> list[_Bucket]:
    """Group tensors by (dtype, device) in order of appearance; cut each group into buckets of at
    most ``bucket_bytes`` (a larger tensor gets a bucket of its own)."""
    plan: list[_Bucket] = []
    open_bucket: dict[tuple, _Bucket] = {}
    for i, t in enumerate(tensors):
        group = (t.dtype, t.device)
        b = open_bucket.get(group)
        if b is None or (b.numels and b.nbytes + t.numel() * t.dtype.itemsize > bucket_bytes):
            b = open_bucket[group] = _Bucket([], [], [], t.dtype, t.device)
            plan.append(b)
        align = max(1, align_bytes // t.dtype.itemsize)
        end = b.offsets[-1] + b.numels[-1] if b.numels else 0
        b.indices.append(i)
        b.offsets.append(-(-end // align) * align)
        b.numels.append(t.numel())
    return plan


def _allocate(plan: list[_Bucket], like: list[list[torch.Tensor]]) -> None:
    """One zeroed flat buffer per bucket and worker, and each tensor's window in it."""
    for b in plan:
        size = b.offsets[-1] + b.numels[-1]
        b.flats = [torch.zeros(size, dtype=b.dtype, device=b.device) for _ in like]
        b.views = [
            [_view(flat, off, ts[i]) for i, off in zip(b.indices, b.offsets, strict=True)]
            for flat, ts in zip(b.flats, like, strict=True)
        ]


@dataclass
class _Pack:
    tensors: list[list[torch.Tensor]]  # per worker: the packed tensors themselves
    plan: list[_Bucket]
    addresses: list[list[int]]  # per worker: where each tensor must still live

    def holds(self, tensors_per_worker: list[list[torch.Tensor]]) -> bool:
        """Whether the lists start with exactly these tensors (same objects)."""
        n = len(self.tensors[0])
        return all(
            len(ts) >= n and all(a is b for a, b in zip(ts[:n], mine, strict=False))
            for ts, mine in zip(tensors_per_worker, self.tensors, strict=True)
        )

    def in_place(self) -> bool:
        """Whether every packed tensor still lives in its flat buffer."""
        return all(
            [t.data_ptr() for t in ts] == addr for ts, addr in zip(self.tensors, self.addresses, strict=True)
        )


def check_bucket_bytes(bucket_bytes: object) -> None:
    if not is_int(bucket_bytes, 1):
        raise ValueError(f"bucket_bytes must be a positive integer, got {bucket_bytes!r}")


class FlatAverager:
    """Averages (or broadcasts) lists of tensors over a communicator with few collectives.

    Tensors are grouped by (dtype, device), in order of appearance, and each group is cut into
    buckets of at most ``bucket_bytes``. Flat buffers are allocated once per tensor layout and
    reused. All buckets are started before the first is waited for, so copying back overlaps with
    communication. Tensors packed with ``pack_`` are averaged where they live, without copies, in
    one buffer per (dtype, device) (``bucket_bytes`` applies to copied tensors).

    With ``keep_buffers=False`` the copied tensors' flat buffers are freed after each average and
    allocated again at the next (for sharded models, whose memory is the point: between averages
    nothing is held; during one, a copy of this rank's shards).
    """

    def __init__(
        self, comm: Communicator, bucket_bytes: int = DEFAULT_BUCKET_BYTES, keep_buffers: bool = True
    ) -> None:
        check_bucket_bytes(bucket_bytes)
        self.comm = comm
        self.bucket_bytes = bucket_bytes
        self.keep_buffers = keep_buffers
        self._plans: dict[tuple, list[_Bucket]] = {}
        self._pack: _Pack | None = None

    # --- packing -----------------------------------------------------------------------------

    @torch.no_grad()
    def pack_(self, tensors_per_worker: list[list[torch.Tensor]]) -> bool:
        """Move each worker's tensors into flat buffers (each becomes a contiguous view of its own
        shape, by rebinding ``.data``), so that averaging a list that starts with them copies
        nothing. A channels_last weight becomes contiguous (see docs/design.md).

        Replaces an earlier pack. Returns False (and packs nothing) if a tensor is not dense or
        shares memory with another tensor of the list.
        """
        self._pack = None
        first = tensors_per_worker[0]
        if not first:
            return False
        for ts in tensors_per_worker:
            if not all(_is_dense(t) for t in ts) or _overlap(ts):
                return False
        # One buffer per (dtype, device): with no copies to overlap, one collective is cheapest
        # (gloo, 100 MB at K = 4 and 8: 5-7% faster than 25 MB buckets).
        plan = _layout(first, PACKED_BUCKET_BYTES, ALIGN_BYTES)
        _allocate(plan, tensors_per_worker)
        for b in plan:
            for views, ts in zip(b.views, tensors_per_worker, strict=True):
                for i, view in zip(b.indices, views, strict=True):
                    view.copy_(ts[i])
                    ts[i].data = view
        addresses = [[t.data_ptr() for t in ts] for ts in tensors_per_worker]
        self._pack = _Pack([list(ts) for ts in tensors_per_worker], plan, addresses)
        return True

    def packed(self, tensors_per_worker: list[list[torch.Tensor]]) -> bool:
        """Whether the lists start with the packed tensors and these still live in the flat buffers."""
        return self._pack is not None and self._pack.holds(tensors_per_worker) and self._pack.in_place()

    # --- averaging ---------------------------------------------------------------------------

    def _plan(self, tensors_per_worker: list[list[torch.Tensor]]) -> list[_Bucket]:
        first = tensors_per_worker[0]
        key = tuple((t.dtype, t.device, t.shape) for t in first)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = _layout(first, self.bucket_bytes, 0)
        if not plan[0].flats:
            _allocate(plan, tensors_per_worker)
        return plan

    def _run(
        self,
        tensors_per_worker: list[list[torch.Tensor]],
        start: Callable[[list[torch.Tensor]], Wait],
        packed_mean: PackedMean | None = None,
    ) -> int:
        finish, nbytes = self._start(tensors_per_worker, start, packed_mean)
        finish()
        return nbytes

    @torch.no_grad()
    def _start(
        self,
        tensors_per_worker: list[list[torch.Tensor]],
        start: Callable[[list[torch.Tensor]], Wait],
        packed_mean: PackedMean | None = None,
    ) -> tuple[Wait, int]:
        """Start every bucket's collective; the results are in place once the returned function
        has been called. Also returns the bytes each worker contributed."""
        if not tensors_per_worker[0]:
            return _nothing, 0
        packed: list[_Bucket] = []
        pack = self._pack
        if pack is not None and pack.holds(tensors_per_worker):
            if not pack.in_place():  # someone replaced .data since: move it into the buffers again
                self.pack_(pack.tensors)
                pack = self._pack
            if pack is not None:
                packed = pack.plan
                n = len(pack.tensors[0])
                tensors_per_worker = [ts[n:] for ts in tensors_per_worker]
        copied = self._plan(tensors_per_worker) if tensors_per_worker[0] else []
        # nothing to send (a rank's empty part of a fragment; the same on every rank it averages with)
        packed, copied = [b for b in packed if b.nbytes], [b for b in copied if b.nbytes]
        compressed_bytes = 0
        started: list[tuple[_Bucket, Wait, bool]] = []
        if packed_mean is not None:  # the packed buffers go through the compressed mean
            for i, b in enumerate(packed):
                b.zero_gaps_()
                wait, nbytes = packed_mean(i, b.flats)
                started.append((b, wait, False))
                compressed_bytes += nbytes
            packed = []
        started += [(b, start(b.flats), False) for b in packed]
        for b in copied:
            for views, ts in zip(b.views, tensors_per_worker, strict=True):
                _copy_(views, [ts[i] for i in b.indices])
            started.append((b, start(b.flats), True))

        @torch.no_grad()
        def finish() -> None:
            for b, wait, copy_back in started:
                wait()
                if copy_back:
                    for views, ts in zip(b.views, tensors_per_worker, strict=True):
                        _copy_([ts[i] for i in b.indices], views)
                    if not self.keep_buffers:
                        b.flats, b.views = [], []

        return finish, compressed_bytes + sum(b.nbytes for b in [*packed, *copied])

    def average_(
        self,
        level: Level,
        tensors_per_worker: list[list[torch.Tensor]],
        compressed: CompressedMean | None = None,
    ) -> int:
        """Replace every tensor by its mean over the workers of its group at ``level``.

        ``tensors_per_worker[k]`` are the tensors of this process's k-th worker; every worker
        passes tensors of the same dtypes and sizes in the same order. With ``compressed``, the
        packed tensors (the parameters) are averaged through it, the others exactly. Returns the
        bytes each worker contributed (the payload of the collectives).
        """
        finish, nbytes = self.start_average_(level, tensors_per_worker, compressed)
        finish()
        return nbytes

    def start_average_(
        self,
        level: Level,
        tensors_per_worker: list[list[torch.Tensor]],
        compressed: CompressedMean | None = None,
    ) -> tuple[Wait, int]:
        """``average_`` without waiting: the means are in place once the returned function has
        been called (meanwhile the tensors must not be touched). Also returns the bytes."""
        packed_mean = None
        if compressed is not None:

            def packed_mean(index: int, flats: list[torch.Tensor]) -> tuple[Wait, int]:
                return compressed.start_mean_(self.comm, level, flats, key=index)

        return self._start(
            tensors_per_worker, lambda flats: self.comm.all_reduce_mean_(level, flats), packed_mean
        )

    def broadcast_(self, tensors_per_worker: list[list[torch.Tensor]]) -> int:
        """Copy worker 0's tensors into every worker's tensors."""
        return self._run(tensors_per_worker, self.comm.broadcast_)
