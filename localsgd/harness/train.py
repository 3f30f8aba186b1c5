"""``localsgd train``: the training loop for every task (``tasks.py``: images, text), one worker per
process under torchrun or K workers in the simulator, with the same results for the same seed. Read
top to bottom."""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from localsgd import DistCommunicator, Engine, LocalSGD, Policy, Simulator, outer
from localsgd.compression import DEFAULT_BLOCK, make_codec
from localsgd.engine import CommunicationError
from localsgd.harness import checkpoint, optim, rundir
from localsgd.harness.config import Config, ConfigError
from localsgd.harness.interrupt import Interrupted, Signals
from localsgd.harness.measures import ACCURACY, Measures
from localsgd.harness.rundir import RunWriter
from localsgd.harness.runtime import Runtime, resolve_workers
from localsgd.harness.seeding import WorkerRandom
from localsgd.harness.tasks import Task, make_task, sampling
from localsgd.schedule import Schedule


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a non-finite loss): one line naming step and worker."""


@dataclass
class Plan:
    """Quantities derived from the config (all in optimizer steps)."""

    steps_per_epoch: int
    total_steps: int
    switch_step: int
    peak_lr: float
    decay_epochs: list[float]
    schedule: Schedule


def make_plan(cfg: Config, steps_per_epoch: int) -> Plan:
    total_steps = max(1, round(cfg.epochs * steps_per_epoch))
    switch_step = round(cfg.switch_epoch_value() * steps_per_epoch)
    schedule = Schedule(local_steps=cfg.local_steps, switch_step=switch_step, block_steps=cfg.block_steps)
    peak = cfg.peak_lr or optim.peak_lr(cfg.lr_per_64, cfg.local_batch_size, cfg.workers)
    decay_epochs = [f * cfg.epochs for f in cfg.decay_at]
    return Plan(steps_per_epoch, total_steps, switch_step, peak, decay_epochs, schedule)


def lr_at(cfg: Config, plan: Plan, t: int) -> float:
    """The LR of step ``t``, from the config's schedule."""
    epoch = t / plan.steps_per_epoch
    if cfg.lr_schedule == "cosine":
        final = plan.peak_lr * cfg.decay_factor
        return optim.cosine_lr_at(epoch, plan.peak_lr, cfg.warmup_epochs, cfg.epochs, final)
    start = cfg.lr_per_64 if cfg.optimizer == "sgd" else 0.0  # the paper warms up from lr_per_64
    return optim.lr_at(epoch, plan.peak_lr, start, cfg.warmup_epochs, plan.decay_epochs, cfg.decay_factor)


def kept_models(cfg: Config, plan: Plan, period: int) -> dict[int, float]:
    """The step of each ``save_models_at`` epoch (which must end a metrics row of ``period``
    steps, or the run)."""
    keep = {}
    for epoch in cfg.save_models_at:
        step = epoch * plan.steps_per_epoch
        if abs(step - round(step)) > 1e-6 or (round(step) % period and round(step) != plan.total_steps):
            raise ConfigError(
                f"save_models_at: epoch {epoch:g} (step {step:g}) does not end a metrics row; rows end every "
                f"{period} steps ({period / plan.steps_per_epoch:g} epochs) and at step {plan.total_steps}"
            )
        keep[round(step)] = epoch
    return keep


def check_compress_block(cfg: Config, task: Task) -> None:
    """compress_block against the model: a block holds at most every parameter (a larger one only
    pads each encoded chunk, and a huge one fails to allocate at the first average)."""
    if cfg.compress_block is None:
        return
    parameters = sum(p.numel() for p in task.model().parameters())
    if cfg.compress_block > parameters:
        raise ConfigError(
            f"compress_block = {cfg.compress_block} exceeds the {parameters:,} parameters of model = "
            f"{cfg.model}: a block holds at most every parameter"
        )


