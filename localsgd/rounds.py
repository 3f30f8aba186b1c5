"""The engine's rounds: what one gradient average and one parameter average do, with the buffer,
optimizer-state and outer-step policies. The engine decides when (``localsgd.schedule``) and
times and counts them; the averager moves the bytes (``localsgd.averaging``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from localsgd.averaging import FlatAverager
from localsgd.compression import CompressedMean
from localsgd.ddp import DDPArming
from localsgd.gradients import CopiedGradients, PackedGradients
from localsgd.outer import OuterStep
from localsgd.pieces import Selection
from localsgd.schedule import Level, Schedule
from localsgd.sharding import local, shards

Round = Callable[[], int]  # runs the round's communication; returns the bytes each worker sent


def float_buffers(model: nn.Module, average: bool) -> list[torch.Tensor]:
    """The floating-point buffers (BatchNorm statistics) if they are averaged, else none. Integer
    buffers (``num_batches_tracked``) are never averaged."""
    return [b for b in model.buffers() if b.is_floating_point()] if average else []


class GradientAverage:
    """Averages the workers' gradients before the optimizer step (a level whose period is 1).

    Gradients live in flat buffers after the first average (``PackedGradients``) when the
    parameters are packed and no DDP is involved; otherwise they are copied (``CopiedGradients``),
    or DDP's own all-reduce already averaged them inside backward.
    """

    def __init__(
        self,
        models: list[nn.Module],
        optimizers: list[torch.optim.Optimizer],
        averager: FlatAverager,
        ddp: DDPArming,
        pack: bool,
        buffers: str,
    ) -> None:
        self.models, self.optimizers, self.averager, self.ddp = models, optimizers, averager, ddp
        self.pack, self.buffers = pack, buffers
        self.packed: PackedGradients | None = None

    def _packed(self, params: list[list[nn.Parameter]]) -> PackedGradients | None:
        """The gradient windows for these parameters (made at the first call), or None if the
        gradients are averaged by copying (DDP, unpacked parameters, ``requires_grad`` changed)."""
        if not self.pack or not params[0]:
            return None
        if self.packed is None:
            optimized = [[p for g in opt.param_groups for p in g["params"]] for opt in self.optimizers]
            averager = FlatAverager(self.averager.comm, self.averager.bucket_bytes)
            self.packed = PackedGradients(averager, params, optimized)
        if all(self.packed.holds(k, ps) for k, ps in enumerate(params)):
            return self.packed
        return None

    def prepare(self, level: Level) -> Round:
        """Gather this step's gradients (and buffers, by policy); the returned round averages them."""
        ddp_syncs = self.ddp.syncs(level)
        params = [[p for p in m.parameters() if p.requires_grad] for m in self.models]
        packed = self._packed(params)
        copied = CopiedGradients()
        per_worker = []
        for k, model in enumerate(self.models):
            tensors = float_buffers(model, self.buffers == "average")
            if packed is not None:
                tensors = [*packed.gather(k), *tensors]
            elif params[k] and not ddp_syncs:
                tensors = [*copied.gather(params[k]), *tensors]
            per_worker.append(tensors)
        averager = packed.averager if packed is not None else self.averager

        def run() -> int:
            nbytes = averager.average_(level, per_worker)
            if ddp_syncs:  # DDP averaged the gradients inside backward(); count its payload too
                nbytes += sum(local(p).numel() * p.element_size() for p in params[0])
            if packed is not None:
                for k in range(len(self.models)):
                    packed.scatter(k)
            copied.scatter()
            return nbytes

        return run


