"""PyTorch Lightning: ``LocalSGDStrategy``, a ``DDPStrategy`` whose optimizer is ``localsgd.LocalSGD``.

>>> from localsgd import Schedule, diloco
>>> from localsgd.integrations.lightning import LocalSGDStrategy
>>> trainer = lightning.pytorch.Trainer(strategy=LocalSGDStrategy(Schedule.post_local(16, 200)), ...)
>>> trainer = lightning.pytorch.Trainer(
...     strategy=LocalSGDStrategy(Schedule.local(500), outer_optimizer=diloco()), ...)  # DiLoCo

How it hooks into Lightning (``DDPStrategy`` otherwise unchanged):

* ``setup_optimizers``: after ``DDPStrategy`` has wrapped the module in ``DistributedDataParallel``
  and Lightning has built the optimizer from ``configure_optimizers``, the optimizer is replaced by
  ``LocalSGD(optimizer, ddp_model, schedule, ...)``. Everything downstream (``LightningOptimizer``,
  the precision plugin's ``optimizer.step(closure)``, ``zero_grad``, learning-rate schedulers,
  which keep the inner optimizer: the wrapper shares its ``param_groups``) then drives the engine
  exactly as a hand-written loop does: the closure (forward, backward, Lightning's
  ``on_before_optimizer_step``) runs first, then the schedule's communication, then the inner
  step. DDP's gradient all-reduce runs only in steps that average gradients (``DDPArming``).
  With manual optimization, Lightning's DDP forward redirection would switch that all-reduce on
  after every ``training_step``; the strategy's redirection keeps ``LocalSGD``'s setting instead.
* ``optimizer_state`` / ``load_optimizer_state_dict``: Lightning writes a checkpoint from rank 0
  only, but local SGD's workers differ between averages (parameters, optimizer state, error
  feedback), so each rank's state (its module ``state_dict`` and ``LocalSGD.state_dict()``: step
  counter, inner optimizer, anchor and outer optimizer, compression residuals, overlapped average,
  counters) is gathered to rank 0 into the checkpoint's ``optimizer_states`` entry, and on
  ``Trainer.fit(ckpt_path=...)`` every rank loads its own back, after Lightning has restored rank
  0's module. A resumed run then continues exactly. The checkpoint's ``state_dict`` is rank 0's
  worker model (between averages not the mean of the workers).

* ``setup``: Lightning broadcasts rank 0's SIGTERM flag before every batch; the strategy makes
  that broadcast only before steps that communicate globally anyway, so local steps send nothing.

Steps, H and t' count optimizer steps: with ``accumulate_grad_batches=N`` one localsgd step is N
batches (Lightning's ``no_sync`` for the first N - 1 restores localsgd's setting, so the
accumulated gradient is all-reduced only in the mini-batch phase). Clip with the strategy's
``max_grad_norm=c`` (inside the step, after any gradient average), not the Trainer's
``gradient_clip_val``, which runs inside the closure, before localsgd's own gradient averages
(block level), and is refused. ``precision="16-mixed"`` (a GradScaler that may skip a step on one
rank, which would break the lockstep) is refused; bf16 and 32-bit work.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

try:
    import lightning.pytorch as pl
    from lightning.fabric.utilities.optimizer import _optimizer_to_device
    from lightning.pytorch.core.optimizer import LightningOptimizer
    from lightning.pytorch.plugins.precision import MixedPrecision
    from lightning.pytorch.strategies import DDPStrategy
    from lightning.pytorch.strategies.ddp import _DDPForwardRedirection
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "localsgd.integrations.lightning needs PyTorch Lightning (the 'lightning' package): "
        "pip install 'localsgd[lightning]'"
    ) from e

from localsgd.integrations._common import copy_to, take_policy
from localsgd.policy import Policy
from localsgd.schedule import Level, Schedule
from localsgd.wrapper import LocalSGD

__all__ = ["LocalSGDStrategy"]

_WORKERS_KEY = "localsgd_workers"
_REFUSED = ("ddp_comm_state", "ddp_comm_hook", "ddp_comm_wrapper", "model_averaging_period")


class _KeepArming(_DDPForwardRedirection):
    """With manual optimization, Lightning switches DDP's gradient sync off after ``training_step``
    and back on (for every step) after DDP's forward; this puts back the setting ``LocalSGD`` made
    for the next step instead (``training_step`` called ``opt.step()``, which armed it)."""

    def __init__(self) -> None:
        super().__init__()
        self._armed: bool | None = None

    def on_after_inner_forward(
        self, wrapper_module: torch.nn.Module, original_module: pl.LightningModule
    ) -> None:
        if isinstance(wrapper_module, DistributedDataParallel):
            self._armed = wrapper_module.require_backward_grad_sync
        super().on_after_inner_forward(wrapper_module, original_module)

    def on_after_outer_forward(
        self, wrapper_module: torch.nn.Module, original_module: pl.LightningModule
    ) -> None:
        super().on_after_outer_forward(wrapper_module, original_module)
        if isinstance(wrapper_module, DistributedDataParallel) and self._armed is not None:
            wrapper_module.require_backward_grad_sync = self._armed
            self._armed = None


class LocalSGDStrategy(DDPStrategy):
    """Local SGD, post-local SGD, hierarchical local SGD, DiLoCo and SlowMo under Lightning.

    Args:
        schedule: when to average (``localsgd.Schedule``); steps are optimizer steps.
        policy, **kwargs: how to average, as a ``localsgd.Policy`` or its fields' keywords
            (``outer_optimizer=diloco()``, ``compression="int8"``, ``max_grad_norm=1.0``, ...).
            The remaining keywords go to ``DDPStrategy`` (``accelerator``, ``process_group_backend``,
            ``timeout``, ``start_method``) and from there to ``DistributedDataParallel``. DDP's
            buffer broadcast at every forward is off by default (it would overwrite the workers'
            own BatchNorm statistics); DDP communication hooks and ``model_averaging_period``
            (Lightning's own post-local SGD) are refused: this strategy does the averaging.
        workers_per_block: K' for hierarchical schedules (default: the devices per node).
    """

    def __init__(
        self,
        schedule: Schedule,
        *,
        policy: Policy | None = None,
        workers_per_block: int | None = None,
        **kwargs: Any,
    ) -> None:
        self.policy = take_policy(schedule, policy, kwargs)
        for name in _REFUSED:
            if kwargs.get(name) is not None:
                raise ValueError(
                    f"LocalSGDStrategy does the averaging itself; {name} (DDPStrategy's post-local SGD "
                    "through DDP communication hooks) cannot be combined with it"
                )
        self.schedule = schedule
        self._workers_per_block = workers_per_block
        if "broadcast_buffers" not in kwargs and "forward_sync_buffers" not in kwargs:
            # torch 2.13 renamed broadcast_buffers (now a deprecated alias) to forward_sync_buffers
            ddp_args = inspect.signature(DistributedDataParallel.__init__).parameters
            name = "forward_sync_buffers" if "forward_sync_buffers" in ddp_args else "broadcast_buffers"
            kwargs[name] = False
        super().__init__(**kwargs)
        self._forward_redirection = _KeepArming()
        self._engines: list[LocalSGD] = []

    @property
    def engine(self) -> LocalSGD:
        """The ``LocalSGD`` wrapper of this rank (``.t``, ``.stats``, ``.average_now()``, ...); set up
        by ``Trainer.fit`` and kept after it (for ``stats``)."""
        if not self._engines:
            raise RuntimeError("LocalSGDStrategy sets up its LocalSGD optimizer in Trainer.fit")
        return self._engines[0]

    # --- setup -------------------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer) -> None:
        if trainer.gradient_clip_val is not None and trainer.gradient_clip_val > 0:
            raise ValueError(
                "LocalSGDStrategy: Trainer(gradient_clip_val=...) clips before localsgd averages the "
                "gradients itself; use LocalSGDStrategy(..., max_grad_norm=c) instead, which clips "
                "inside the step (in the mini-batch phase the averaged gradient)"
            )
        if isinstance(self.precision_plugin, MixedPrecision) and self.precision_plugin.scaler is not None:
            raise ValueError(
                "LocalSGDStrategy does not support precision='16-mixed' yet (its GradScaler may skip "
                "a step on one rank only, and the ranks' schedules would drift apart); use "
                "'bf16-mixed' or 32-bit"
            )
        super().setup(trainer)
        self._check_sigterm_at_rounds(trainer)

    def _check_sigterm_at_rounds(self, trainer: pl.Trainer) -> None:
        """Lightning (2.5 and later) broadcasts rank 0's SIGTERM flag before every batch, a
        collective in every local step; it is broadcast only before steps that communicate
        globally anyway (every step before t', then every H steps), so a SIGTERM stops the run
        within one period."""
        loop = trainer.fit_loop.epoch_loop
        broadcast = getattr(loop, "_broadcast_sigterm_tensor", None)
        if broadcast is None:  # a Lightning without it
            return

        def at_global_rounds() -> None:
            sync = self.schedule.sync_at(self.engine.t) if self._engines else None
            if sync is None or Level.GLOBAL in (sync.gradients, sync.parameters):
                broadcast()

        loop._broadcast_sigterm_tensor = at_global_rounds

    def setup_optimizers(self, trainer: pl.Trainer) -> None:
        super().setup_optimizers(trainer)
        if len(self.optimizers) != 1:
            raise ValueError(
                f"LocalSGDStrategy supports one optimizer per LightningModule, got {len(self.optimizers)}"
            )
        assert isinstance(self.model, DistributedDataParallel)
        workers_per_block = self._workers_per_block
        if workers_per_block is None and self.schedule.is_hierarchical:
            workers_per_block = self.num_processes
        self._engines = [
            LocalSGD(
                optimizer,
                self.model,
                self.schedule,
                workers_per_block=workers_per_block,
                policy=self.policy,
            )
            for optimizer in self.optimizers
        ]
        self.optimizers = list(self._engines)

    # --- checkpoints -------------------------------------------------------------------------

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """Every rank's state, gathered to rank 0 (a collective: Lightning calls it on every rank
        while it dumps a checkpoint, and writes rank 0's)."""
        if isinstance(optimizer, LightningOptimizer):
            optimizer = optimizer._optimizer
        if not isinstance(optimizer, LocalSGD):
            return super().optimizer_state(optimizer)
        assert self.lightning_module is not None
        mine = copy_to({"model": self.lightning_module.state_dict(), "optimizer": optimizer.state_dict()})
        gathered: list[Any] | None = [None] * self.world_size if self.is_global_zero else None
        dist.gather_object(mine, gathered, dst=0)
        return {_WORKERS_KEY: gathered} if self.is_global_zero else {}

    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        """Each rank loads its own module and ``LocalSGD`` state (after Lightning loaded rank 0's
        module into every rank)."""
        states = checkpoint["optimizer_states"]
        if len(states) != len(self.optimizers):
            raise ValueError(
                f"the checkpoint holds {len(states)} optimizer states, this run has {len(self.optimizers)}"
            )
        for optimizer, state in zip(self.optimizers, states, strict=True):
            if _WORKERS_KEY not in state:
                raise ValueError(
                    "the checkpoint was not written by LocalSGDStrategy (it has no per-worker localsgd "
                    "state); resume it with the strategy it was written with"
                )
            workers = state[_WORKERS_KEY]
            if len(workers) != self.world_size:
                raise ValueError(
                    f"the checkpoint was written by {len(workers)} workers, but this run has "
                    f"{self.world_size}; local SGD's workers differ and cannot be resharded"
                )
            mine = workers[self.global_rank]
            assert self.lightning_module is not None
            self.lightning_module.load_state_dict(mine["model"])
            optimizer.load_state_dict(mine["optimizer"])
            _optimizer_to_device(optimizer, self.root_device)