def cross_entropy(logits: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy over the last axis: (B, C) logits of images or (B, L, V) of text."""
    return F.cross_entropy(logits.flatten(0, -2), y.flatten(), reduction=reduction)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, task: Task) -> torch.Tensor:
    """[loss sum, correct, count] of ``model`` on (x, y), per target: float64 on the data's device
    (not read)."""
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=x.device)
    for i in range(0, len(x), task.eval_batch):
        out = model(task.prepare(x[i : i + task.eval_batch]))
        yb = y[i : i + task.eval_batch]
        sums[0] += cross_entropy(out, yb, reduction="sum").double()
        sums[1] += (out.argmax(-1) == yb).sum()
    sums[2] = y.numel()
    model.train()
    return sums


class Tally:
    """The row's training sums and every loss since the last check, kept on the device: the loop
    reads them at averaging rounds, checkpoints and epoch ends, never per step or per worker."""

    MAX_PENDING = 4096  # losses held between reads (a read comes sooner if no round comes)

    def __init__(self, device: torch.device, steps_per_epoch: int, ckpt_root: Path) -> None:
        self.device, self.steps_per_epoch, self.ckpt_root = device, steps_per_epoch, ckpt_root
        self.pending: list[tuple[int, int, torch.Tensor]] = []  # (step, worker, loss)
        self.new_row()

    def new_row(self) -> None:
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self.correct = torch.zeros((), dtype=torch.int64, device=self.device)
        self.seen = 0

    def add(self, t: int, k: int, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
        loss = loss.detach()
        self.pending.append((t, k, loss))
        self.loss_sum += loss.double() * y.numel()  # as a float64 sum of float32 losses on the host would
        self.correct += (logits.argmax(-1) == y).sum()
        self.seen += y.numel()
        if len(self.pending) >= self.MAX_PENDING:
            self.check()

    def state(self) -> dict[str, Any]:
        """The row's sums so far (a checkpoint between two rows carries them)."""
        return {"loss_sum": self.loss_sum, "correct": self.correct, "seen": self.seen}

    def load(self, state: dict[str, Any]) -> None:
        self.loss_sum = state["loss_sum"].to(self.device)
        self.correct = state["correct"].to(self.device)
        self.seen = state["seen"]

    def sums(self) -> torch.Tensor:
        """[loss sum, correct, samples] of this epoch, float64 on the device."""
        return torch.stack([self.loss_sum, self.correct.double(), self.loss_sum.new_tensor(self.seen)])

    def check(self) -> None:
        """Raise TrainingError at the first non-finite loss since the last check (its step and
        worker); one host read."""
        if not self.pending:
            return
        pending, self.pending = self.pending, []
        losses = torch.stack([loss for _, _, loss in pending])
        if bool(torch.isfinite(losses).all()):
            return
        for (t, k, _), value in zip(pending, losses.tolist(), strict=True):
            if not math.isfinite(value):
                raise TrainingError(
                    f"loss is {value} at step {t} (epoch {t // self.steps_per_epoch + 1}) on worker {k}; "
                    f"{last_good(self.ckpt_root)}"
                )


def evaluation(
    averaged: nn.Module, workers: list[tuple[int, nn.Module]], runtime: Runtime, task: Task
) -> dict[str, float]:
    """Loss and accuracy on the evaluation split of the averaged model and, if ``workers`` are
    given, the mean over every worker's own model (each on the whole split), summed over all
    processes."""
    x, y, split = task.eval_x, task.eval_y, task.measures.split
    if runtime.distributed:  # each rank evaluates its share of the split
        part = slice(runtime.rank, None, runtime.processes)
        ev = runtime.all_sum(evaluate(averaged, x[part], y[part], task))
    else:
        ev = evaluate(averaged, x, y, task).tolist()
    row = {f"{split}_loss": ev[0] / ev[2], f"{split}_acc": ev[1] / ev[2]}
    if workers:
        local = torch.zeros(3, dtype=torch.float64, device=x.device)
        for _, m in workers:
            local = local + evaluate(m, x, y, task)
        loss_sum, correct, seen = runtime.all_sum(local)
        row.update({f"local_{split}_loss": loss_sum / seen, f"local_{split}_acc": correct / seen})
    return row


def check_finite(workers: list[tuple[int, nn.Module]], t: int, ckpt_root: Path) -> None:
    """Raise TrainingError if a worker's parameter or buffer is not finite (one host read)."""
    tensors = [
        (k, name, value)
        for k, m in workers
        for name, value in m.state_dict().items()
        if value.is_floating_point()
    ]
    finite = torch.stack([torch.isfinite(v).all() for _, _, v in tensors]).tolist()
    for (k, name, _), ok in zip(tensors, finite, strict=True):
        if not ok:
            raise TrainingError(f"{name} is not finite after step {t} on worker {k}; {last_good(ckpt_root)}")


def last_good(ckpt_root: Path) -> str:
    if (ckpt_root / "latest").exists():
        return f"the last good checkpoint is in {ckpt_root}"
    return "no checkpoint was written before"


@dataclass
class Result:
    summary: dict[str, Any]
    history: list[dict[str, Any]]
    final_model: nn.Module
    engine: Engine
    main: bool


def resolved_config(cfg: Config, plan: Plan, runtime: Runtime, task: Task) -> dict[str, Any]:
    """What ``config.json`` records besides the versions: the settings and derived quantities."""
    return {
        "config": cfg.to_dict(),
        "derived": {
            "steps_per_epoch": plan.steps_per_epoch,
            "total_steps": plan.total_steps,
            "switch_step": plan.switch_step,
            "peak_lr": plan.peak_lr,
            "decay_epochs": plan.decay_epochs,
            **task.sizes(),
            "runtime": "torchrun" if runtime.distributed else "simulator",
            "device": str(runtime.device),
        },
    }


def build_engine(cfg: Config, plan: Plan, runtime: Runtime, model: nn.Module) -> Engine:
    """This process's workers: the model (and K - 1 copies in the simulator), their optimizers and
    the averaging policies the config asks for."""

    def make_optimizer(m: nn.Module) -> torch.optim.Optimizer:
        if cfg.optimizer == "adamw":
            betas = cfg.betas or (0.9, 0.95)
            return optim.adamw(m, plan.peak_lr, (betas[0], betas[1]), cfg.weight_decay)
        return optim.sgd(m, plan.peak_lr, cfg.momentum, cfg.nesterov, cfg.weight_decay)

    policy = build_policy(cfg)
    if runtime.distributed:
        comm = DistCommunicator(workers_per_block=cfg.workers_per_block, ordered=cfg.ordered_averaging)
        return LocalSGD(make_optimizer(model), model, plan.schedule, comm=comm, policy=policy)
    return Simulator(
        model,
        make_optimizer,
        plan.schedule,
        cfg.workers,
        workers_per_block=cfg.workers_per_block,
        policy=policy,
    )


def build_policy(cfg: Config) -> Policy:
    """The averaging policies the config asks for."""
    outer_hyper = cfg.outer()
    make_outer = None
    if outer_hyper is not None:
        make_outer = {"diloco": outer.diloco, "slowmo": outer.slowmo}[cfg.outer_optimizer](*outer_hyper)
    codec = None if cfg.compress == "none" else make_codec(cfg.compress, cfg.compress_block or DEFAULT_BLOCK)
    return Policy(
        buffers=cfg.buffers,
        optimizer_state=cfg.optimizer_state,
        outer_optimizer=make_outer,
        compression=codec,
        overlap_steps=cfg.overlap_steps,
        max_grad_norm=cfg.max_grad_norm,
    )


def resuming(cfg: Config) -> bool:
    """Whether this run continues its run directory: ``resume``, or a group torchrun restarted."""
    return cfg.resume or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0


def claim(cfg: Config, out: Path, runtime: Runtime) -> rundir.Lock | None:
    """Rank 0 checks that this run may write into ``out`` and locks it for the run's life
    (``rundir.claim``); every process stops with the same one line if it may not."""
    lock, error = None, None
    if runtime.rank == 0:
        try:
            lock = rundir.claim(out, resuming(cfg), cfg.overwrite, cfg.to_dict(), sampling(cfg))
        except ValueError as e:
            error = str(e)
    if runtime.distributed:
        verdict = [error]
        dist.broadcast_object_list(verdict, src=0)
        error = verdict[0]
    if error is not None:
        raise rundir.RunDirectoryError(error)
    return lock


def resume(
    cfg: Config,
    runtime: Runtime,
    engine: Engine,
    model: nn.Module,
    random: WorkerRandom,
    task: Task,
    tally: Tally,
    root: Path,
) -> tuple[list[dict[str, Any]], float, float]:
    """With ``resume`` (or in a group torchrun restarted), load the last checkpoint into the engine,
    the model, the random streams, the task's carried state and the current row's sums; returns
    the rows so far, evaluation and wall seconds."""
    dev = runtime.device
    state = checkpoint.restore(root, runtime.rank, cfg.to_dict(), dev.type) if resuming(cfg) else None
    history, eval_seconds, wall_seconds = [], 0.0, 0.0
    if state is not None:
        engine.load_state_dict(state["engine"])
        if runtime.distributed:
            model.load_state_dict(state["model"])
        random.load(state.get("random") or {"data": state["generators"]})  # older files: no dropout state
        task.load(state.get("task", {}))
        history, eval_seconds, wall_seconds = state["history"], state["eval_seconds"], state["wall_seconds"]
        if "tally" in state:  # older files: checkpoints were written at row ends only
            tally.load(state["tally"])
    steps = runtime.all_sum(torch.tensor([float(engine.t)], dtype=torch.float64, device=dev))[0]
    if steps != engine.t * (cfg.workers if runtime.distributed else 1):
        raise checkpoint.CheckpointError(f"{root}: the processes found checkpoints of different steps")
    return history, eval_seconds, wall_seconds


def save(
    cfg: Config,
    runtime: Runtime,
    engine: Engine,
    model: nn.Module,
    random: WorkerRandom,
    task: Task,
    root: Path,
    run: dict[str, Any],
) -> None:
    """Checkpoint this process's state after step ``engine.t``; ``run``: the rows so far and the
    seconds spent."""

    def exchange(mine: bytes) -> list[bytes]:  # checkpoint digests, every process's in rank order
        return engine.comm.all_gather_bytes([mine]) if runtime.distributed else [mine]

    state = {
        "config": cfg.to_dict(),
        "engine": engine.state_dict(),
        "random": random.state(),
        "task": task.state(),
        **run,
        "device": runtime.device.type,  # the random generators' states are per device type
    }
    if runtime.distributed:
        state["model"] = model.state_dict()
    checkpoint.save(root, engine.t, state, runtime.rank, exchange)


def train(cfg: Config, out: Path) -> Result:
    """Train as ``cfg`` says and write the run directory ``out`` (from rank 0)."""
    # --- check everything before any work ---
    cfg = resolve_workers(cfg)
    cfg.validate()
    runtime = Runtime(cfg)
    writer = RunWriter(out, runtime.rank == 0, cfg.tensorboard)
    task = make_task(cfg, runtime.device)
    plan = make_plan(cfg, task.steps_per_epoch)
    keep = kept_models(cfg, plan, cfg.row_steps or plan.steps_per_epoch)
    check_compress_block(cfg, task)
    lock = claim(cfg, out, runtime)  # the run directory is this run's until it returns
    try:
        return run_training(cfg, out, runtime, writer, task, plan, keep)
    finally:
        if lock is not None:
            lock.release()


def run_training(
    cfg: Config,
    out: Path,
    runtime: Runtime,
    writer: RunWriter,
    task: Task,
    plan: Plan,
    keep: dict[int, float],
) -> Result:
    """The run itself, once ``train`` has checked everything and holds the run directory."""
    dev, main, measures = runtime.device, runtime.rank == 0, task.measures
    period = cfg.row_steps or plan.steps_per_epoch  # steps per metrics row

    # --- workers: the same initial model everywhere ---
    torch.manual_seed(cfg.seed)
    model = task.model()
    engine = build_engine(cfg, plan, runtime, model)
    workers = list(zip(engine.comm.local_workers, engine.models, strict=True))
    random = WorkerRandom(cfg.seed, [k for k, _ in workers], dev)

    # --- resume: everything an uninterrupted run would hold at the checkpoint's step ---
    ckpt_root = out / "checkpoints"
    tally = Tally(dev, plan.steps_per_epoch, ckpt_root)
    history, eval_seconds, wall_offset = resume(cfg, runtime, engine, model, random, task, tally, ckpt_root)
    start_t = engine.t
    saved = start_t if (ckpt_root / "latest").exists() else None  # the step --resume would continue from
    writer.config(resolved_config(cfg, plan, runtime, task))  # the first write: everything is checked
    writer.history(history)

    # --- training ---
    progress = tqdm(
        total=plan.total_steps, initial=start_t, desc="train", unit="step", dynamic_ncols=True,
        disable=not (main and cfg.progress), mininterval=0.2 if sys.stderr.isatty() else 30.0,
    )  # fmt: skip
    start = time.perf_counter() - wall_offset
    averaged: nn.Module | None = None  # the last evaluated average of the workers' models

    def progress_so_far() -> dict[str, Any]:  # what a checkpoint holds besides the workers' state
        return {
            "history": history,
            "eval_seconds": eval_seconds,
            "wall_seconds": time.perf_counter() - start,
            "tally": tally.state(),
        }

    signals = Signals(insist=not runtime.distributed).install()
    try:  # the bar ends its line before an error is printed
        for t in range(start_t, plan.total_steps):
            if signals.received is not None:  # stop between steps; the simulator checkpoints this one
                if not runtime.distributed and saved != t:
                    tally.check()
                    check_finite(workers, t - 1, ckpt_root)
                    save(cfg, runtime, engine, model, random, task, ckpt_root, progress_so_far())
                    saved = t
                raise Interrupted(signals.received, t, saved)
            epoch, i = divmod(t, plan.steps_per_epoch)
            if i == 0 or t == start_t:  # fresh disjoint data per worker every epoch
                task.start_epoch(epoch, i)
            lr = lr_at(cfg, plan, t)
            for opt in engine.optimizers:
                for group in opt.param_groups:
                    group["lr"] = lr
            for k, m in workers:
                x, y = task.batch(k, i, random.data[k])
                with (
                    random.of(k),
                    torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"),
                ):
                    logits = task.forward(k, m, x)
                    loss = cross_entropy(logits, y)
                loss.backward()
                tally.add(t, k, loss, logits, y)
            sync = engine.schedule.sync_at(engine.t)
            if sync.gradients is not None or sync.parameters is not None:
                tally.check()  # nothing non-finite reaches an average
            engine.step()
            engine.zero_grad()
            if t == plan.total_steps - 1:
                engine.flush()  # an overlapped average still in flight belongs to the final model
            progress.set_postfix_str(f"epoch {epoch + 1} lr {lr:.3g}", refresh=False)
            progress.update()

            if (t + 1) % period and t < plan.total_steps - 1:
                continue  # a row at every period's end (default: every epoch's) and at the end
            row_index = (t + 1) // period
            tally.check()
            done_epochs = (t + 1) / plan.steps_per_epoch
            loss_sum, correct, seen = runtime.all_sum(tally.sums())
            tally.new_row()
            row: dict[str, Any] = {
                "epoch": round(done_epochs, 4),
                "step": t + 1,
                "lr": lr,
                "train_loss": loss_sum / seen,
                "train_acc": correct / seen,
            }
            evaluated = row_index % cfg.eval_every == 0 or t == plan.total_steps - 1
            if evaluated:
                eval_start = time.perf_counter()
                averaged = engine.averaged_model()
                final = t == plan.total_steps - 1
                local = cfg.eval_local == "every" or (cfg.eval_local == "final" and final)
                row.update(evaluation(averaged, workers if local else [], runtime, task))
                eval_seconds += time.perf_counter() - eval_start
            if t + 1 in keep:  # the model this row evaluated (averaged again if it evaluated none)
                kept = averaged if evaluated else engine.averaged_model()
                writer.model_at(kept, cfg.to_dict(), keep[t + 1])
            comm = sum(s.seconds for s in engine.stats.values())
            wall = time.perf_counter() - start
            row.update(
                rounds={level: s.rounds for level, s in engine.stats.items()},
                bytes={level: s.bytes for level, s in engine.stats.items()},
                comm_seconds=comm,
                eval_seconds=eval_seconds,
                compute_seconds=wall - comm - eval_seconds,
                wall_seconds=wall,
            )
            task.annotate(row, t + 1)
            history.append(row)
            shown = f"epoch {epoch + 1} lr {lr:.3g} loss {row['train_loss']:.3f}"
            if evaluated:
                shown += f" {measures.split} {measures.headline.cell(row[measures.curve])}"
            progress.set_postfix_str(shown)
            writer.append(row, t + 1)
            if row_index % cfg.checkpoint_every == 0 and t + 1 < plan.total_steps:
                check_finite(workers, t, ckpt_root)  # never replace a good checkpoint by a broken one
                save(cfg, runtime, engine, model, random, task, ckpt_root, progress_so_far())
                saved = t + 1
    except CommunicationError as e:  # a peer that stopped on the signal first
        if signals.received is None:
            raise
        raise Interrupted(signals.received, engine.t, saved) from e
    finally:
        signals.restore()
        progress.close()

    # --- final model and summary ---
    check_finite(workers, plan.total_steps - 1, ckpt_root)
    final = averaged if averaged is not None else engine.averaged_model()  # the last step evaluates it
    summary = summarize(cfg, plan, history, measures) | task.baselines()
    writer.final(final, cfg.to_dict(), summary)
    return Result(summary, history, final, engine, main)


def summarize(cfg: Config, plan: Plan, history: list[dict[str, Any]], measures: Measures) -> dict[str, Any]:
    """The run's headline numbers: accuracy on the evaluation split always, and the task's own
    headline (text: bits per byte, with the loss it comes from) where that is another metric."""
    split, h = measures.split, measures.headline
    evals = [r for r in history if f"{split}_acc" in r]
    last = history[-1]
    summary: dict[str, Any] = {
        "schedule": str(plan.schedule),
        "epochs": last["epoch"],
        "steps": last["step"],
        "final_train_loss": last["train_loss"],
        f"final_{split}_acc": evals[-1][f"{split}_acc"],
        f"best_{split}_acc": max(r[f"{split}_acc"] for r in evals),
    }
    if h is not ACCURACY:
        best = max if h.higher_is_better else min
        summary[f"final_{split}_loss"] = evals[-1][f"{split}_loss"]
        summary[f"best_{split}_loss"] = min(r[f"{split}_loss"] for r in evals)
        summary[measures.final] = evals[-1][measures.curve]
        summary[f"best_{measures.curve}"] = best(r[measures.curve] for r in evals)
    if measures.x == "tokens":
        summary["tokens"] = last["tokens"]
        summary["tokens_per_second"] = last["tokens_per_second"]
    summary.update(
        rounds=last["rounds"],
        bytes=last["bytes"],
        comm_seconds=last["comm_seconds"],
        compute_seconds=last["compute_seconds"],
        wall_seconds=last["wall_seconds"],
    )
    if f"local_{split}_acc" in evals[-1]:
        summary[f"final_local_{split}_acc"] = evals[-1][f"local_{split}_acc"]
        if h is not ACCURACY:
            summary[f"final_local_{measures.curve}"] = evals[-1][f"local_{measures.curve}"]
    if cfg.eval_local == "every":
        summary[f"best_local_{split}_acc"] = max(r[f"local_{split}_acc"] for r in evals)
    return summary
