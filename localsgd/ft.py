"""A fault-tolerant global level on torchft: workers may die and (re)join without stopping the others.

Each worker is its own job (a torchft *replica group* of one process) with a worker id k < K.
torchft's lighthouse forms a quorum of the workers alive at each global round, its Manager
reconfigures the process group when the membership changes, and a (re)joining worker receives a
live worker's state over torchft's checkpoint transport. localsgd adds, per round:

- **Membership.** After the quorum, the members exchange one row each (worker id, the worker it
  was healed from, step, kind of round, a digest of the settings). Every member thus knows the
  same list of members and contributors; it is the round's record (``localsgd.membership``).
- **The mean over the contributors**, summed in worker order (``ordered``, the simulator's
  arithmetic; an all-gather) or by the backend's all-reduce; compressed, the two-stage mean of
  ``localsgd.compression`` among the members. A worker healed at this round adds nothing: its
  state is a copy of its source's, which would count twice.
- **Commit or undo.** ``Manager.should_commit`` is this worker's verdict (no error in the round,
  at least ``min_workers`` members). A worker that does not commit undoes the round (the engine
  restores what it saved) and keeps its local work; the next round averages it. A worker that
  missed a round the others committed is behind torchft's step count and heals at its next round.

The engine completes a healer's round as the others do (``Engine._join``), so it leaves the
round equal to them. The core never imports torchft except here, and this module only on use.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from collections.abc import Callable
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import (
    AllgatherOptions,
    AllreduceOptions,
    AllToAllOptions,
    BroadcastOptions,
)

from localsgd._validate import check_int
from localsgd.comm import Communicator, RoundGroup, Wait, _done, _mean_in_order_
from localsgd.membership import KINDS
from localsgd.schedule import Level

if TYPE_CHECKING:
    from localsgd.engine import Engine

JOIN = "join"
CONTRIBUTES, HEALED, STATELESS = 0, 1, 2  # a member's status in a round
_CODES = {JOIN: 0, **{kind: i + 1 for i, kind in enumerate(KINDS)}}


def _digest(data: bytes) -> int:
    return int.from_bytes(hashlib.sha256(data).digest()[:7], "big")  # fits an int64


class RoundFailed(RuntimeError):
    """A collective of this round failed; the round is not committed."""


class FaultTolerantCommunicator(Communicator):
    """The global level of K workers over torchft (``pip install localsgd[ft]``).

    >>> comm = FaultTolerantCommunicator(worker=k, workers=K, lighthouse="http://host:29510")
    >>> opt = LocalSGD(torch.optim.SGD(model.parameters(), lr=0.1), model, schedule, comm=comm)

    Constructing the engine joins the run: at the start, every worker waits up to
    ``startup_timeout`` seconds for all K, then worker 0's model (the lowest present) is copied to
    every worker; later, a worker blocks until the others' next global round and heals there.

    Args:
        worker: k, this worker's id (0 <= k < K); a restarted worker keeps its id.
        workers: K, the most workers the run has.
        lighthouse: the torchft lighthouse's address (default: ``TORCHFT_LIGHTHOUSE``).
        min_workers: a round with fewer members is not committed.
        ordered: sum in worker order, as the simulator does (an all-gather: n/2 times the bytes
            of a ring all-reduce), so that the simulator can replay the run bit for bit.
        timeout: of collectives and of fetching a healing state.
        quorum_timeout: how long a worker waits at a round for a quorum (a joining worker waits
            for the others' next round).
        startup_timeout: how long the first quorum waits for all K workers.
        on_round: called with each round's record (``localsgd.membership``) after its commit.
        store_addr, store_port: the worker's TCPStore, which the other workers reach too (default:
            torchrun's ``MASTER_ADDR`` and ``MASTER_PORT``, so on several hosts start torchrun with
            ``--master-addr`` set to this host's name; without them the communicator starts its
            own, advertised by this host's name).
    """

    fault_tolerant = True

    def __init__(
        self,
        worker: int,
        workers: int,
        *,
        lighthouse: str | None = None,
        min_workers: int = 1,
        ordered: bool = True,
        timeout: timedelta = timedelta(seconds=30),
        quorum_timeout: timedelta = timedelta(hours=1),
        startup_timeout: float = 60.0,
        on_round: Callable[[dict[str, Any]], None] | None = None,
        store_addr: str | None = None,
        store_port: int | None = None,
    ) -> None:
        check_int("workers (K)", workers, 1)
        check_int("min_workers", min_workers, 1)
        if not (isinstance(worker, int) and 0 <= worker < workers):
            raise ValueError(
                f"worker = {worker!r}: a worker id must be an integer in [0, K) = [0, {workers})"
            )
        try:
            from torchft import Manager
            from torchft.process_group import ProcessGroupGloo, ProcessGroupNCCL
        except ImportError as e:
            raise ImportError("fault tolerance needs torchft: pip install 'localsgd[ft]'") from e
        self.worker, self.workers, self.workers_per_block = worker, workers, None
        self.local_workers = [worker]
        self.ordered = ordered
        self.startup_timeout = startup_timeout
        self.on_round = on_round
        self._store = None
        if store_addr is None and "MASTER_PORT" not in os.environ:
            # the other workers connect to it (torchft meets a round's process group at one member's
            # store): advertised by the host's name, not localhost
            host = socket.gethostname()
            self._store = dist.TCPStore(host, 0, is_master=True, wait_for_workers=False)
            store_addr, store_port = host, self._store.port
        self.pg = (
            ProcessGroupNCCL(timeout=timeout) if torch.cuda.is_available() else ProcessGroupGloo(timeout)
        )
        self.manager = Manager(
            pg=self.pg, load_state_dict=None, state_dict=None, min_replica_size=min_workers,
            use_async_quorum=False, init_sync=False, timeout=timeout, quorum_timeout=quorum_timeout,
            rank=0, world_size=1, store_addr=store_addr, store_port=store_port,
            lighthouse_addr=lighthouse, replica_id=f"localsgd_{worker}",
        )  # fmt: skip
        self._engine: Engine | None = None
        self._settings = 0
        self._kind = JOIN
        self._healed: tuple[int, str] | None = None  # (source, kind of round) if healed at this round
        self._status = CONTRIBUTES
        self._deadline = 0.0
        self._round: dict[str, Any] | None = None  # the open round's membership
        self._rank: dict[int, int] = {}  # worker id -> rank in the round's process group
        self._failure: BaseException | None = None
        self._open = False  # inside a round (between begin_round and end_round)
        self._heal_started = 0.0
        self.run_id: int | None = None  # the same in every worker of a run, once it joined
        self.heal_seconds: float | None = None  # the last heal's transfer and load
        transport = self.manager._checkpoint_transport  # (torchft 0.2.0's; timed from the transfer's start)
        receive = transport.recv_checkpoint

        def timed_receive(*args: Any, **kwargs: Any) -> Any:
            self._heal_started = time.monotonic()
            return receive(*args, **kwargs)

        transport.recv_checkpoint = timed_receive

    # --- joining and healing -------------------------------------------------------------------

    def register(self, key: str, load: Callable[[Any], None], save: Callable[[], Any]) -> None:
        """More state a healing worker receives (e.g. a training loop's), under ``key``."""
        self.manager.register_state_dict_fn(key, load, save)

    def _save(self) -> dict[str, Any]:
        assert self._engine is not None
        state = {"worker": self.worker, "kind": self._kind, "run": self.run_id}
        return state | {"engine": self._engine.heal_state()}

    def _load(self, state: dict[str, Any]) -> None:
        assert self._engine is not None
        self._engine.load_heal_state(state["engine"])
        self._healed = (int(state["worker"]), str(state["kind"]))
        self.run_id = int(state["run"])
        self.heal_seconds = time.monotonic() - self._heal_started

    def join(self, engine: Engine, descriptions: list[dict[str, Any]]) -> str | None:
        """Enter the run (called by the engine at construction, again until it returns ``None`` or
        the engine commits the round). Returns the kind of round under way, which the engine then
        completes: as a healed worker equal to the others, or without a state (the heal failed:
        it takes part in the collectives, adds nothing and commits nothing). ``None`` at the start
        of a run, once worker 0's model (the lowest present) has been copied to every member."""
        if self._engine is None:
            self._engine = engine
            self._settings = _digest(json.dumps(descriptions, sort_keys=True).encode())
            self.manager.register_state_dict_fn("localsgd", self._load, self._save)
            self._deadline = time.monotonic() + self.startup_timeout
        while True:
            self.begin_round(JOIN, engine.t)
            if self._round is None:
                time.sleep(0.05)
                continue
            if self._round["kind"] != JOIN:
                engine.t = self._round["t"]  # (a healed worker's is already; a stateless one mirrors it)
                return self._round["kind"]
            if len(self._round["members"]) == self.workers or self._round["ready"]:
                break
        members = self._round["members"]
        root = self._rank[min(members)]
        run = torch.tensor([_digest(os.urandom(8))], dtype=torch.int64)  # the root's names the run
        try:
            for t in [run, *(t.detach() for m in engine.models for t in (*m.parameters(), *m.buffers()))]:
                self._wait(self.pg.broadcast([t], _broadcast_options(root)))
        except RoundFailed:
            pass
        if not self.end_round():
            raise RuntimeError(f"worker {self.worker}: the start of the run failed ({self._failure})")
        self.run_id = int(run)
        return None

    # --- rounds ----------------------------------------------------------------------------------

    def begin_round(self, kind: str, t: int) -> list[tuple[int, int]]:
        """The quorum (a worker behind heals here), then the exchange of membership rows."""
        self._kind, self._round, self._failure, self._healed = kind, None, None, None
        self._open = True
        try:
            self.manager.start_quorum()
        except TimeoutError as e:
            raise TimeoutError(
                f"worker {self.worker}: no quorum within quorum_timeout at step {t} (is the lighthouse "
                "reachable, and are at least its min_replicas workers alive?)"
            ) from e
        assert self._engine is not None
        status, source, code = CONTRIBUTES, -1, _CODES[kind]
        if self._healed is not None:
            status, source, code, t = HEALED, self._healed[0], _CODES[self._healed[1]], self._engine.t
        elif self.manager.errored() is not None:
            status = STATELESS  # e.g. a failed heal: it mirrors the round and commits nothing
        ready = int(kind == JOIN and time.monotonic() > self._deadline)
        row = torch.tensor([self.worker, status, source, t, code, self._settings, ready], dtype=torch.int64)
        rows = [torch.empty_like(row) for _ in range(self.manager.num_participants())]
        try:
            self._wait(self.pg.allgather([rows], [row], AllgatherOptions()))
        except RoundFailed:
            return []
        table = [r.tolist() for r in rows]
        bad = next((w for w, *_, digest, _ in table if digest != self._settings), None)
        if bad is not None:
            raise ValueError(
                f"worker {bad} runs with other settings than worker {self.worker} (model, optimizer, "
                "schedule or policy differ); every worker of a run must be started alike"
            )
        self._rank = {w: rank for rank, (w, *_) in enumerate(table)}
        if len(self._rank) < len(table):
            twice = sorted({w for w, *_ in table if sum(r[0] == w for r in table) > 1})
            raise ValueError(f"two processes run as worker {twice[0]}: every worker needs its own id")
        self._status = status
        rounds = {(row_t, c) for _, st, _, row_t, c, *_ in table if st != STATELESS and c != _CODES[JOIN]}
        if len(rounds) > 1:
            self._fail(RuntimeError(f"the members are at different rounds (step, kind): {sorted(rounds)}"))
            return []
        names = {c: name for name, c in _CODES.items()}
        (round_t, round_code), *_ = rounds or {(t, _CODES[JOIN])}
        # a joining worker that was not healed has no state for a round under way: it mirrors it
        contributors = sorted(w for w, st, _, _, c, *_ in table if st == CONTRIBUTES and c == round_code)
        if status == CONTRIBUTES and self.worker not in contributors:
            self._status = STATELESS
        self._round = {
            "t": round_t,
            "kind": names[round_code],
            "members": sorted(self._rank),
            "contributors": contributors,
            "heals": [[w, src] for w, st, src, *_ in sorted(table) if st == HEALED],
            "ready": any(r[-1] for r in table),
        }
        return []

    def end_round(self) -> bool:
        if self._round is not None and self._status == STATELESS:
            self._fail(RuntimeError("this worker has no state yet"))
        committed = self.manager.should_commit()  # False after any error reported in the round
        self._open = False
        if self._round is not None and self._round["kind"] != JOIN:
            record = {k: v for k, v in self._round.items() if k != "ready"}
            record.update(worker=self.worker, committed=committed)
            if self._status == HEALED:
                record["heal_seconds"] = self.heal_seconds
            if self.on_round is not None:
                self.on_round(record)
        return committed

    def _fail(self, error: BaseException) -> None:
        self._failure = error
        self.manager.report_error(error if isinstance(error, Exception) else RuntimeError(str(error)))

    def _wait(self, work: Any) -> None:
        """Wait for a collective; a failure is reported (the round will not be committed)."""
        try:
            work.wait()
        except Exception as e:  # a peer died, hung or was unreachable
            self._fail(e)
            raise RoundFailed(str(e)) from e

    def _live(self) -> bool:
        return self._round is not None and self._failure is None

    # --- the collectives of a round ------------------------------------------------------------

    def all_reduce_mean_(self, level: Level, flats: list[torch.Tensor]) -> Wait:
        if level is not Level.GLOBAL:
            raise ValueError("a fault-tolerant communicator has only the global level")
        (flat,) = flats
        if not self._open:
            raise RuntimeError("a fault-tolerant communicator averages only inside a round (begin_round)")
        if not self._live():
            return _done
        assert self._round is not None
        contributors = self._round["contributors"]
        try:
            if self.ordered:
                rows = [torch.empty_like(flat) for _ in self._rank]
                work = self.pg.allgather([rows], [flat], AllgatherOptions())
            else:
                if self.worker not in contributors:
                    flat.zero_()
                opts = AllreduceOptions()
                opts.reduceOp = dist.ReduceOp.SUM
                work = self.pg.allreduce([flat], opts)
        except Exception as e:
            self._fail(e)
            return _done

        def wait() -> None:
            try:
                self._wait(work)
            except RoundFailed:
                return
            if self.ordered:
                _mean_in_order_(flat, [rows[self._rank[w]] for w in contributors])
            else:
                flat.div_(len(contributors))

        return wait

    def broadcast_(self, flats: list[torch.Tensor]) -> Wait:
        raise NotImplementedError("fault-tolerant workers copy the initial model when they join")

    def all_gather_bytes(self, data: list[bytes]) -> list[bytes]:
        raise NotImplementedError("a fault-tolerant communicator has no collectives outside its rounds")

    def round_group(self, level: Level) -> RoundGroup | None:
        if level is not Level.GLOBAL or self._round is None:
            return None
        return RoundGroup(tuple(self._round["members"]), tuple(self._round["contributors"]))

    def _ranks(self) -> list[int]:
        """The process group's rank of each member, in worker order."""
        assert self._round is not None
        return [self._rank[w] for w in self._round["members"]]

    def start_exchange(
        self, level: Level, chunks: list[list[torch.Tensor]]
    ) -> Callable[[], list[list[torch.Tensor]]]:
        """The all-to-all of a compressed mean among the round's members (``chunks[0][j]`` goes to
        the j-th member in worker order); a failed round gets this worker's own chunks back (it is
        not committed)."""
        (mine,) = chunks
        if not self._live():
            return lambda: [list(mine)]
        ranks = self._ranks()
        by_rank = [0] * len(ranks)
        for j, r in enumerate(ranks):
            by_rank[r] = j
        send = torch.cat([mine[j] for j in by_rank])
        received = torch.empty_like(send)
        try:
            work = self.pg.alltoall_base(received, send, [], [], AllToAllOptions())
        except Exception as e:
            self._fail(e)
            return lambda: [list(mine)]

        def wait() -> list[list[torch.Tensor]]:
            try:
                self._wait(work)
            except RoundFailed:
                return [list(mine)]
            rows = received.view(len(mine), -1).unbind(0)
            return [[rows[r] for r in ranks]]

        return wait

    def gather(self, level: Level, items: list[torch.Tensor]) -> list[list[torch.Tensor]]:
        """The all-gather of a compressed mean among the round's members, in worker order."""
        (mine,) = items
        if not self._live():  # as many as the mean was cut into (it is not committed)
            return [[mine] * (self.workers if self._round is None else len(self._round["members"]))]
        out = [torch.empty_like(mine) for _ in self._rank]
        try:
            self._wait(self.pg.allgather([out], [mine], AllgatherOptions()))
        except RoundFailed:
            return [[mine] * len(out)]
        return [[out[r] for r in self._ranks()]]

    def shutdown(self) -> None:
        """Leave the run: stop this worker's torchft servers."""
        self.manager.shutdown(wait=False)


def _broadcast_options(root: int) -> BroadcastOptions:
    opts = BroadcastOptions()
    opts.rootRank = root
    return opts