class ParameterAverage:
    """Averages the workers' models after the optimizer step: parameters, floating buffers (by
    policy) and floating optimizer state (``optimizer_state="average"``; ``"reset"`` clears it).
    At a scheduled global average with an outer optimizer, what is averaged is the pseudo-gradient
    θ̄ − θ_k, and the outer step sets every worker to the new anchor (``localsgd.outer``); with
    ``compressed``, that pseudo-gradient is what is compressed (``localsgd.compression``)."""

    def __init__(
        self,
        models: list[nn.Module],
        optimizers: list[torch.optim.Optimizer],
        averager: FlatAverager,
        buffers: str,
        optimizer_state: str,
        outer: OuterStep | None,
        compressed: CompressedMean | None = None,
        select: Callable[[nn.Module], list[torch.Tensor]] = shards,
    ) -> None:
        self.models, self.optimizers, self.averager = models, optimizers, averager
        self.buffers, self.optimizer_state, self.outer = buffers, optimizer_state, outer
        self.compressed, self.select = compressed, select

    def _optimizer_tensors(self, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
        if self.optimizer_state != "average":
            return []
        tensors = []
        for group in optimizer.param_groups:
            for p in group["params"]:
                state = optimizer.state.get(p, {})
                for key in sorted(state):
                    value = state[key]
                    if key != "step" and torch.is_tensor(value) and value.is_floating_point():
                        tensors.append(local(value))
        return tensors

    def prepare(self, level: Level, buffers: bool | None, outer: bool, lone: bool) -> Round:
        """The round at ``level``: ``buffers`` overrides the buffer policy, ``outer`` asks for the
        outer step (scheduled global averages), ``lone`` says there is nobody to average with (the
        outer step still runs: with one worker it is Lookahead)."""
        average_buffers = self.buffers == "average" if buffers is None else buffers
        params = [shards(m) for m in self.models]
        per_worker = [
            [*ps, *float_buffers(m, average_buffers), *self._optimizer_tensors(o)]
            for ps, m, o in zip(params, self.models, self.optimizers, strict=True)
        ]
        outer_step = self.outer if outer and level is Level.GLOBAL else None
        # the outer step's views of the same elements (flat views of the packed buffers)
        selected = [self.select(m) for m in self.models] if outer_step is not None else []

        def run() -> int:
            if outer_step is not None:
                outer_step.to_pseudo_gradients_(selected)
            compressed = self.compressed if outer_step is not None else None  # only pseudo-gradients
            nbytes = 0 if lone else self.averager.average_(level, per_worker, compressed)
            if outer_step is not None:
                outer_step.step_(selected, inner_lr=self.optimizers[0].param_groups[0]["lr"])
            if self.optimizer_state == "reset":
                for opt in self.optimizers:
                    opt.state.clear()
            return nbytes

        return run


@dataclass
class InFlight:
    """A global average started and not yet applied."""

    level: Level
    due: int  # applied after this step (0-based)
    snapshots: list[list[torch.Tensor]]  # per worker: its parameters when the average started
    sent: list[list[torch.Tensor]]  # per worker: θ̄ − s_k, replaced by the mean once waited for
    wait: Callable[[], None]
    residuals: dict[str, Any] | None  # the compression's error feedback before this average
    arrived: bool = False  # waited for (the mean is in ``sent``)

    def receive(self) -> None:
        """Wait for the mean (once)."""
        if not self.arrived:
            self.wait()
            self.arrived = True


class DelayedAverage:
    """A global average that runs while the workers take their next τ local steps (overlapped
    averaging, as streaming DiLoCo's ``fragment_sync_delay``).

    At a scheduled global average after step t, each worker sends Δ_k = θ̄ − s_k, where s_k is its
    parameters then, and keeps training. After step t + τ the mean Δ has arrived: the outer
    optimizer steps the anchor with it, and each worker continues from the new anchor θ̄' by the
    ``merge`` rule: ``"delta"`` keeps what it learned during the delay, θ_k ← θ̄' + (θ_k − s_k);
    ``"mix"`` (Streaming DiLoCo, as torchft) takes θ_k ← lerp(θ̄', θ_k, alpha). With τ = 0 either
    is the blocking average (alpha = 0).

    ``select`` picks the tensors of a worker's model it averages (a fragment's, or all the
    parameters' as one fragment).

    With ``compressed``, Δ_k is encoded and its all-to-all started after step t; the second stage
    (the mean's all-gather) runs when the average is applied.
    """

    def __init__(
        self,
        models: list[nn.Module],
        averager: FlatAverager,
        outer: OuterStep,
        delay: int,
        compressed: CompressedMean | None,
        select: Selection,
        merge: str = "delta",
        alpha: float = 0.0,
    ) -> None:
        self.models, self.outer, self.delay, self.compressed = models, outer, delay, compressed
        self.select, self.merge, self.alpha = select, merge, alpha
        self.averager = FlatAverager(averager.comm, averager.bucket_bytes)  # its own buffers: in flight
        self.deltas: list[list[torch.Tensor]] | None = None  # Δ_k, packed in the averager's buffers
        self.snapshots: list[list[torch.Tensor]] | None = None  # s_k (τ > 0)
        self.pending: InFlight | None = None

    @staticmethod
    def check(delay: int, schedule: Schedule) -> None:
        """ValueError unless τ = ``delay`` fits the schedule (``Policy`` checks the rest)."""
        period = schedule.period(Level.GLOBAL)
        if delay >= period:
            raise ValueError(
                f"overlap_steps (τ) = {delay} must be less than the global period H·H_b = {period}: "
                "one global average in flight at a time"
            )

    def start(self, level: Level, t: int) -> Round:
        """The round that starts the average after step ``t`` (applied after step t + τ)."""

        def run() -> int:
            params = [self.select(m) for m in self.models]
            if not self.delay:  # applied at once: the parameters are the snapshot
                return self._send(level, t, params)
            if self.snapshots is None:  # allocated once, reused at every send
                self.snapshots = [[torch.empty_like(p) for p in ps] for ps in params]
            for snapshot, ps in zip(self.snapshots, params, strict=True):
                torch._foreach_copy_(snapshot, ps)
            return self._send(level, t + self.delay, self.snapshots)

        return run

    @torch.no_grad()
    def _send(self, level: Level, due: int, snapshots: list[list[torch.Tensor]]) -> int:
        anchor = self.outer.anchor  # unchanged until the average is applied
        if self.deltas is None:
            self.deltas = [[torch.empty_like(s) for s in snap] for snap in snapshots]
            if not self.averager.pack_(self.deltas):  # fresh dense tensors: always packable
                raise AssertionError("could not pack the pseudo-gradient buffers")
        for deltas, snap in zip(self.deltas, snapshots, strict=True):  # Δ_k = θ̄ − s_k
            for d, a, s in zip(deltas, anchor, snap, strict=True):
                torch.sub(a.to(s.device), s, out=d)
        residuals = None if self.compressed is None else self.compressed.state_dict()
        wait, nbytes = self.averager.start_average_(level, self.deltas, self.compressed)
        self.pending = InFlight(level, due, snapshots, self.deltas, wait, residuals)
        return nbytes

    def due(self, t: int) -> bool:
        """Whether the pending average is to be applied after step ``t`` (0-based)."""
        return self.pending is not None and self.pending.due == t

    @torch.no_grad()
    def apply(self, inner_lr: float) -> None:
        """Wait for the pending mean Δ, step the anchor, and move every worker onto it."""
        pending, self.pending = self.pending, None
        assert pending is not None
        pending.receive()
        self.outer.advance_(pending.sent[0], inner_lr)
        for m, snapshot in zip(self.models, pending.snapshots, strict=True):
            params = self.select(m)
            anchor = [a.to(p.device) for p, a in zip(params, self.outer.anchor, strict=True)]
            if self.merge == "mix":  # torchft: the global copy, stepped, lerped toward the local
                for p, a in zip(params, anchor, strict=True):
                    torch.lerp(a, p, self.alpha, out=p)  # = a.clone().lerp_(p, alpha), in one pass
            elif not self.delay:  # θ_k = s_k: θ_k ← θ̄'
                torch._foreach_copy_(params, anchor)
            else:  # θ_k ← θ̄' + (θ_k − s_k)
                torch._foreach_sub_(params, snapshot)
                torch._foreach_add_(params, anchor)

    def state_dict(self) -> dict[str, Any] | None:
        """What the pending average was started from (the anchor, saved with the outer step,
        gives the rest): loading sends it again."""
        pending = self.pending
        if pending is None:
            return None
        layout = self.select.layout
        assert layout is not None  # (set when the snapshots were taken)
        # per piece, as the anchor; copies (the buffers are reused at the next send)
        snapshots = [[p.clone() for p in layout.split(snapshot)] for snapshot in pending.snapshots]
        state = {"level": pending.level.value, "due": pending.due, "snapshots": snapshots}
        if pending.residuals is not None:  # sending again must start from the same error feedback
            state["residuals"] = pending.residuals
        return state

    def drop(self) -> None:
        """Wait for an average still in flight and forget it: call before a state is loaded over
        it (an engine loaded twice), since it writes into the buffers a resent average uses."""
        if self.pending is not None:
            self.pending.receive()
            self.pending = None

    def discard(self) -> None:
        """Forget the pending average without applying it (its round was not committed): the
        workers keep their parameters, the anchor stays, the error feedback is as before it."""
        pending, self.pending = self.pending, None
        assert pending is not None
        pending.receive()
        if pending.residuals is not None and self.compressed is not None:
            self.compressed.load_state_dict(pending.residuals)

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Call after the outer step's and the compression's states are loaded (the anchor, the
        error feedback)."""
        self.pending = None
        if state is not None:
            if self.compressed is not None:
                self.compressed.load_state_dict(state["residuals"])
            layout = self.select.layout
            assert layout is not None  # (set when the anchor was made)
            snapshots = [layout.join(snapshot) for snapshot in state["snapshots"]]
            self._send(Level(state["level"]), int(state["due"]), snapshots)
