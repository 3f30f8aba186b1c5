"""Communicators: how flat buffers are averaged within a level's groups.

Both runtimes speak the same interface. A call passes one flat buffer per worker held by this
process: one under torch.distributed (``DistCommunicator``), K in the in-process simulator
(``SimCommunicator``). Everything above this module is the same code in both runtimes.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from localsgd._validate import check_int
from localsgd.schedule import Level

Wait = Callable[[], None]


@dataclass(frozen=True)
class RoundGroup:
    """Who takes part in a fault-tolerant global round: the ``members`` exchange buffers (worker
    ids, in worker order), the ``contributors`` (a subset) are those whose buffers make the mean."""

    members: tuple[int, ...]
    contributors: tuple[int, ...]


def _check_blocks(workers: int, workers_per_block: int | None) -> None:
    if workers_per_block is None:
        return
    check_int("workers_per_block (K')", workers_per_block, 1)
    if workers % workers_per_block:
        raise ValueError(
            f"workers_per_block (K') = {workers_per_block} must divide the number of workers K = {workers}"
        )


class Communicator(ABC):
    """Averages per-worker flat buffers within the groups of a level.

    Attributes:
        workers: K, the number of workers in all.
        workers_per_block: K', the workers per block (``None`` if there is no block level).
        local_workers: global indices of the workers this process holds, in order.
    """

    workers: int
    workers_per_block: int | None
    local_workers: list[int]
    ordered: bool = True  # sums in worker order (the simulator always does)

    def group_size(self, level: Level) -> int:
        if level is Level.GLOBAL:
            return self.workers
        if self.workers_per_block is None:
            raise ValueError(
                "the schedule has a block level (block_steps, H_b) but no block size is known: "
                "pass workers_per_block (K') or run under torchrun, which sets LOCAL_WORLD_SIZE"
            )
        return self.workers_per_block

    def prepare(self, levels: tuple[Level, ...], collective: bool) -> None:
        """Check that every level can be served; with ``collective``, also set up what all
        workers must create together (process groups). Called by every worker at the same point."""
        for level in levels:
            self.group_size(level)

    # --- rounds of a fault-tolerant global level (localsgd.ft; replayed by ReplayCommunicator) ---

    fault_tolerant: bool = False  # global rounds go through begin_round / end_round

    def join(self, engine: Any, descriptions: list[dict[str, Any]]) -> str | None:
        """Enter the run at the engine's construction (fault-tolerant communicators): ``None`` at
        its start, else the kind of round under way, which the engine then completes."""
        raise NotImplementedError(f"{type(self).__name__} has no fault-tolerant rounds")

    def shutdown(self) -> None:  # noqa: B027 (most communicators have nothing to stop)
        """Leave the run (a fault-tolerant worker stops its servers); nothing for the others."""

    def begin_round(self, kind: str, t: int) -> list[tuple[int, int]]:
        """Before a global round of ``kind`` ("gradients", "parameters" or "average") at step ``t``:
        who takes part. Returns (healer, source) pairs of local workers whose state the engine
        copies first."""
        return []

    def end_round(self) -> bool:
        """After the round: whether this worker keeps its result (else the engine undoes it)."""
        return True

    def round_group(self, level: Level) -> RoundGroup | None:
        """The open fault-tolerant round's members and contributors at ``level``; ``None``: every
        worker of its group takes part (and the exchanges of ``start_exchange`` and ``gather``
        are among the members only, each passing the local workers that are members)."""
        return None

    @abstractmethod
    def all_reduce_mean_(self, level: Level, flats: list[torch.Tensor]) -> Wait:
        """Start replacing each worker's buffer by the mean over its group; the result is ready
        once the returned function has been called."""

    @abstractmethod
    def broadcast_(self, flats: list[torch.Tensor]) -> Wait:
        """Start copying worker 0's buffer into every worker's buffer."""

    @abstractmethod
    def all_gather_bytes(self, data: list[bytes]) -> list[bytes]:
        """Every worker's bytes, in worker order (used for cross-worker checks, not training)."""

    @abstractmethod
    def start_exchange(
        self, level: Level, chunks: list[list[torch.Tensor]]
    ) -> Callable[[], list[list[torch.Tensor]]]:
        """Start an all-to-all within each group of ``level``: ``chunks[k][j]`` (local worker k's
        chunk for its group's j-th worker, all the same size) goes to that worker. The returned
        function waits and returns, per local worker, the chunks it received, in group order."""

    @abstractmethod
    def gather(self, level: Level, items: list[torch.Tensor]) -> list[list[torch.Tensor]]:
        """All-gather within each group of ``level`` (tensors of one size): per local worker, every
        group member's tensor in group order."""


