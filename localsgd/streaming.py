"""Streaming DiLoCo: the parameters cut into N fragments that sync in turn, so the link never
carries the whole model at once (Douillard et al., 2025; torchft's ``DiLoCo(model_fragments,
sync_every, fragment_sync_delay, fragment_update_alpha)``).

Each fragment is a contiguous run of the model's parameters (in ``model.parameters()`` order, 1/N
of the bytes each to the element: a cut may fall inside a parameter, ``localsgd.pieces``; on packed
parameters a fragment is one or two flat views of the buffer) with its own anchor, outer optimizer state,
error-feedback residuals and in-flight average (``rounds.DelayedAverage``). The schedule's global
period H·H_b is cut into N sub-periods; at the end of each, one fragment syncs, the N in turn
(``Schedule.fragment_at``), so every fragment syncs once per period. What a sync does with the τ
steps it overlaps is the merge rule (``Policy.merge``):

- ``"delta"``: the fragment's pseudo-gradient is sent at its sync point and applied τ steps later,
  keeping what the worker learned meanwhile: θ ← θ̄' + (θ − s). N = 1 is localsgd's overlapped
  average.
- ``"mix"``: as torchft implements Streaming DiLoCo: the pseudo-gradient is taken τ steps before the
  sync point; at the sync point the outer optimizer steps the saved global copy and the worker's
  fragment becomes lerp(θ̄', θ, alpha) (alpha = 0 keeps nothing of the τ steps).

With τ = 0 both are the blocking average of one fragment; N = 1 with τ = 0 is DiLoCo.

Fragments may also be named (``fragments=[["embed", "position"], "blocks.0", ...]``, modules or
parameters, as torchft's list of modules): each then holds whole parameters, in the order given.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from localsgd.averaging import FlatAverager
from localsgd.comm import Communicator
from localsgd.compression import CompressedMean
from localsgd.outer import OuterOptimizerFactory, OuterStep
from localsgd.pieces import Selection, by_name, cut, localize
from localsgd.rounds import DelayedAverage, Round
from localsgd.schedule import Level, Schedule, Sync


class Streaming:
    """This process's workers' fragments: which steps send and apply which fragment's average."""

    def __init__(
        self,
        models: list[nn.Module],
        comm: Communicator,
        bucket_bytes: int,
        schedule: Schedule,
        make_outer: OuterOptimizerFactory,
        *,
        fragments: int | tuple[tuple[str, ...], ...],
        delay: int,
        merge: str,
        alpha: float,
        compression: Any,
        anchor_device: torch.device | str | None,
        join: bool,
    ) -> None:
        n = fragments if isinstance(fragments, int) else len(fragments)
        self.check(schedule, n, delay)
        self.schedule, self.n, self.delay, self.merge = schedule, n, delay, merge
        # cut to the element, in the unsharded parameters (sharded: the same cut on every rank, each
        # rank averaging its part of every fragment)
        params = list(models[0].parameters())
        self.parts = cut(params, n) if isinstance(fragments, int) else by_name(models[0], fragments)
        self.selections = [Selection(part, join) for part in localize(self.parts, params)]
        self.outers = [
            OuterStep(select(models[0]), make_outer, anchor_device, select.layout)
            for select in self.selections
        ]
        self.fragments = [
            DelayedAverage(
                models,
                FlatAverager(comm, bucket_bytes),
                outer,
                delay,
                CompressedMean.of(compression, packed=True),
                select,
                merge,
                alpha,
            )
            for select, outer in zip(self.selections, self.outers, strict=True)
        ]

    @staticmethod
    def check(schedule: Schedule, fragments: int, delay: int) -> None:
        """ValueError unless N fragments and τ fit the schedule."""
        if schedule.is_hierarchical:
            raise ValueError("fragments and merge='mix' are not supported with hierarchical schedules")
        period = schedule.period(Level.GLOBAL)
        if period == 1:
            raise ValueError("fragments and merge='mix' need local steps (H > 1): H = 1 averages gradients")
        if period % fragments:
            raise ValueError(f"fragments (N) = {fragments} must divide the global period H·H_b = {period}")
        sub = period // fragments
        if delay >= sub:
            raise ValueError(
                f"overlap_steps (τ) = {delay} must be less than H·H_b / N = {sub}: one fragment in flight "
                "at a time"
            )

    def track(self, sync: Sync, models: list[nn.Module]) -> None:
        """Before step t's optimizer step: the anchors follow the mini-batch phase and are set from
        the workers' (equal) parameters at its first local step."""
        if sync.gradients is Level.GLOBAL:
            for outer in self.outers:
                outer.current = False
        elif not self.outers[0].current:
            for outer, select in zip(self.outers, self.selections, strict=True):
                outer.reset_(select(models[0]))

    def to_start(self, t: int) -> int | None:
        """The fragment whose average is sent after step ``t``: at its sync point (``"delta"``), or
        τ steps before it (``"mix"``)."""
        ahead = self.delay if self.merge == "mix" else 0
        return self.schedule.fragment_at(t + ahead, self.n)

    def start(self, f: int, t: int) -> Round:
        return self.fragments[f].start(Level.GLOBAL, t)

    def due(self, t: int) -> list[DelayedAverage]:
        """The fragments' averages to apply after step ``t``."""
        return [d for d in self.fragments if d.due(t)]

    def pending(self) -> list[DelayedAverage]:
        return [d for d in self.fragments if d.pending is not None]

    def drop(self) -> None:
        """Wait for and forget the averages in flight (before a state is loaded over them)."""
        for d in self.fragments:
            d.drop()

    @property
    def _one(self) -> bool:
        """One fragment and the delta rule: localsgd's overlapped average, saved as it always was."""
        return self.n == 1 and self.merge == "delta"

    def state_dict(self) -> dict[str, Any]:
        """The engine's keys for the anchors, outer optimizers, residuals and averages in flight."""
        saved = [
            {
                "outer": outer.state_dict(),
                **({} if d.compressed is None else {"compression": d.compressed.state_dict()}),
                "delayed": d.state_dict(),
            }
            for outer, d in zip(self.outers, self.fragments, strict=True)
        ]
        if self._one:
            return saved[0]
        return {"streaming": {"parts": self.parts, "merge": self.merge, "fragments": saved}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """From the engine's state (after ``drop``): the anchors and residuals, then the averages in
        flight, which are sent again."""
        if self._one:
            saved = [state]
        else:
            if "streaming" not in state:
                raise ValueError(f"the checkpoint was written without fragments; this run has N = {self.n}")
            streaming = state["streaming"]
            parts = [[tuple(piece) for piece in part] for part in streaming["parts"]]
            if parts != self.parts or streaming["merge"] != self.merge:
                raise ValueError(
                    f"the checkpoint's {len(parts)} fragments (merge {streaming['merge']!r}) are cut "
                    f"differently from this run's {self.n} (merge {self.merge!r}): another model or N"
                )
            saved = streaming["fragments"]
        for outer, d, mine in zip(self.outers, self.fragments, saved, strict=True):
            if ("compression" in mine) != (d.compressed is not None):
                raise ValueError("the checkpoint and this run differ in whether averages are compressed")
            outer.load_state_dict(mine["outer"])
            if d.compressed is not None:
                d.compressed.load_state_dict(mine["compression"])
            d.load_state_dict(mine["delayed"])  # after the anchor and residuals: it resends
