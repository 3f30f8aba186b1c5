"""Hugging Face Accelerate: ``prepare``, an ``accelerator.prepare`` for a model and the optimizer
that ``localsgd.LocalSGD`` wraps, with every rank's state in ``accelerator.save_state``.

>>> from localsgd import Schedule, diloco
>>> from localsgd.integrations.accelerate import prepare
>>> accelerator = Accelerator(kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)])
>>> model, opt = prepare(accelerator, model, torch.optim.SGD(model.parameters(), lr=0.1),
...                      Schedule.post_local(local_steps=16, switch_step=200))
>>> loader = accelerator.prepare(loader)  # the rest of the Accelerate loop stays as it is

What it does, in Accelerate's own calls (each a public API):

* ``model = accelerator.prepare(model)``: Accelerate wraps it in ``DistributedDataParallel``.
* ``opt = accelerator.prepare(LocalSGD(optimizer, model, schedule, ...))``: ``LocalSGD`` goes
  *inside* Accelerate's ``AcceleratedOptimizer``, whose ``step`` and ``zero_grad`` do nothing
  while ``accelerator.accumulate(model)`` accumulates (``gradient_state.sync_gradients`` is
  False), so ``LocalSGD`` sees optimizer steps only: H and t' count optimizer steps, as in a
  plain loop. Each step arms DDP's gradient all-reduce for the next one (on in steps that average
  gradients, off in local steps); the ``no_sync()`` that ``accumulate`` enters for the first N - 1
  micro-batches puts that setting back on exit, so the accumulated gradient is all-reduced once,
  in the mini-batch phase only. (Wrapping the ``AcceleratedOptimizer`` in ``LocalSGD`` instead
  would count every micro-batch as a step.)
* ``accelerator.register_for_checkpointing(WorkerStates(model, opt.optimizer))``:
  ``save_state`` writes models, optimizers and registered objects from the main process only
  (RNG states per process), and ``load_state`` gives every rank those files. Between averages the
  workers differ, so ``WorkerStates`` gathers every rank's module and ``LocalSGD`` state (step
  counter, inner optimizer, anchor and outer optimizer, compression residuals, an overlapped
  average in flight) into the main process's file, and on ``load_state`` (which loads registered
  objects last) each rank takes its own back. ``optimizer.bin`` still holds the main process's
  ``LocalSGD`` state, which this replaces; the model is left out of Accelerate's model file
  (``register_save_state_pre_hook``/``register_load_state_pre_hook``), where safetensors would
  keep one of the parameters only: ``LocalSGD`` makes them views of one flat buffer, and
  Accelerate drops all but one of the tensors that share a storage.

Steps are optimizer steps; a checkpoint is taken between them (after ``opt.step()``), and a run
resumes with as many processes as wrote it. Resume mid-epoch with Accelerate's
``skip_first_batches(loader, batches_done)``; ``accelerator.step`` (the accumulation counter) and
the RNG states are Accelerate's own, per process.

Refused, with the reason: FSDP, DeepSpeed, Megatron-LM and XLA (local SGD needs a whole replica
per process), fp16 mixed precision (its GradScaler may skip a step on one rank only, and the
ranks' schedules would drift apart; bf16 works), and DDP's buffer broadcast with
``buffers="local"`` (it would overwrite every rank's BatchNorm statistics with rank 0's at each
forward).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from typing_extensions import Unpack

try:
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer
    from accelerate.utils import DistributedType
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "localsgd.integrations.accelerate needs Hugging Face Accelerate (the 'accelerate' package): "
        "pip install 'localsgd[hf]'"
    ) from e

from localsgd.integrations._common import copy_to
from localsgd.policy import Policy, PolicyKeywords, as_policy
from localsgd.schedule import Schedule
from localsgd.wrapper import LocalSGD

__all__ = ["WorkerStates", "prepare"]


class WorkerStates:
    """Every rank's module and ``LocalSGD`` state, for ``accelerator.register_for_checkpointing``
    (``prepare`` registers one).

    ``state_dict()`` is a collective (``save_state`` calls it on every process and writes the main
    process's result): the main process gets a list of every rank's state, the others an empty
    dict. ``load_state_dict`` loads this rank's entry into its module and ``LocalSGD``.

    Args:
        model: the prepared model (``DistributedDataParallel`` under several processes).
        optimizer: the ``LocalSGD`` (``opt.optimizer`` of the optimizer ``prepare`` returns).
        everywhere: gather to every rank rather than the main process only (Accelerate's
            ``ProjectConfiguration(save_on_each_node=True)``: each node's main process writes).
    """

    def __init__(self, model: nn.Module, optimizer: LocalSGD, everywhere: bool = False) -> None:
        if not isinstance(optimizer, LocalSGD):
            raise TypeError(f"optimizer must be a localsgd.LocalSGD, got {type(optimizer).__name__}")
        self.model, self.optimizer, self.everywhere = model, optimizer, everywhere

    def state_dict(self) -> dict[str, Any]:
        mine = copy_to({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()})
        if not (dist.is_available() and dist.is_initialized()):
            return {"workers": [mine]}
        world = dist.get_world_size()
        if self.everywhere:
            gathered: list[Any] | None = [None] * world
            dist.all_gather_object(gathered, mine)
        else:
            gathered = [None] * world if dist.get_rank() == 0 else None
            dist.gather_object(mine, gathered, dst=0)
        return {"workers": gathered} if gathered is not None else {}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        if "workers" not in state_dict:
            raise ValueError("not a localsgd WorkerStates checkpoint (it has no per-worker states)")
        workers = state_dict["workers"]
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if len(workers) != world:
            raise ValueError(
                f"the checkpoint was written by {len(workers)} workers, but this run has {world}; "
                "local SGD's workers differ and cannot be resharded"
            )
        device = next(self.model.parameters()).device
        mine = copy_to(workers[dist.get_rank() if world > 1 else 0], device)
        self.model.load_state_dict(mine["model"])
        self.optimizer.load_state_dict(mine["optimizer"])


def prepare(
    accelerator: Accelerator,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule: Schedule,
    *,
    workers_per_block: int | None = None,
    policy: Policy | None = None,
    **policy_kwargs: Unpack[PolicyKeywords],
) -> tuple[nn.Module, AcceleratedOptimizer]:
    """Prepare ``model`` and wrap ``optimizer`` (an unprepared ``torch.optim.Optimizer`` over the
    model's parameters) in ``LocalSGD``, prepared for Accelerate; registers ``WorkerStates`` for
    ``save_state``/``load_state``.

    Returns ``(model, opt)`` as ``accelerator.prepare`` would: ``model`` is the
    ``DistributedDataParallel`` model, ``opt`` an ``AcceleratedOptimizer`` whose ``opt.optimizer``
    is the ``LocalSGD`` (``.t``, ``.stats``, ``.average_now()``). Schedule and policy keywords are
    ``LocalSGD``'s (``outer_optimizer=diloco()``, ``compression="int8"``, ``max_grad_norm=c``, ...);
    ``workers_per_block`` is K' for hierarchical schedules (default: the processes per node).
    """
    if isinstance(optimizer, AcceleratedOptimizer):
        raise TypeError(
            "pass the optimizer before accelerator.prepare: LocalSGD goes inside Accelerate's "
            "AcceleratedOptimizer, which then skips its step while gradients accumulate"
        )
    if isinstance(optimizer, LocalSGD):
        raise TypeError("pass the optimizer LocalSGD is to wrap; prepare() wraps it")
    kind = accelerator.distributed_type
    if kind is DistributedType.NO and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError(
            f"WORLD_SIZE={os.environ['WORLD_SIZE']}, but Accelerate runs a single process "
            "(DistributedType.NO); on CPUs create the Accelerator with cpu=True"
        )
    if kind is not DistributedType.NO and not kind.name.startswith("MULTI_"):
        raise ValueError(
            f"localsgd.integrations.accelerate supports data-parallel processes (DDP), not {kind.value}: "
            "local SGD trains a whole replica of the model in every process"
        )
    if accelerator.scaler is not None:
        raise ValueError(
            "localsgd.integrations.accelerate does not support fp16 mixed precision (its GradScaler may "
            "skip a step on one rank only, and the ranks' schedules would drift apart); use bf16 or 32-bit"
        )
    policy = as_policy(policy, policy_kwargs)
    ddp_kwargs = accelerator.ddp_handler
    if (
        accelerator.num_processes > 1
        and policy.buffers == "local"
        and (ddp_kwargs is None or ddp_kwargs.broadcast_buffers)
    ):
        raise ValueError(
            "DistributedDataParallel would overwrite every rank's buffers (BatchNorm statistics) with "
            "rank 0's at each forward, which contradicts localsgd's buffers='local'; create the "
            "Accelerator with kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)]"
        )
    model = accelerator.prepare(model)
    local_sgd = LocalSGD(optimizer, model, schedule, workers_per_block=workers_per_block, policy=policy)
    opt = accelerator.prepare(local_sgd)
    everywhere = accelerator.project_configuration.save_on_each_node
    accelerator.register_for_checkpointing(WorkerStates(model, local_sgd, everywhere=everywhere))
    _keep_out_of_model_files(accelerator, model)
    return model, opt


def _keep_out_of_model_files(accelerator: Accelerator, model: nn.Module) -> None:
    """``WorkerStates`` saves and loads every rank's ``model``, so ``save_state`` leaves it out of
    its model files (through Accelerate's hooks for that). Those would hold only the main process's,
    and with safetensors (the default) not even that: ``LocalSGD`` makes the parameters views of one
    flat buffer, and Accelerate drops all but one of the tensors that share a storage."""

    ours = (model, accelerator.unwrap_model(model))  # Accelerate lists the module inside DDP

    def before_save(models: list[nn.Module], weights: list[dict[str, Any]], output_dir: str) -> None:
        # ``models`` is the Accelerator's own list (left as it is); ``weights`` lines up with it
        for i in reversed(range(len(models))):
            if any(models[i] is m for m in ours):
                del weights[i]

    def before_load(models: list[nn.Module], input_dir: str) -> None:
        models[:] = [m for m in models if not any(m is o for o in ours)]  # load_state's own list

    accelerator.register_save_state_pre_hook(before_save)
    accelerator.register_load_state_pre_hook(before_load)