def _mean_in_order_(out: torch.Tensor, rows: list[torch.Tensor]) -> None:
    """``out`` = the mean of ``rows``, summed strictly in worker order (rows[0] + rows[1] + ...)."""
    if out is not rows[0]:
        out.copy_(rows[0])
    for row in rows[1:]:
        out.add_(row)
    out.div_(len(rows))


class SimCommunicator(Communicator):
    """K workers inside one process: a level's mean is a mean over rows of a stacked buffer."""

    def __init__(self, workers: int, workers_per_block: int | None = None) -> None:
        check_int("workers (K)", workers, 1)
        _check_blocks(workers, workers_per_block)
        self.workers = workers
        self.workers_per_block = workers_per_block
        self.local_workers = list(range(workers))

    def all_reduce_mean_(self, level: Level, flats: list[torch.Tensor]) -> Wait:
        n = self.group_size(level)
        if n > 1:
            for start in range(0, self.workers, n):
                group = flats[start : start + n]
                _mean_in_order_(group[0], group)  # in place in the first row, then copied out
                for flat in group[1:]:
                    flat.copy_(group[0])
        return _done

    def broadcast_(self, flats: list[torch.Tensor]) -> Wait:
        for flat in flats[1:]:
            flat.copy_(flats[0])
        return _done

    def all_gather_bytes(self, data: list[bytes]) -> list[bytes]:
        return list(data)

    def start_exchange(
        self, level: Level, chunks: list[list[torch.Tensor]]
    ) -> Callable[[], list[list[torch.Tensor]]]:
        n = self.group_size(level)
        received = [[chunks[k - k % n + i][k % n] for i in range(n)] for k in range(self.workers)]
        return lambda: received

    def gather(self, level: Level, items: list[torch.Tensor]) -> list[list[torch.Tensor]]:
        n = self.group_size(level)
        return [list(items[k - k % n : k - k % n + n]) for k in range(self.workers)]


def _done() -> None:
    return None


