"""The step logic shared by both runtimes: asks the schedule what step ``t`` communicates, then
averages gradients (before the optimizer step) or the model (after it) through the averager.

``LocalSGD`` (one worker per process) and ``Simulator`` (K workers in one process) are thin
subclasses; they differ only in how many (model, optimizer) pairs they hold and in their
communicator.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from typing_extensions import Unpack

from localsgd.averaging import FlatAverager
from localsgd.checks import check_workers, describe
from localsgd.comm import Communicator
from localsgd.compression import CompressedMean
from localsgd.ddp import DDPArming
from localsgd.outer import OuterOptimizerFactory, OuterStep
from localsgd.pieces import Selection, whole
from localsgd.policy import Policy, PolicyKeywords, as_policy
from localsgd.rounds import DelayedAverage, GradientAverage, ParameterAverage, Round, float_buffers
from localsgd.schedule import Level, Schedule, Sync
from localsgd.sharding import FSDPArming, average_into, check_sharded, shards
from localsgd.streaming import Streaming


class CommunicationError(RuntimeError):
    """A collective failed: a peer died, hung past the timeout, or the network broke."""


def first_line(error: BaseException) -> str:
    """One line for the user: an OS error's path(s) and the OS's reason, else the error's first
    non-blank line (its type's name if it has none)."""
    if isinstance(error, OSError) and error.strerror:
        paths = " -> ".join(str(f) for f in (error.filename, error.filename2) if f is not None)
        return f"{paths}: {error.strerror}" if paths else error.strerror
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


@dataclass
class CommStats:
    """Communication at one level: averaging rounds, payload bytes per worker, seconds spent."""

    rounds: int = 0
    bytes: int = 0
    seconds: float = 0.0


def _plain_outer(anchor: list[torch.Tensor]) -> torch.optim.Optimizer:
    """θ̄ ← θ̄ − mean Δ: plain averaging, for compression without an outer optimizer."""
    return torch.optim.SGD(anchor, lr=1.0)


def _one_per_optimizer(
    scalers: Sequence[torch.amp.GradScaler] | None, optimizers: list[torch.optim.Optimizer]
) -> list[torch.amp.GradScaler] | None:
    if scalers is not None and len(scalers) != len(optimizers):
        raise ValueError(
            f"need one GradScaler per optimizer: {len(optimizers)} optimizers, {len(scalers)} scalers"
        )
    return None if scalers is None else list(scalers)


def _check_owned(models: list[nn.Module], optimizers: list[torch.optim.Optimizer]) -> None:
    """ValueError if an optimizer holds a tensor that is not a parameter of its model."""
    for model, opt in zip(models, optimizers, strict=True):
        owned = {id(p) for p in model.parameters()}
        for group in opt.param_groups:
            for p in group["params"]:
                if id(p) not in owned:
                    raise ValueError(
                        f"the optimizer holds a parameter of shape {tuple(p.shape)} that is not "
                        "a parameter of the model; pass the model whose parameters it optimizes"
                    )


def _cloned(state: Any) -> Any:
    """A copy of a state dict's tensors (other values shared)."""
    if torch.is_tensor(state):
        return state.detach().clone()
    if isinstance(state, dict):
        return {k: _cloned(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(_cloned(v) for v in state)
    return state


class Engine:
    """Drives K' local workers (1 under torch.distributed, K in the simulator) through a schedule.

    At construction every worker's parameters move into one flat buffer per dtype and device
    (``.data`` becomes a contiguous view of the same shape; the ``Parameter`` objects stay the
    same), so a model average is one in-place collective per buffer. A tensor taken from a
    parameter's old storage before (e.g. ``w = model.weight.detach()``) no longer follows it.

    Args:
        models: the workers' models held by this process (``DistributedDataParallel`` allowed).
        optimizers: one optimizer per model, over (a subset of) that model's parameters.
        comm: averages flat buffers between workers.
        schedule: when to communicate.
        sync_initial: copy worker 0's parameters and buffers to all workers at construction.
        grad_scalers: one ``torch.amp.GradScaler`` per optimizer, or ``None``. The engine then
            calls ``scaler.step(optimizer)`` itself and keeps to the schedule when a scaler skips
            a step for inf/NaN gradients (the caller still calls ``scaler.update()``).
        policy: how to average (``localsgd.Policy``: buffers, optimizer_state, bucket_bytes,
            outer_optimizer, anchor_device, compression, overlap_steps, max_grad_norm).
        **policy_kwargs: the same as keywords (``buffers="average"``), instead of ``policy``.
    """

    def __init__(
        self,
        models: Sequence[nn.Module],
        optimizers: Sequence[torch.optim.Optimizer],
        comm: Communicator,
        schedule: Schedule,
        *,
        sync_initial: bool = True,
        grad_scalers: Sequence[torch.amp.GradScaler] | None = None,
        policy: Policy | None = None,
        **policy_kwargs: Unpack[PolicyKeywords],
    ) -> None:
        if not isinstance(schedule, Schedule):
            raise TypeError(f"schedule must be a localsgd.Schedule, got {type(schedule).__name__}")
        self.policy = as_policy(policy, policy_kwargs)
        self.schedule = schedule
        self.comm = comm
        self.models = [m.module if isinstance(m, DistributedDataParallel) else m for m in models]
        self.optimizers = list(optimizers)
        self.grad_scalers = _one_per_optimizer(grad_scalers, self.optimizers)
        _check_owned(self.models, self.optimizers)
        self._sharded = check_sharded(self.models, comm)
        if self._sharded and Level.BLOCK in schedule.levels():
            raise ValueError("hierarchical schedules are not supported with sharded (fully_shard) models")
        comm.prepare(schedule.levels(), collective=False)  # raises if the block size K' is unknown
        self._assemble(models)
        self.t = 0
        self.stats = {level.value: CommStats() for level in schedule.levels()}
        descriptions = [
            describe(m, self._settings(o)) for m, o in zip(self.models, self.optimizers, strict=True)
        ]
        self._joined_average: tuple[int, nn.Module] | None = None  # (step, mean) of a join in an average
        if comm.fault_tolerant:
            self._check_fault_tolerant()
            self._join(descriptions)
        else:
            check_workers(comm, descriptions)
            comm.prepare(schedule.levels(), collective=True)
            if sync_initial:
                self._averager.broadcast_([[*shards(m), *m.buffers()] for m in self.models])
        self._ddp.arm(self.schedule.sync_at(self.t).gradients)

    def _assemble(self, models: Sequence[nn.Module]) -> None:
        """The collaborators, in this order: packing the parameters lays out the buffers."""
        policy = self.policy
        self._ddp = (
            FSDPArming(self.models[0], self.comm, policy.buffers)
            if self._sharded
            else DDPArming(models, self.comm, policy.buffers)
        )
        self._averager = FlatAverager(self.comm, policy.bucket_bytes, keep_buffers=not self._sharded)
        # Parameters become views into the averager's flat buffers: model averages copy nothing.
        # Whether that worked is part of the settings every worker must agree on (the packed and
        # the copied path lay the buffers out differently). FSDP owns a sharded model's storage:
        # its shards are averaged by copying.
        self._packed = not self._sharded and self._averager.pack_([list(m.parameters()) for m in self.models])
        # Gradients, once averaged, live in flat buffers too (made at the first gradient average;
        # DistributedDataParallel keeps its own buckets).
        self._pack_gradients = self._packed and not self._ddp.any
        self._gradient_average = GradientAverage(
            self.models, self.optimizers, self._averager, self._ddp, self._pack_gradients, policy.buffers
        )
        DelayedAverage.check(policy.overlap_steps, self.schedule)
        self._compressed = CompressedMean.of(policy.compression, self._packed or self._sharded)
        # Scheduled global averages that do not block (overlap, fragments, the mix rule) run in
        # flight (localsgd.streaming); so do compressed ones of unpacked (sharded) parameters, from
        # the in-flight average's own flat buffers, with τ = 0 (applied at once).
        unpacked_compression = self._compressed is not None and not self._packed
        if unpacked_compression and policy.optimizer_state != "local":
            raise ValueError("compression of sharded models needs optimizer_state='local'")
        streamed = policy.streams or policy.overlap_steps > 0 or unpacked_compression
        self._streaming = self._streams() if streamed else None
        # the blocking outer step runs on the whole model's flat buffers (one view each when packed)
        self._whole = Selection(whole(shards(self.models[0])), join=self._packed)
        self._outer = None if streamed else self._outer_step()
        self._parameter_average = ParameterAverage(
            self.models, self.optimizers, self._averager, policy.buffers, policy.optimizer_state,
            self._outer, self._compressed if self._packed and not streamed else None, self._whole,
        )  # fmt: skip

    def _outer_factory(self) -> OuterOptimizerFactory | None:
        """The policy's outer optimizer; compression, overlap and streaming need one (plain
        averaging by default)."""
        make = self.policy.outer_optimizer
        if make is None and (
            self.policy.compression is not None or self.policy.overlap_steps or self.policy.streams
        ):
            make = _plain_outer
        return make

    def _streams(self) -> Streaming:
        policy, make = self.policy, self._outer_factory()
        assert make is not None
        return Streaming(
            self.models, self.comm, policy.bucket_bytes, self.schedule, make, fragments=policy.fragments,
            delay=policy.overlap_steps, merge=policy.merge, alpha=policy.alpha,
            compression=policy.compression, anchor_device=policy.anchor_device, join=self._packed,
        )  # fmt: skip

    def _outer_step(self) -> OuterStep | None:
        """The outer step of blocking global averages, if the policy has one."""
        make = self._outer_factory()
        if make is None:
            return None
        return OuterStep(self._whole(self.models[0]), make, self.policy.anchor_device, self._whole.layout)

    # --- configuration -----------------------------------------------------------------------

    def _settings(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        return {
            "schedule": self.schedule.to_dict(),
            "workers": self.comm.workers,
            "workers_per_block": self.comm.workers_per_block,
            "ordered": self.comm.ordered,
            "buffers": self.policy.buffers,
            "optimizer_state": self.policy.optimizer_state,
            "bucket_bytes": self._averager.bucket_bytes,
            "packed_parameters": self._packed,
            "packed_gradients": self._pack_gradients,
            "optimizer": type(optimizer).__name__,
            "param_groups": [len(g["params"]) for g in optimizer.param_groups],
            "outer": next((o.describe() for o in self._outer_steps()), None),
            "compression": None if self._compressed is None else self._compressed.describe(),
            "overlap_steps": self.policy.overlap_steps,
            "max_grad_norm": self.policy.max_grad_norm,
            "fragments": self.policy.fragments,
            "merge": self.policy.merge,
            "alpha": self.policy.alpha,
        }

    def _outer_steps(self) -> list[OuterStep]:
        """The anchors and outer optimizers: one (blocking or overlapped), one per fragment, or none."""
        if self._streaming is not None:
            return self._streaming.outers
        return [] if self._outer is None else [self._outer]

    # --- the step ----------------------------------------------------------------------------

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One optimizer step of every local worker, with the communication the schedule names.

        A ``closure`` is evaluated once, before gradients are averaged (optimizers that evaluate
        the closure several times per step, like LBFGS, are not supported).
        """
        sync = self.schedule.sync_at(self.t)
        loss = None
        if closure is not None:
            if len(self.optimizers) != 1:
                raise ValueError("a closure needs a single worker; the simulator holds several")
            with torch.enable_grad():
                loss = closure()
        gradients = self._gradient_average.packed
        if gradients is not None:
            gradients.unbind_unreached()
        stepped = True  # False if a fault-tolerant gradient round was discarded: no update
        if sync.gradients is not None and self.comm.group_size(sync.gradients) > 1:
            stepped = self._round(sync.gradients, "gradients")
        self._finish_step(sync, stepped)
        return loss

    def _finish_step(self, sync: Sync, stepped: bool) -> None:
        """The rest of a step after its gradient average: the optimizer step, then the model average."""
        if self._outer is not None:
            if sync.gradients is Level.GLOBAL:  # mini-batch SGD: the anchor follows at the switch
                self._outer.current = False
            elif not self._outer.current:  # the first local step: every worker holds the same model
                self._outer.reset_(self._whole(self.models[0]))
        if self._streaming is not None:
            self._streaming.track(sync, self.models)
        if stepped and self.policy.max_grad_norm is not None:  # after any gradient average: clipped
            for k, (model, opt) in enumerate(zip(self.models, self.optimizers, strict=True)):
                if self.grad_scalers is not None:
                    self.grad_scalers[k].unscale_(opt)
                torch.nn.utils.clip_grad_norm_(model.parameters(), self.policy.max_grad_norm)
        # Every worker counts the step even if its GradScaler skips the update (inf/NaN gradients):
        # the schedule, and so every collective, stays in lockstep across workers.
        for k, opt in enumerate(self.optimizers):
            if not stepped:
                break
            if self.grad_scalers is None:
                opt.step()
            else:
                self.grad_scalers[k].step(opt)
        self.t += 1
        if self._streaming is not None:  # (no hierarchical schedules: every parameter average is global)
            self._stream(self.t - 1)
        elif sync.parameters is not None:
            self._average_model(sync.parameters, outer=True)
        self._ddp.arm(self.schedule.sync_at(self.t).gradients)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """The optimizers' ``zero_grad``. Once gradients have been averaged, they stay in flat
        buffers (see ``localsgd.gradients``) and are zeroed in place; ``p.grad`` is then a zero
        tensor rather than None until the next backward, and None again for the optimizer step
        if backward did not reach ``p``."""
        gradients = self._gradient_average.packed
        if gradients is None:
            for opt in self.optimizers:
                opt.zero_grad(set_to_none=set_to_none)
        else:
            gradients.zero_(set_to_none)

    def _stream(self, t: int) -> None:
        """After step ``t``: apply the in-flight averages due now, then start the one whose turn it
        is (applied at once with τ = 0)."""
        assert self._streaming is not None
        for delayed in self._streaming.due(t):
            self._apply_delayed(delayed)
        f = self._streaming.to_start(t)
        if f is None:
            return
        if self.comm.fault_tolerant and not self.policy.overlap_steps:  # a round among those present
            self._round(Level.GLOBAL, "parameters")
        elif self.comm.fault_tolerant:  # its round stays open until the average is applied
            self._open_round(f, t, self.comm.begin_round("parameters", self.t))
        else:
            self._timed(Level.GLOBAL, self._streaming.start(f, t))
            if self._streaming.fragments[f].due(t):  # τ = 0: the blocking average of the fragment
                self._apply_delayed(self._streaming.fragments[f])

    def _open_round(self, f: int, t: int, heals: list[tuple[int, int]]) -> None:
        """A fault-tolerant overlapped average (τ > 0): its round opens when it is sent after step
        ``t`` and ends when it is applied τ steps later (``_apply_delayed``), kept if committed."""
        assert self._streaming is not None
        for healer, source in heals:  # (the simulator's replay; a real worker heals inside begin_round)
            self._copy_worker(source, healer)
        try:
            self._timed(Level.GLOBAL, self._streaming.start(f, t))
        except CommunicationError:
            if self._streaming.fragments[f].pending is None:  # nothing in flight: the round ends now
                self.comm.end_round()

    def flush(self) -> None:
        """Apply the global averages still in flight now (e.g. at the end of training)."""
        if self._streaming is not None:
            for delayed in self._streaming.pending():
                self._apply_delayed(delayed)

    def _apply_delayed(self, delayed: DelayedAverage) -> None:
        if self.comm.fault_tolerant:  # the end of its round: applied if committed, else forgotten
            assert delayed.pending is not None
            delayed.pending.receive()  # (a failed collective is the round's: it is not committed)
            if not self.comm.end_round():
                delayed.discard()
                return
        start = time.perf_counter()
        try:
            delayed.apply(inner_lr=self.optimizers[0].param_groups[0]["lr"])
        except RuntimeError as e:
            raise CommunicationError(
                f"the overlapped average applied at step {self.t} failed; a worker is gone, stuck or "
                f"unreachable ({first_line(e)})"
            ) from e
        if self.comm.workers > 1:
            self.stats[Level.GLOBAL.value].seconds += time.perf_counter() - start

    def average_now(self, level: Level | str = Level.GLOBAL, buffers: bool | None = None) -> None:
        """Average the models now (e.g. before evaluation or saving). ``buffers`` overrides the
        buffer policy for this average (``True``: average BatchNorm statistics too). A plain
        average even with an outer optimizer: it takes no outer step and leaves the anchor as it
        is (the next scheduled global average's pseudo-gradient still covers the whole period).
        An overlapped average in flight is applied first."""
        self._only_in_rounds()
        self.flush()
        self._average_model(Level(level), buffers)

    @torch.no_grad()
    def averaged_model(self, into: nn.Module | None = None) -> nn.Module:
        """A new model holding the mean of all K workers' parameters and floating buffers; the
        workers are left as they are (for evaluation; not counted in ``stats``).

        Sharded models: pass ``into``, the same model unsharded (e.g. built again), which receives
        the mean whole on every rank (a whole model's memory; buffers, kept per rank by FSDP, are
        averaged over all ranks); ``average_now()`` and evaluating the sharded model needs none.
        """
        if self.comm.fault_tolerant:
            return self._averaged_in_round()
        try:
            if self._sharded:
                if into is None:
                    raise ValueError(
                        "averaged_model() of a sharded model needs into= (the same model unsharded), "
                        "or call average_now() and evaluate the model itself"
                    )
                return average_into(self._averager, self.models[0], into)
            return self._averaged_model()
        except RuntimeError as e:
            raise CommunicationError(f"averaging the models for evaluation failed ({first_line(e)})") from e

    @torch.no_grad()
    def _averaged_in_round(self) -> nn.Module:
        """``averaged_model()`` of a fault-tolerant run: a round of kind ``average`` among the
        workers present (every worker calls it at the same step), the mean over its contributors.
        The workers are left as they are; a worker joining the run heals in it like in any round."""
        joined, self._joined_average = self._joined_average, None
        if joined is not None and joined[0] == self.t:  # this worker joined the run in this very round
            return joined[1]
        if self._streaming is not None and self._streaming.pending():
            # inside an overlapped average's open round: the mean over its contributors, in it
            return self._averaged_model()
        heals = self.comm.begin_round("average", self.t)
        for healer, source in heals:  # (the simulator's replay)
            self._copy_worker(source, healer)
        model = self._averaged_model()
        if not self.comm.end_round():
            raise CommunicationError(
                f"the average at step {self.t} was not committed (a worker left during it); this "
                "worker's model is its own until its next round"
            )
        return model

    @torch.no_grad()
    def _averaged_model(self) -> nn.Module:
        clones = [
            [t.detach().clone() for t in (*m.parameters(), *float_buffers(m, True))] for m in self.models
        ]
        self._averager.average_(Level.GLOBAL, clones)
        model = copy.deepcopy(self.models[0])
        for t, mean in zip((*model.parameters(), *float_buffers(model, True)), clones[0], strict=True):
            t.copy_(mean)
        return model

    def _timed(self, level: Level, run: Round) -> None:
        """Run a round; count it unless the worker is alone at ``level`` (it then sent nothing)."""
        start = time.perf_counter()
        try:
            nbytes = run()
        except RuntimeError as e:  # one clear line instead of a backend traceback on every survivor
            raise CommunicationError(
                f"averaging at step {self.t} ({level.value} level) failed; a worker is gone, stuck or "
                f"unreachable ({first_line(e)})"
            ) from e
        if self.comm.group_size(level) == 1:
            return  # a lone worker has nothing to average, and counts nothing
        stats = self.stats[level.value]
        stats.seconds += time.perf_counter() - start
        stats.bytes += nbytes
        stats.rounds += 1

    def _average_model(self, level: Level, buffers: bool | None = None, outer: bool = False) -> None:
        lone = self.comm.group_size(level) == 1
        if lone and (self._outer is None or not outer) and self.policy.optimizer_state != "reset":
            return  # nothing to average with, no outer step, no state to clear
        if outer and level is Level.GLOBAL:
            self._round(level, "parameters")
        else:
            self._timed(level, self._parameter_average.prepare(level, buffers, outer, lone))

    # --- fault-tolerant global rounds (localsgd.ft; replayed by localsgd.membership) ----------

    def _prepare(self, level: Level, kind: str) -> Round:
        if kind == "gradients":
            return self._gradient_average.prepare(level)
        if self._streaming is not None:
            return self._fragment_round(self.t - 1)
        return self._parameter_average.prepare(level, None, True, self.comm.group_size(level) == 1)

    def _fragment_round(self, t: int) -> Round:
        """The blocking (τ = 0) average of the fragment whose turn is after step ``t``, as one
        round: sent and applied (a fault-tolerant run's streamed rounds)."""
        assert self._streaming is not None
        f = self._streaming.to_start(t)
        assert f is not None, f"no fragment syncs after step {t}"
        start, fragment = self._streaming.start(f, t), self._streaming.fragments[f]

        def run() -> int:
            nbytes = start()
            fragment.apply(inner_lr=self.optimizers[0].param_groups[0]["lr"])
            return nbytes

        return run

    def _round(self, level: Level, kind: str) -> bool:
        """A scheduled round; with a fault-tolerant communicator at the global level, among the
        workers present, and undone if this worker does not commit it. Returns whether it was kept."""
        if not (self.comm.fault_tolerant and level is Level.GLOBAL):
            self._timed(level, self._prepare(level, kind))
            return True
        return self._kept_round(kind, self.comm.begin_round(kind, self.t))

    def _kept_round(self, kind: str, heals: list[tuple[int, int]]) -> bool:
        for healer, source in heals:  # (the simulator's replay; a real worker heals inside begin_round)
            self._copy_worker(source, healer)
        saved = self._snapshot() if kind == "parameters" else None  # a gradient round changes no state
        with contextlib.suppress(CommunicationError):  # the communicator knows: it does not commit
            self._timed(Level.GLOBAL, self._prepare(Level.GLOBAL, kind))
        if self.comm.end_round():
            return True
        if saved is not None:
            self._restore(saved)
        return False

    def _copy_worker(self, source: int, healer: int) -> None:
        self.models[healer].load_state_dict(self.models[source].state_dict())
        self.optimizers[healer].load_state_dict(copy.deepcopy(self.optimizers[source].state_dict()))
        self._forget_residuals(healer)

    def _state(self, optimizers: bool) -> dict[str, Any]:
        """The engine's state (step, anchor, outer optimizer), every local worker's model and, with
        ``optimizers``, its optimizer's state; ``_restore`` loads it."""
        return {
            "engine": Engine.state_dict(self),
            "models": [m.state_dict() for m in self.models],
            "optimizers": [o.state_dict() for o in self.optimizers] if optimizers else None,
        }

    def _snapshot(self) -> dict[str, Any]:
        """What a parameter round changes, to undo it (the optimizers' state only if the policy
        averages or resets it)."""
        return _cloned(self._state(optimizers=self.policy.optimizer_state != "local"))

    def _restore(self, saved: dict[str, Any]) -> None:
        Engine.load_state_dict(self, saved["engine"])
        for m, s in zip(self.models, saved["models"], strict=True):
            m.load_state_dict(s)
        if saved["optimizers"] is not None:
            for o, s in zip(self.optimizers, saved["optimizers"], strict=True):
                o.load_state_dict(s)

    def _only_in_rounds(self) -> None:
        if self.comm.fault_tolerant:
            raise RuntimeError(
                "a fault-tolerant run changes its workers' models only in its scheduled global rounds (no "
                "average_now()); averaged_model() gives the mean without changing them"
            )

    def _check_fault_tolerant(self) -> None:
        unsupported = {
            "hierarchical schedules": Level.BLOCK in self.schedule.levels(),
            "sharded models": self._sharded,
            "DistributedDataParallel": self._ddp.any,
        }
        named = [name for name, used in unsupported.items() if used]
        if named:
            raise ValueError(f"a fault-tolerant communicator does not support {', '.join(named)} yet")

    def heal_state(self) -> dict[str, Any]:
        """What a (re)joining worker receives from a live one (``load_heal_state`` on its side)."""
        return self._state(optimizers=True)

    def load_heal_state(self, state: dict[str, Any]) -> None:
        self._restore(state)
        self._forget_residuals(0)

    def _forget_residuals(self, healer: int) -> None:
        """A healed worker's error feedback starts from zero: what its source's encodings lost is
        carried by the source (the blocking average's, or every fragment's)."""
        if self._streaming is not None:
            means = [d.compressed for d in self._streaming.fragments]
        else:
            means = [self._compressed]
        for mean in means:
            if mean is not None:
                mean.reset(healer)

    def _join(self, descriptions: list[dict[str, Any]]) -> None:
        """Enter a fault-tolerant run: at the start, with the others; later, by healing from a live
        worker inside its current round, which this worker then completes as they do."""
        while True:
            kind = self.comm.join(self, descriptions)
            if kind is None:
                return
            if kind == "average":  # the healed worker is in the others' evaluation: it adds nothing
                model = self._averaged_model()
                kept = self.comm.end_round()
                if kept:  # this step's averaged_model(): the others' round, not a second one alone
                    self._joined_average = (self.t, model)
            elif kind == "parameters" and self.policy.overlap_steps:  # an overlapped average's round
                assert self._streaming is not None
                f = self._streaming.to_start(self.t - 1)
                assert f is not None, f"no average is sent after step {self.t - 1}"
                self._open_round(f, self.t - 1, [])
                return  # (its round ends when the average is applied)
            elif kind == "parameters":
                kept = self._kept_round(kind, [])
            else:
                sync = self.schedule.sync_at(self.t)
                for m in self.models:  # a healer adds nothing to the mean, but the round needs gradients
                    for p in m.parameters():
                        if p.requires_grad and p.grad is None:
                            p.grad = torch.zeros_like(p)
                kept = self._kept_round(kind, [])
                self._finish_step(sync, kept)
                self.zero_grad()
            if kept:
                return

    # --- state -------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Step, schedule, policies, counters and the outer step's anchor and optimizer
        (subclasses add optimizer and model state)."""
        state = {
            "t": self.t,
            "schedule": self.schedule.to_dict(),
            "buffers": self.policy.buffers,
            "optimizer_state": self.policy.optimizer_state,
            "stats": {level: asdict(s) for level, s in self.stats.items()},
        }
        if self._streaming is not None:
            state.update(self._streaming.state_dict())
            return state
        if self._outer is not None:
            state["outer"] = self._outer.state_dict()
        if self._compressed is not None:
            state["compression"] = self._compressed.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for key in ("schedule", "buffers", "optimizer_state"):
            mine = self.schedule.to_dict() if key == "schedule" else getattr(self.policy, key)
            if state_dict[key] != mine:
                raise ValueError(
                    f"the checkpoint was written with {key}={state_dict[key]!r}, "
                    f"but this run has {key}={mine!r}"
                )
        saved_outer = "outer" in state_dict or "streaming" in state_dict
        if saved_outer != bool(self._outer_steps()):
            saved, mine = ("an", "no") if saved_outer else ("no", "an")
            raise ValueError(
                f"the checkpoint was written with {saved} outer optimizer, but this run has {mine}"
            )
        in_flight = ("delayed" in state_dict or "streaming" in state_dict) != (self._streaming is not None)
        if in_flight:
            raise ValueError("the checkpoint and this run differ in whether averages are overlapped")
        if self._streaming is not None:
            self._streaming.drop()  # averages in flight: before what they write into is replaced
        self.t = int(state_dict["t"])
        self.stats = {level: CommStats(**s) for level, s in state_dict["stats"].items()}
        if self._streaming is not None:
            self._streaming.load_state_dict(state_dict)
        else:
            if self._outer is not None:
                self._outer.load_state_dict(state_dict["outer"])
            if ("compression" in state_dict) != (self._compressed is not None):
                raise ValueError("the checkpoint and this run differ in whether averages are compressed")
            if self._compressed is not None:
                self._compressed.load_state_dict(state_dict["compression"])
        self._ddp.arm(self.schedule.sync_at(self.t).gradients)
