"""The step logic shared by both runtimes: asks the schedule what step ``t`` communicates, then
averages gradients (before the optimizer step) or the model (after it) through the averager.

``LocalSGD`` (one worker per process) and ``Simulator`` (K workers in one process) are thin
subclasses; they differ only in how many (model, optimizer) pairs they hold and in their
communicator.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from localsgd.averaging import DEFAULT_BUCKET_BYTES, FlatAverager
from localsgd.checks import check_workers, describe
from localsgd.comm import Communicator, DistCommunicator
from localsgd.gradients import PackedGradients
from localsgd.schedule import Level, Schedule

BUFFER_POLICIES = ("local", "average")
OPTIMIZER_STATE_POLICIES = ("local", "average", "reset")


class CommunicationError(RuntimeError):
    """A collective failed: a peer died, hung past the timeout, or the network broke."""


def first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


@dataclass
class CommStats:
    """Communication at one level: averaging rounds, payload bytes per worker, seconds spent."""

    rounds: int = 0
    bytes: int = 0
    seconds: float = 0.0


def _check_choice(name: str, value: object, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")


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
        buffers: floating-point buffers (BatchNorm statistics) at averaging rounds: ``"local"``
            keeps each worker's own (the paper), ``"average"`` averages them. Integer buffers
            (``num_batches_tracked``) are never averaged.
        optimizer_state: at parameter averages, ``"local"`` keeps each worker's optimizer state
            (the paper), ``"average"`` averages its floating tensors (e.g. momentum), ``"reset"``
            clears it.
        bucket_bytes: largest flat buffer per collective for copied tensors (buffers, optimizer
            state); the packed parameters and gradient windows are one buffer per dtype and device.
        sync_initial: copy worker 0's parameters and buffers to all workers at construction.
        grad_scalers: one ``torch.amp.GradScaler`` per optimizer, or ``None``. The engine then
            calls ``scaler.step(optimizer)`` itself and keeps to the schedule when a scaler skips
            a step for inf/NaN gradients (the caller still calls ``scaler.update()``).
    """

    def __init__(
        self,
        models: Sequence[nn.Module],
        optimizers: Sequence[torch.optim.Optimizer],
        comm: Communicator,
        schedule: Schedule,
        *,
        buffers: str = "local",
        optimizer_state: str = "local",
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
        sync_initial: bool = True,
        grad_scalers: Sequence[torch.amp.GradScaler] | None = None,
    ) -> None:
        if not isinstance(schedule, Schedule):
            raise TypeError(f"schedule must be a localsgd.Schedule, got {type(schedule).__name__}")
        _check_choice("buffers", buffers, BUFFER_POLICIES)
        _check_choice("optimizer_state", optimizer_state, OPTIMIZER_STATE_POLICIES)
        self.schedule = schedule
        self.comm = comm
        self.buffers = buffers
        self.optimizer_state = optimizer_state
        self._ddp = [m if isinstance(m, DistributedDataParallel) else None for m in models]
        self.models = [m.module if isinstance(m, DistributedDataParallel) else m for m in models]
        self.optimizers = list(optimizers)
        self.grad_scalers = list(grad_scalers) if grad_scalers is not None else None
        if self.grad_scalers is not None and len(self.grad_scalers) != len(self.optimizers):
            raise ValueError(
                f"need one GradScaler per optimizer: {len(self.optimizers)} optimizers, "
                f"{len(self.grad_scalers)} scalers"
            )
        for model, opt in zip(self.models, self.optimizers, strict=True):
            owned = {id(p) for p in model.parameters()}
            for group in opt.param_groups:
                for p in group["params"]:
                    if id(p) not in owned:
                        raise ValueError(
                            f"the optimizer holds a parameter of shape {tuple(p.shape)} that is not "
                            "a parameter of the model; pass the model whose parameters it optimizes"
                        )
        comm.prepare(schedule.levels(), collective=False)  # raises if the block size K' is unknown
        self._ddp_group_matches = [self._check_ddp(d) for d in self._ddp]
        self._averager = FlatAverager(comm, bucket_bytes)
        # Parameters become views into the averager's flat buffers: model averages copy nothing.
        # Whether that worked is part of the settings every worker must agree on (the packed and
        # the copied path lay the buffers out differently).
        self._packed = self._averager.pack_([list(m.parameters()) for m in self.models])
        # Gradients, once averaged, live in flat buffers too (made at the first gradient average;
        # DistributedDataParallel keeps its own buckets).
        self._pack_gradients = self._packed and all(d is None for d in self._ddp)
        self._gradients: PackedGradients | None = None
        self.t = 0
        self.stats = {level.value: CommStats() for level in schedule.levels()}
        check_workers(
            comm, [describe(m, self._settings(o)) for m, o in zip(self.models, self.optimizers, strict=True)]
        )
        comm.prepare(schedule.levels(), collective=True)
        if sync_initial:
            self._averager.broadcast_([[*m.parameters(), *m.buffers()] for m in self.models])
        self._arm_ddp()

    # --- configuration -----------------------------------------------------------------------

    def _settings(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        return {
            "schedule": self.schedule.to_dict(),
            "workers": self.comm.workers,
            "workers_per_block": self.comm.workers_per_block,
            "ordered": self.comm.ordered,
            "buffers": self.buffers,
            "optimizer_state": self.optimizer_state,
            "bucket_bytes": self._averager.bucket_bytes,
            "packed_parameters": self._packed,
            "packed_gradients": self._pack_gradients,
            "optimizer": type(optimizer).__name__,
            "param_groups": [len(g["params"]) for g in optimizer.param_groups],
        }

    def _check_ddp(self, ddp: DistributedDataParallel | None) -> bool:
        if ddp is None:
            return False
        if not isinstance(self.comm, DistCommunicator):
            raise ValueError("DistributedDataParallel models need torch.distributed, not the simulator")
        # torch 2.13 renamed broadcast_buffers (now a deprecated alias) to forward_sync_buffers
        syncs_buffers = getattr(ddp, "forward_sync_buffers", None)
        if syncs_buffers is None:
            syncs_buffers = ddp.broadcast_buffers
        if syncs_buffers and self.buffers == "local":
            raise ValueError(
                "DistributedDataParallel overwrites every worker's buffers (BatchNorm statistics) with "
                "rank 0's at each forward, which contradicts buffers='local'; construct it with "
                "forward_sync_buffers=False (torch >= 2.13) or broadcast_buffers=False (older torch)"
            )
        ranks = dist.get_process_group_ranks
        return ranks(ddp.process_group) == ranks(self.comm.group)

    def _ddp_syncs(self, level: Level | None) -> bool:
        """Whether DistributedDataParallel's own gradient all-reduce does this level's averaging."""
        return level is Level.GLOBAL and all(self._ddp_group_matches) and self._ddp[0] is not None

    def _arm_ddp(self) -> None:
        """Switch DDP's gradient sync on for the next step only if it should average gradients."""
        on = self._ddp_syncs(self.schedule.sync_at(self.t).gradients)
        for ddp in self._ddp:
            if ddp is not None:
                ddp.require_backward_grad_sync = on

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
        if self._gradients is not None:
            self._gradients.unbind_unreached()
        if sync.gradients is not None:
            self._average_gradients(sync.gradients)
        # Every worker counts the step even if its GradScaler skips the update (inf/NaN gradients):
        # the schedule, and so every collective, stays in lockstep across workers.
        for k, opt in enumerate(self.optimizers):
            if self.grad_scalers is None:
                opt.step()
            else:
                self.grad_scalers[k].step(opt)
        self.t += 1
        if sync.parameters is not None:
            self._average_model(sync.parameters)
        self._arm_ddp()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """The optimizers' ``zero_grad``. Once gradients have been averaged, they stay in flat
        buffers (see ``localsgd.gradients``) and are zeroed in place; ``p.grad`` is then a zero
        tensor rather than None until the next backward, and None again for the optimizer step
        if backward did not reach ``p``."""
        if self._gradients is None:
            for opt in self.optimizers:
                opt.zero_grad(set_to_none=set_to_none)
        else:
            self._gradients.zero_(set_to_none)

    def average_now(self, level: Level | str = Level.GLOBAL, buffers: bool | None = None) -> None:
        """Average the models now (e.g. before evaluation or saving). ``buffers`` overrides the
        buffer policy for this average (``True``: average BatchNorm statistics too)."""
        self._average_model(Level(level), buffers)

    @torch.no_grad()
    def averaged_model(self) -> nn.Module:
        """A new model holding the mean of all K workers' parameters and floating buffers; the
        workers are left as they are (for evaluation; not counted in ``stats``)."""
        try:
            return self._averaged_model()
        except RuntimeError as e:
            raise CommunicationError(f"averaging the models for evaluation failed ({first_line(e)})") from e

    @torch.no_grad()
    def _averaged_model(self) -> nn.Module:
        clones = [
            [t.detach().clone() for t in (*m.parameters(), *self._float_buffers(m, True))]
            for m in self.models
        ]
        self._averager.average_(Level.GLOBAL, clones)
        model = copy.deepcopy(self.models[0])
        for t, mean in zip((*model.parameters(), *self._float_buffers(model, True)), clones[0], strict=True):
            t.copy_(mean)
        return model

    def _float_buffers(self, model: nn.Module, average: bool | None = None) -> list[torch.Tensor]:
        if not (self.buffers == "average" if average is None else average):
            return []
        return [b for b in model.buffers() if b.is_floating_point()]

    def _timed(self, level: Level, fn: Callable[[], int]) -> None:
        if self.comm.group_size(level) == 1:
            return  # a lone worker has nothing to average
        start = time.perf_counter()
        try:
            nbytes = fn()
        except RuntimeError as e:  # one clear line instead of a backend traceback on every survivor
            raise CommunicationError(
                f"averaging at step {self.t} ({level.value} level) failed; a worker is gone, stuck or "
                f"unreachable ({first_line(e)})"
            ) from e
        stats = self.stats[level.value]
        stats.seconds += time.perf_counter() - start
        stats.bytes += nbytes
        stats.rounds += 1

    def _average_gradients(self, level: Level) -> None:
        if self.comm.group_size(level) == 1:
            return  # a lone worker has nothing to average
        ddp_syncs = self._ddp_syncs(level)
        params = [[p for p in m.parameters() if p.requires_grad] for m in self.models]
        packed = self._packed_gradients(params)
        per_worker, filled = [], []
        for k, model in enumerate(self.models):
            tensors = self._float_buffers(model)
            if packed is not None:
                tensors = [*packed.gather(k), *tensors]
            elif params[k] and not ddp_syncs:
                grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params[k]]
                # One flag per parameter: after averaging it is > 0 iff some worker had a gradient.
                had = [p.grad is not None for p in params[k]]
                if all(had):  # no copy from the host (a synchronisation on a GPU)
                    used = torch.ones(len(had), device=params[k][0].device)
                else:
                    used = torch.tensor(had, dtype=torch.float32).to(params[k][0].device)
                filled.append((params[k], grads, used, all(had)))
                tensors = [*grads, used, *tensors]
            per_worker.append(tensors)
        averager = packed.averager if packed is not None else self._averager

        def run() -> int:
            nbytes = averager.average_(level, per_worker)
            if ddp_syncs:  # DDP averaged the gradients inside backward(); count its payload too
                nbytes += sum(p.numel() * p.element_size() for p in params[0])
            if packed is not None:
                for k in range(len(self.models)):
                    packed.scatter(k)
            for ps, grads, used, had_all in filled:
                # a gradient this worker had is in the mean: read the flags only if it lacked one
                for p, g, u in zip(ps, grads, [1.0] * len(ps) if had_all else used.tolist(), strict=True):
                    p.grad = g if u > 0 else None
            return nbytes

        self._timed(level, run)

    def _packed_gradients(self, params: list[list[nn.Parameter]]) -> PackedGradients | None:
        """The gradient windows for these parameters (made at the first call), or None if the
        gradients are averaged by copying (DDP, unpacked parameters, ``requires_grad`` changed)."""
        if not self._pack_gradients or not params[0]:
            return None
        if self._gradients is None:
            optimized = [[p for g in opt.param_groups for p in g["params"]] for opt in self.optimizers]
            averager = FlatAverager(self.comm, self._averager.bucket_bytes)
            self._gradients = PackedGradients(averager, params, optimized)
        if all(self._gradients.holds(k, ps) for k, ps in enumerate(params)):
            return self._gradients
        return None

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
                        tensors.append(value)
        return tensors

    def _average_model(self, level: Level, buffers: bool | None = None) -> None:
        per_worker = [
            [*m.parameters(), *self._float_buffers(m, buffers), *self._optimizer_tensors(o)]
            for m, o in zip(self.models, self.optimizers, strict=True)
        ]
        self._timed(level, lambda: self._averager.average_(level, per_worker))
        if self.optimizer_state == "reset":
            for opt in self.optimizers:
                opt.state.clear()

    # --- state -------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Step, schedule, policies and counters (subclasses add optimizer and model state)."""
        return {
            "t": self.t,
            "schedule": self.schedule.to_dict(),
            "buffers": self.buffers,
            "optimizer_state": self.optimizer_state,
            "stats": {level: asdict(s) for level, s in self.stats.items()},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for key in ("schedule", "buffers", "optimizer_state"):
            mine = self.schedule.to_dict() if key == "schedule" else getattr(self, key)
            if state_dict[key] != mine:
                raise ValueError(
                    f"the checkpoint was written with {key}={state_dict[key]!r}, "
                    f"but this run has {key}={mine!r}"
                )
        self.t = int(state_dict["t"])
        self.stats = {level: CommStats(**s) for level, s in state_dict["stats"].items()}
        self._arm_ddp()
