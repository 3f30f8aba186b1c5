"""Hugging Face Trainer: ``LocalSGDTrainer``, a ``transformers.Trainer`` whose optimizer step is
``localsgd.LocalSGD``'s.

>>> from localsgd import Schedule, diloco
>>> from localsgd.integrations.transformers import LocalSGDTrainer
>>> trainer = LocalSGDTrainer(model=model, args=args, train_dataset=data,
...                           schedule=Schedule.post_local(local_steps=16, switch_step=200))
>>> trainer = LocalSGDTrainer(model=model, args=args, train_dataset=data,
...                           schedule=Schedule.local(500), outer_optimizer=diloco())  # DiLoCo

A subclass, not a ``TrainerCallback``: a callback sees the unwrapped model, runs after the
optimizer was built, prepared by Accelerate and loaded from the checkpoint, and cannot change
where gradients are clipped or what a checkpoint holds. The subclass changes the Trainer in
five places (``LocalSGDMixin``; combine it with another Trainer subclass, e.g. ``class
MyTrainer(LocalSGDMixin, SFTTrainer)``), everything else is the Trainer's own loop:

* After Accelerate has prepared the model (``DistributedDataParallel``) and the optimizer
  (``AcceleratedOptimizer``), the optimizer inside is wrapped: ``LocalSGD(optimizer, ddp_model,
  schedule, ...)``. The Trainer's ``optimizer.step()`` then does the schedule's communication and
  the inner step, exactly as in a hand-written loop; DDP's gradient all-reduce runs only in steps
  that average gradients (the Trainer's ``no_sync`` for the first micro-batches of a step restores
  localsgd's setting). The learning-rate scheduler keeps the inner optimizer's ``param_groups``.
* ``TrainingArguments(max_grad_norm=c)`` (the Trainer's default is 1.0) clips inside localsgd's
  step, after any gradient average (``Policy.max_grad_norm``), not before it; the logged
  ``grad_norm`` is the norm before the step (in local steps the worker's own gradient's).
* Each worker normalises its loss by its own token count: ``average_tokens_across_devices`` is
  switched off, since it gathers token counts from every worker in every step, a collective in
  every local step.
* DDP's buffer broadcast at every forward is off unless ``ddp_broadcast_buffers`` is set (it would
  overwrite the workers' own BatchNorm statistics).
* Checkpoints: the Trainer writes the model and the optimizer from rank 0 only, but local SGD's
  workers differ between averages (parameters, optimizer state, step counter, anchor and outer
  momentum, compression residuals), so every rank also writes its own ``localsgd_worker_{rank}.pt``
  into the checkpoint folder (as the Trainer writes ``rng_state_{rank}.pth``) and loads it back on
  ``trainer.train(resume_from_checkpoint=...)``. A resumed run then continues exactly.

Steps, H and t' count optimizer steps (``gradient_accumulation_steps`` micro-batches each). The
checkpoint's (and ``save_model``'s) model is rank 0's worker; call ``trainer.localsgd.average_now()``
first to save the workers' average. Evaluation runs each worker's model on its share of the data.
Refused: fp16 (its GradScaler may skip a step on one rank only, and the schedules would drift
apart; bf16 and 32-bit work), DeepSpeed and FSDP.
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from typing import Any

import torch

try:
    import transformers
    from accelerate.utils import DistributedDataParallelKwargs
    from transformers import Trainer
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "localsgd.integrations.transformers needs Hugging Face transformers and accelerate: "
        "pip install 'localsgd[hf]'"
    ) from e

from localsgd.integrations._common import take_policy
from localsgd.policy import Policy
from localsgd.schedule import Schedule
from localsgd.wrapper import LocalSGD

__all__ = ["LocalSGDMixin", "LocalSGDTrainer", "worker_file"]

# The Trainer methods LocalSGDMixin overrides (transformers >= 5.3 has every one).
_HOOKS = (
    "_build_accelerator_args",
    "_prepare_for_training",
    "_clip_grad_norm",
    "_save_optimizer_and_scheduler",
    "_load_optimizer_and_scheduler",
)
_missing = [name for name in _HOOKS if not hasattr(Trainer, name)]
if _missing:  # pragma: no cover - depends on the environment
    raise ImportError(
        f"localsgd.integrations.transformers needs transformers >= 5.3 (this is "
        f"{transformers.__version__}, whose Trainer has no {', '.join(_missing)}): "
        "pip install 'localsgd[hf]'"
    )

log = logging.getLogger(__name__)


def worker_file(checkpoint: str | os.PathLike, rank: int) -> str:
    """Where rank ``rank`` keeps its localsgd state (model and ``LocalSGD``) in a checkpoint."""
    return os.path.join(checkpoint, f"localsgd_worker_{rank}.pt")


class LocalSGDMixin:
    """Local SGD, post-local SGD, hierarchical local SGD, DiLoCo and SlowMo in a Hugging Face
    ``Trainer`` (put it before the Trainer class among the bases).

    Args:
        schedule: when to average (``localsgd.Schedule``); steps are optimizer steps.
        policy, **kwargs: how to average, as a ``localsgd.Policy`` or its fields' keywords
            (``outer_optimizer=diloco()``, ``compression="int8"``, ...); clip with
            ``TrainingArguments(max_grad_norm=...)``, not the policy's. The remaining arguments
            go to the Trainer.
        workers_per_block: K' for hierarchical schedules (default: torchrun's processes per node).
    """

    def __init__(
        self,
        *args: Any,
        schedule: Schedule,
        policy: Policy | None = None,
        workers_per_block: int | None = None,
        **kwargs: Any,
    ) -> None:
        policy = take_policy(schedule, policy, kwargs)
        if policy.max_grad_norm is not None:
            raise ValueError(
                f"clip with TrainingArguments(max_grad_norm={policy.max_grad_norm}), not the policy's "
                "max_grad_norm: the Trainer's setting is applied inside localsgd's step"
            )
        self.schedule = schedule
        self._workers_per_block = workers_per_block
        super().__init__(*args, **kwargs)
        self._check_supported()
        norm = self.args.max_grad_norm
        self.policy = replace(policy, max_grad_norm=norm if norm is not None and norm > 0 else None)
        if self.args.average_tokens_across_devices:
            log.info("localsgd: average_tokens_across_devices switched off (a collective in every step)")
            self.args.average_tokens_across_devices = False

    def _check_supported(self) -> None:
        if self.args.fp16:
            raise ValueError(
                "LocalSGDTrainer does not support fp16 (its GradScaler may skip a step on one rank "
                "only, and the ranks' schedules would drift apart); use bf16 or 32-bit"
            )
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            raise ValueError("LocalSGDTrainer does not support DeepSpeed or FSDP; use plain data parallelism")

    @property
    def localsgd(self) -> LocalSGD:
        """This rank's ``LocalSGD`` (``.t``, ``.stats``, ``.average_now()``, ...), set up by
        ``train()`` and kept after it."""
        inner = getattr(self.optimizer, "optimizer", None)
        if not isinstance(inner, LocalSGD):
            raise RuntimeError("LocalSGDTrainer sets up its LocalSGD optimizer in train()")
        return inner

    # --- the Trainer's hooks ----------------------------------------------------------------

    def _build_accelerator_args(self, **kwargs: Any) -> dict[str, Any]:
        accelerator_args = super()._build_accelerator_args(**kwargs)
        if self.args.ddp_broadcast_buffers is None:
            for handler in accelerator_args.get("kwargs_handlers", []):
                if isinstance(handler, DistributedDataParallelKwargs):
                    handler.broadcast_buffers = False
        return accelerator_args

    def _prepare_for_training(
        self, max_steps: int, train_dataloader: Any, resume_from_checkpoint: str | None
    ) -> tuple[torch.nn.Module, Any]:
        # The checkpoint is loaded after the wrapping (its optimizer state is LocalSGD's).
        model, train_dataloader = super()._prepare_for_training(max_steps, train_dataloader, None)
        if not isinstance(self.optimizer.optimizer, LocalSGD):  # a second train() keeps it
            self.optimizer.optimizer = LocalSGD(
                self.optimizer.optimizer,
                model,
                self.schedule,
                workers_per_block=self._workers_per_block,
                policy=self.policy,
            )
        if resume_from_checkpoint is not None:
            self._load_optimizer_and_scheduler(resume_from_checkpoint)
            self._load_scaler(resume_from_checkpoint)
        return model, train_dataloader

    def _clip_grad_norm(self, model: torch.nn.Module) -> None:
        return None  # localsgd clips inside the step (Policy.max_grad_norm = args.max_grad_norm)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        state = {
            "workers": self.args.world_size,
            "model": self.model.state_dict(),
            "localsgd": self.localsgd.state_dict(),
        }
        os.makedirs(output_dir, exist_ok=True)
        path = worker_file(output_dir, self.args.process_index)
        torch.save(state, path + ".tmp")
        os.replace(path + ".tmp", path)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)  # the scheduler, and rank 0's optimizer
        if checkpoint is None or not isinstance(getattr(self.optimizer, "optimizer", None), LocalSGD):
            return
        path = worker_file(checkpoint, self.args.process_index)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{path} is missing: the checkpoint was not written by LocalSGDTrainer with "
                f"{self.args.world_size} workers (or with save_only_model=True), and local SGD's "
                "workers differ, so each needs its own state to resume"
            )
        device = self.args.device
        location = "cpu" if device.type == "cpu" else device  # torch cannot restore onto "cpu:0"
        state = torch.load(path, map_location=location, weights_only=True)
        if state["workers"] != self.args.world_size:
            raise ValueError(
                f"the checkpoint was written by {state['workers']} workers, but this run has "
                f"{self.args.world_size}; local SGD's workers differ and cannot be resharded"
            )
        self.model.load_state_dict(state["model"])
        self.localsgd.load_state_dict(state["localsgd"])


class LocalSGDTrainer(LocalSGDMixin, Trainer):
    """``transformers.Trainer`` with localsgd's schedule and policy; see ``LocalSGDMixin``."""
