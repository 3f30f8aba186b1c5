"""Who took part in each global round of a fault-tolerant run, and its replay in the simulator.

A fault-tolerant worker (``localsgd.ft``) writes one record per global round it was in:

    {"t": 48, "kind": "parameters", "worker": 2, "members": [0, 2], "contributors": [0, 2],
     "heals": [], "committed": true}

``members`` are the workers in the round's quorum, ``contributors`` those whose tensors make the
mean (a member that was healed at this round receives the mean but adds nothing: its state is a
copy of ``source``'s), ``heals`` the (healer, source) pairs, and ``committed`` whether this
worker kept the round's result. ``merge`` joins every worker's records into one trace and
``ReplayCommunicator`` lets ``localsgd.Simulator`` run the same K workers through that trace.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from localsgd.comm import RoundGroup, SimCommunicator, Wait, _done, _mean_in_order_
from localsgd.schedule import Level

KINDS = ("gradients", "parameters", "average")  # average: averaged_model(), which changes no worker


@dataclass
class RoundRecord:
    """One global round as every member saw it; ``applied``: the members that committed it."""

    t: int
    kind: str
    members: list[int]
    contributors: list[int]
    heals: list[tuple[int, int]]
    applied: list[int] = field(default_factory=list)


def merge(records: Iterable[dict[str, Any]]) -> dict[tuple[int, str], RoundRecord]:
    """Every worker's round records joined into one record per round, keyed by (t, kind). The
    members of a round agree on who took part (they exchanged it); a round that no worker
    committed has no ``applied`` workers."""
    rounds: dict[tuple[int, str], RoundRecord] = {}
    for r in records:
        key = (int(r["t"]), str(r["kind"]))
        heals = [(int(h), int(s)) for h, s in r["heals"]]
        seen = rounds.get(key)
        if seen is None:
            seen = rounds[key] = RoundRecord(
                key[0], key[1], list(r["members"]), list(r["contributors"]), heals
            )
        elif (seen.members, seen.contributors, seen.heals) != (r["members"], r["contributors"], heals):
            raise ValueError(
                f"the records of the round at t={key[0]} ({key[1]}) disagree on who took part: "
                f"{seen.members} against {r['members']}"
            )
        if r["committed"]:
            seen.applied = sorted({*seen.applied, int(r["worker"])})
    return rounds


class ReplayCommunicator(SimCommunicator):
    """K simulated workers whose global rounds follow a fault-tolerant run's trace.

    A round's mean is over its contributors, summed in worker order (the fault-tolerant
    communicator's ordered rule), and every worker receives it. Healers first receive their
    source's model and optimizer state (the engine copies them). A round that no worker committed
    is undone, as it was in the run. Two approximations, both of state that is not used again:
    a worker outside a round (dead) also receives the mean, and so does a member whose own commit
    failed while others committed (in the run it kept its own model, and it is healed at the next
    round it joins).
    """

    fault_tolerant = True

    def __init__(self, workers: int, trace: dict[tuple[int, str], RoundRecord]) -> None:
        super().__init__(workers)
        for record in trace.values():
            outside = [w for w in record.members if not 0 <= w < workers]
            if outside:
                raise ValueError(f"the trace names workers {outside}, but the simulator has K={workers}")
        self.trace = trace
        self.replayed: list[tuple[int, str]] = []
        self._round: RoundRecord | None = None

    def join(self, engine: Any, descriptions: list[dict[str, Any]]) -> str | None:
        """The start of the run: the simulator's workers start from copies of worker 0's model."""
        return None

    def begin_round(self, kind: str, t: int) -> list[tuple[int, int]]:
        self._round = self.trace.get((t, kind))
        self.replayed.append((t, kind))
        return [] if self._round is None else list(self._round.heals)

    def all_reduce_mean_(self, level: Level, flats: list[torch.Tensor]) -> Wait:
        if level is not Level.GLOBAL:
            return super().all_reduce_mean_(level, flats)
        if self._round is None or not self._round.applied:
            return _done  # undone after the round
        first, *rest = self._round.contributors
        _mean_in_order_(flats[first], [flats[first], *(flats[w] for w in rest)])
        for k, flat in enumerate(flats):
            if k != first:
                flat.copy_(flats[first])
        return _done

    def end_round(self) -> bool:
        return self._round is not None and bool(self._round.applied)

    def round_group(self, level: Level) -> RoundGroup | None:
        """The round's members and contributors (compressed means run among them); ``None`` for a
        round no worker committed (undone after it)."""
        if level is not Level.GLOBAL or self._round is None or not self._round.applied:
            return None
        return RoundGroup(tuple(self._round.members), tuple(self._round.contributors))

    def start_exchange(
        self, level: Level, chunks: list[list[torch.Tensor]]
    ) -> Callable[[], list[list[torch.Tensor]]]:
        """Among the round's members (``chunks``: one list per member, in worker order)."""
        if self.round_group(level) is None:
            return super().start_exchange(level, chunks)
        received = [[mine[j] for mine in chunks] for j in range(len(chunks))]
        return lambda: received

    def gather(self, level: Level, items: list[torch.Tensor]) -> list[list[torch.Tensor]]:
        if self.round_group(level) is None:
            return super().gather(level, items)
        return [list(items) for _ in items]