class DistCommunicator(Communicator):
    """One worker per process over torch.distributed (gloo on CPU, NCCL on GPU).

    Args:
        group: the process group of all K workers (default: the whole world).
        workers_per_block: K'. Blocks are consecutive ranks of ``group``. Default: torchrun's
            ``LOCAL_WORLD_SIZE`` (the workers of one node), if set and ``group`` is the world.
        ordered: average by all-gather and a sum in worker order, as the simulator does, instead
            of the backend's all-reduce: bitwise the simulator's result, for n/2 times the
            traffic of a ring all-reduce. Training amplifies rounding differences quickly, so this
            is what makes a torchrun run reproduce a simulator run beyond the first few steps.
    """

    def __init__(
        self,
        group: dist.ProcessGroup | None = None,
        workers_per_block: int | None = None,
        ordered: bool = False,
    ) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "torch.distributed is not initialized: call dist.init_process_group() first "
                "(or use localsgd.Simulator to run K workers in one process)"
            )
        self.group = group if group is not None else dist.group.WORLD
        self.workers = dist.get_world_size(self.group)
        self.rank = dist.get_rank(self.group)
        self.local_workers = [self.rank]
        if workers_per_block is None and group is None and "LOCAL_WORLD_SIZE" in os.environ:
            workers_per_block = int(os.environ["LOCAL_WORLD_SIZE"])
        _check_blocks(self.workers, workers_per_block)
        self.workers_per_block = workers_per_block
        self._block_group: dist.ProcessGroup | None = None
        self.ordered = ordered

    def prepare(self, levels: tuple[Level, ...], collective: bool) -> None:
        super().prepare(levels, collective)
        if collective:
            for level in levels:
                self.process_group(level)

    def process_group(self, level: Level) -> dist.ProcessGroup:
        if level is Level.GLOBAL:
            return self.group
        if self._block_group is None:
            n = self.group_size(level)
            ranks = dist.get_process_group_ranks(self.group)
            blocks = [ranks[i : i + n] for i in range(0, self.workers, n)]
            # Every rank must create every subgroup, in the same order.
            self._block_group, _ = dist.new_subgroups_by_enumeration(blocks)
        return self._block_group

    def all_reduce_mean_(self, level: Level, flats: list[torch.Tensor]) -> Wait:
        (flat,) = flats
        n = self.group_size(level)
        if n == 1:
            return _done
        group = self.process_group(level)
        if self.ordered:
            rows = [torch.empty_like(flat) for _ in range(n)]
            work = dist.all_gather(rows, flat, group=group, async_op=True)

            def wait_ordered() -> None:
                work.wait()
                _mean_in_order_(flat, rows)

            return wait_ordered
        work = dist.all_reduce(flat, group=group, async_op=True)

        def wait() -> None:
            work.wait()
            flat.div_(n)

        return wait

    def broadcast_(self, flats: list[torch.Tensor]) -> Wait:
        (flat,) = flats
        if self.workers == 1:
            return _done
        src = dist.get_global_rank(self.group, 0)
        work = dist.broadcast(flat, src=src, group=self.group, async_op=True)
        return work.wait

    def start_exchange(
        self, level: Level, chunks: list[list[torch.Tensor]]
    ) -> Callable[[], list[list[torch.Tensor]]]:
        (mine,) = chunks
        send = torch.cat(mine)
        received = torch.empty_like(send)
        work = dist.all_to_all_single(received, send, group=self.process_group(level), async_op=True)

        def wait() -> list[list[torch.Tensor]]:
            work.wait()
            return [list(received.view(len(mine), -1).unbind(0))]

        return wait

    def gather(self, level: Level, items: list[torch.Tensor]) -> list[list[torch.Tensor]]:
        (mine,) = items
        out = [torch.empty_like(mine) for _ in range(self.group_size(level))]
        dist.all_gather(out, mine, group=self.process_group(level))
        return [out]

    def all_gather_bytes(self, data: list[bytes]) -> list[bytes]:
        (mine,) = data
        nccl = dist.get_backend(self.group) == "nccl"
        device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        length = torch.tensor([len(mine)], dtype=torch.int64, device=device)
        lengths = [torch.zeros_like(length) for _ in range(self.workers)]
        dist.all_gather(lengths, length, group=self.group)
        size = int(max(x.item() for x in lengths))
        buf = torch.zeros(size, dtype=torch.uint8)
        if mine:
            buf[: len(mine)] = torch.frombuffer(bytearray(mine), dtype=torch.uint8)
        buf = buf.to(device)
        bufs = [torch.empty_like(buf) for _ in range(self.workers)]
        dist.all_gather(bufs, buf, group=self.group)
        return [b[: int(n.item())].cpu().numpy().tobytes() for b, n in zip(bufs, lengths, strict=True)]


def init_process_group(backend: str | None = None, timeout: timedelta | None = None) -> None:
    """``torch.distributed.init_process_group`` from torchrun's environment, safe across restarts.

    When torchrun restarts a failed worker group (``--max-restarts``), the new workers can meet in a
    rendezvous store that still holds the previous attempt's keys, and gloo may then connect to the
    address of a dead process ("Connection refused"). Here every restart attempt
    (``TORCHELASTIC_RESTART_COUNT``) uses its own key prefix in the store.
    """
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    kwargs = {} if timeout is None else {"timeout": timeout}
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if attempt == 0:
        dist.init_process_group(backend, **kwargs)
        return
    store, rank, world = next(dist.rendezvous("env://", **kwargs))
    store = dist.PrefixStore(f"localsgd/attempt-{attempt}/", store)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, **kwargs)
