"""``localsgd train``: the training loop for every task (``tasks.py``: images, text), one worker per
process under torchrun or K workers in the simulator, with the same results for the same seed. Read
top to bottom."""

from __future__ import annotations

import copy
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from localsgd import Communicator, DistCommunicator, Engine, LocalSGD, Policy, Simulator, dcp
from localsgd.compression import DEFAULT_BLOCK, make_codec
from localsgd.engine import CommunicationError
from localsgd.harness import checkpoint, optim, rundir
from localsgd.harness import fault_tolerance as ft
from localsgd.harness.config import OUTER_OPTIMIZERS, Config, ConfigError
from localsgd.harness.interrupt import Interrupted, Signals
from localsgd.harness.rows import Tally, check_finite, cross_entropy, evaluation, summarize
from localsgd.harness.rundir import RunWriter
from localsgd.harness.runtime import Runtime, resolve_workers
from localsgd.harness.seeding import WorkerRandom
from localsgd.harness.tasks import Task, make_task, sampling
from localsgd.schedule import Level, Schedule
from localsgd.sharding import replica_communicator, shard_model


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
            "runtime": runtime.name,
            "random": "per step" if cfg.per_step_random() else "per worker",
            "device": str(runtime.device),
        },
    }


def build_engine(
    cfg: Config, plan: Plan, runtime: Runtime, model: nn.Module, rounds: ft.RoundLog | None = None
) -> Engine:
    """This process's workers: the model (and K - 1 copies in the simulator), their optimizers and
    the averaging policies the config asks for. A fault-tolerant worker joins its run here (and
    logs its rounds to ``rounds``)."""

    def make_optimizer(m: nn.Module) -> torch.optim.Optimizer:
        if cfg.optimizer == "adamw":
            betas = cfg.betas or optim.ADAMW_BETAS
            return optim.adamw(m, plan.peak_lr, (betas[0], betas[1]), cfg.weight_decay)
        return optim.sgd(m, plan.peak_lr, cfg.momentum, cfg.nesterov, cfg.weight_decay)

    policy = build_policy(cfg)
    if runtime.mesh is not None:  # sharded workers: averages across the K groups
        comm: Communicator = replica_communicator(runtime.mesh, ordered=cfg.ordered_averaging)
        return LocalSGD(make_optimizer(model), model, plan.schedule, comm=comm, policy=policy)
    if runtime.distributed or runtime.fault_tolerant:
        if runtime.fault_tolerant:
            assert rounds is not None
            comm = ft.communicator(cfg, rounds)
        else:
            comm = DistCommunicator(workers_per_block=cfg.workers_per_block, ordered=cfg.ordered_averaging)
        return LocalSGD(make_optimizer(model), model, plan.schedule, comm=comm, policy=policy)
    return Simulator(
        model,
        make_optimizer,
        plan.schedule,
        cfg.workers,
        workers_per_block=cfg.workers_per_block,
        policy=policy,
        membership=runtime.membership,
    )


def build_policy(cfg: Config) -> Policy:
    """The averaging policies the config asks for."""
    outer_hyper = cfg.outer()
    make_outer = None
    if outer_hyper is not None:
        make_outer = OUTER_OPTIMIZERS[cfg.outer_optimizer](*outer_hyper)
    codec = None if cfg.compress == "none" else make_codec(cfg.compress, cfg.compress_block or DEFAULT_BLOCK)
    return Policy(
        buffers=cfg.buffers,
        optimizer_state=cfg.optimizer_state,
        outer_optimizer=make_outer,
        compression=codec,
        overlap_steps=cfg.overlap_steps,
        max_grad_norm=cfg.max_grad_norm,
        fragments=cfg.fragments,
        merge=cfg.merge,
        alpha=cfg.alpha,
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


@dataclass
class Run:
    """One run in this process, from its first step to its final model: the workers and what a
    step, a row and a checkpoint read and change. ``setup`` builds it (and resumes it); the loop in
    ``run_training`` calls ``step`` for every step and ``row`` at the end of each row."""

    cfg: Config
    runtime: Runtime
    writer: RunWriter
    task: Task
    plan: Plan
    keep: dict[int, float]  # step -> epoch of the models save_models_at keeps
    model: nn.Module
    engine: Engine
    random: WorkerRandom
    tally: Tally
    ckpt_root: Path
    history: list[dict[str, Any]] = field(default_factory=list)
    eval_seconds: float = 0.0
    wall_offset: float = 0.0  # seconds of the earlier sittings of a resumed run
    start: float = 0.0  # the clock's reading at step 0 (less the earlier sittings)
    first_step: int = 0  # this sitting's
    saved: int | None = None  # the step --resume would continue from
    averaged: nn.Module | None = None  # the last evaluated average of the workers' models
    averaged_over: list[int] | None = None  # fault-tolerant: whom the last average was over
    rounds: ft.RoundLog | None = None  # a fault-tolerant worker's round records

    @property
    def workers(self) -> list[tuple[int, nn.Module]]:
        """This process's workers: (k, model)."""
        return list(zip(self.engine.comm.local_workers, self.engine.models, strict=True))

    @property
    def period(self) -> int:
        """Steps per metrics row."""
        return self.cfg.row_steps or self.plan.steps_per_epoch

    # --- setup --------------------------------------------------------------------------------

    @classmethod
    def setup(
        cls, cfg: Config, out: Path, runtime: Runtime, writer: RunWriter, task: Task, plan: Plan,
        keep: dict[int, float],
    ) -> Run:  # fmt: skip
        """The same initial model everywhere, the engine around it and, resuming, everything an
        uninterrupted run would hold at the checkpoint's step; then ``config.json`` is written
        (the first write: everything is checked)."""
        torch.manual_seed(cfg.seed)
        model = task.model()
        if runtime.mesh is not None:
            shard_model(model, runtime.mesh)
        rounds = ft.RoundLog() if runtime.fault_tolerant else None
        engine = build_engine(cfg, plan, runtime, model, rounds)
        try:
            workers = list(engine.comm.local_workers)
            random = WorkerRandom(cfg.seed, workers, runtime.device, runtime.part, cfg.per_step_random())
            ckpt_root = out / "checkpoints"
            tally = Tally(runtime.device, plan.steps_per_epoch, ckpt_root)
            run = cls(cfg, runtime, writer, task, plan, keep, model, engine, random, tally, ckpt_root)
            resolved = resolved_config(cfg, plan, runtime, task)
            if rounds is not None:  # joined: the run's id says whether out holds this run's rows
                run_id = getattr(engine.comm, "run_id")  # noqa: B009 (a FaultTolerantCommunicator's)
                run.history, run.rounds = ft.adopt(out, run_id, cfg.overwrite), rounds
                resolved["derived"]["run_id"] = run_id
            run.resume()
            run.first_step = engine.t
            run.saved = engine.t if (ckpt_root / "latest").exists() else None
            writer.config(resolved)
            writer.history(run.history)
            if rounds is not None:
                rounds.open(out / ft.ROUNDS)
        except BaseException:
            engine.comm.shutdown()
            raise
        return run

    def resume(self) -> None:
        """With ``resume`` (or in a group torchrun restarted), load the last checkpoint into the
        engine, the model, the random streams, the task's carried state and the current row's
        sums, with the rows and seconds so far."""
        cfg, runtime, engine, root = self.cfg, self.runtime, self.engine, self.ckpt_root
        dev = runtime.device
        state = checkpoint.restore(root, runtime.rank, cfg.to_dict(), dev.type) if resuming(cfg) else None
        if state is not None:
            if runtime.mesh is not None:  # model, optimizer and localsgd state in DCP's files
                assert isinstance(engine, LocalSGD)
                dcp.load(checkpoint.step_dir(root, state["step"]) / "dcp", self.model, engine)
            else:
                engine.load_state_dict(state["engine"])
            if runtime.distributed and runtime.mesh is None:
                self.model.load_state_dict(state["model"])
            self.random.load(state.get("random") or {"data": state["generators"]})  # older: no dropout state
            self.task.load(state.get("task", {}))
            self.history, self.eval_seconds = state["history"], state["eval_seconds"]
            self.wall_offset = state["wall_seconds"]
            if "tally" in state:  # older files: checkpoints were written at row ends only
                self.tally.load(state["tally"])
        steps = runtime.all_sum(torch.tensor([float(engine.t)], dtype=torch.float64, device=dev))[0]
        if steps != engine.t * runtime.processes:
            raise checkpoint.CheckpointError(f"{root}: the processes found checkpoints of different steps")

    def start_clock(self) -> None:
        self.start = time.perf_counter() - self.wall_offset

    # --- a step -------------------------------------------------------------------------------

    def step(self, t: int) -> float:
        """Step ``t`` of every worker of this process: its batch, forward and backward pass, then
        the engine's step (which averages when the schedule says); returns the step's LR."""
        cfg, plan, task, engine, dev = self.cfg, self.plan, self.task, self.engine, self.runtime.device
        epoch, i = divmod(t, plan.steps_per_epoch)
        if i == 0 or t == self.first_step:  # fresh disjoint data per worker every epoch
            task.start_epoch(epoch, i)
        lr = lr_at(cfg, plan, t)
        self.random.at(t)
        for opt in engine.optimizers:
            for group in opt.param_groups:
                group["lr"] = lr
        for k, m in self.workers:
            x, y = task.batch(k, i, self.random.data[k])
            if self.runtime.shards > 1:  # this process's part of its worker's batch
                n = len(x) // self.runtime.shards
                lo = self.runtime.part * n
                x, y = x[lo : lo + n], y[lo : lo + n]
            with (
                self.random.of(k),
                torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"),
            ):
                logits = task.forward(k, m, x)
                loss = cross_entropy(logits, y)
            loss.backward()
            self.tally.add(t, k, loss, logits, y)
        sync = engine.schedule.sync_at(engine.t)
        if sync.gradients is not None or sync.parameters is not None:
            self.tally.check()  # nothing non-finite reaches an average
        engine.step()
        engine.zero_grad()
        if t == plan.total_steps - 1:
            engine.flush()  # an overlapped average still in flight belongs to the final model
        return lr

    # --- a row --------------------------------------------------------------------------------

    def ends_row(self, t: int) -> bool:
        """A row at every period's end (default: every epoch's) and at the end."""
        return (t + 1) % self.period == 0 or t == self.plan.total_steps - 1

    def row(self, t: int, lr: float) -> dict[str, Any]:
        """The row that step ``t`` ends: the training sums since the last row, the evaluation if
        one is due, the communication and the seconds so far; written to the run directory, with
        the model ``save_models_at`` keeps at this step."""
        cfg, last = self.cfg, t == self.plan.total_steps - 1
        self.tally.check()
        loss_sum, correct, seen = self.runtime.all_sum(self.tally.sums())
        self.tally.new_row()
        row: dict[str, Any] = {
            "epoch": round((t + 1) / self.plan.steps_per_epoch, 4),
            "step": t + 1,
            "lr": lr,
        }
        if seen:  # (none: a fault-tolerant worker that joined at the run's last round took no step)
            row.update(train_loss=loss_sum / seen, train_acc=correct / seen)
        evaluated = ((t + 1) // self.period) % cfg.eval_every == 0 or last
        if evaluated:
            eval_start = time.perf_counter()
            self.averaged = self.average()
            local = cfg.eval_local == "every" or (cfg.eval_local == "final" and last)
            row.update(evaluation(self.averaged, self.workers if local else [], self.runtime, self.task))
            self.eval_seconds += time.perf_counter() - eval_start
        if t + 1 in self.keep:  # the model this row evaluated (averaged again if it evaluated none)
            kept = self.averaged if evaluated else self.average()
            self.writer.model_at(kept, cfg.to_dict(), self.keep[t + 1])
        row.update(self.costs())
        if self.rounds is not None:
            row.update(
                self.rounds.take(self.cfg.worker or 0),
                averaged_over=self.averaged_over if evaluated else None,
            )
        self.task.annotate(row, t + 1)
        self.history.append(row)
        self.writer.append(row, t + 1)
        return row

    def average(self) -> nn.Module:
        """The mean of the K workers' models (for evaluation and the saved models); of sharded
        workers, whole and unsharded, in a model built again (torch's random state kept). In a
        fault-tolerant run, of the workers present; this worker's own if that average was not
        committed (a worker left during it)."""
        if self.engine.comm.fault_tolerant:
            self.averaged_over = None  # (this worker alone: its own model)
            try:
                model = self.engine.averaged_model()
            except CommunicationError as e:
                print(f"localsgd: {e}; evaluating this worker's own model", file=sys.stderr)
                return copy.deepcopy(self.engine.models[0])
            group = self.engine.comm.round_group(Level.GLOBAL)  # its round's (or the open round's)
            self.averaged_over = None if group is None else list(group.contributors)
            return model
        if self.runtime.mesh is None:
            return self.engine.averaged_model()
        with torch.random.fork_rng(devices=[]):
            plain = self.task.model()
        return self.engine.averaged_model(into=plain)

    def costs(self) -> dict[str, Any]:
        """Rounds and bytes per level, and where the seconds went, so far."""
        stats = self.engine.stats
        comm = sum(s.seconds for s in stats.values())
        wall = time.perf_counter() - self.start
        return {
            "rounds": {level: s.rounds for level, s in stats.items()},
            "bytes": {level: s.bytes for level, s in stats.items()},
            "comm_seconds": comm,
            "eval_seconds": self.eval_seconds,
            "compute_seconds": wall - comm - self.eval_seconds,
            "wall_seconds": wall,
        }

    def shown(self, row: dict[str, Any]) -> str:
        """The row on the progress bar."""
        m = self.task.measures
        epoch = (row["step"] - 1) // self.plan.steps_per_epoch + 1
        text = f"epoch {epoch} lr {row['lr']:.3g} loss {row['train_loss']:.3f}"
        return text + (f" {m.split} {m.headline.cell(row[m.curve])}" if m.curve in row else "")

    # --- checkpoints and the end ----------------------------------------------------------------

    def checkpoint_due(self, t: int) -> bool:
        """A checkpoint after the row step ``t`` ends, every ``checkpoint_every`` rows (not at the end)."""
        if self.runtime.fault_tolerant:  # a restarted worker heals from a live one
            return False
        return ((t + 1) // self.period) % self.cfg.checkpoint_every == 0 and t + 1 < self.plan.total_steps

    def checkpoint(self, steps: int) -> None:
        """Checkpoint this process's state after ``steps`` steps, never replacing a good checkpoint
        by a broken one."""
        check_finite(self.workers, steps - 1, self.ckpt_root)
        self.save()
        self.saved = steps

    def save(self) -> None:
        runtime, engine = self.runtime, self.engine

        def exchange(mine: bytes) -> list[bytes]:  # checkpoint digests, every process's in rank order
            if runtime.mesh is not None:  # the engine's communicator holds one process of each group
                every: list[Any] = [None] * runtime.processes
                dist.all_gather_object(every, mine)
                return every
            return engine.comm.all_gather_bytes([mine]) if runtime.distributed else [mine]

        state = {
            "config": self.cfg.to_dict(),
            "step": engine.t,
            "random": self.random.state(),
            "task": self.task.state(),
            "history": self.history,
            "eval_seconds": self.eval_seconds,
            "wall_seconds": time.perf_counter() - self.start,
            "tally": self.tally.state(),
            "device": runtime.device.type,  # the random generators' states are per device type
        }
        if runtime.mesh is not None:  # sharded: model, optimizer and localsgd state through DCP
            assert isinstance(engine, LocalSGD)
            dcp.save(checkpoint.step_dir(self.ckpt_root, engine.t) / "dcp", self.model, engine)
        else:
            state["engine"] = engine.state_dict()
            if runtime.distributed:
                state["model"] = self.model.state_dict()
        checkpoint.save(self.ckpt_root, engine.t, state, runtime.rank, exchange)

    def interrupted(self, signum: int, t: int) -> Interrupted:
        """Stop before step ``t`` on a signal: the simulator checkpoints this step (under torchrun
        the workers could not agree on one without another collective: the last checkpoint stays;
        a fault-tolerant worker leaves, and the others go on)."""
        if self.runtime.fault_tolerant:
            return Interrupted(signum, t, None, "by starting this worker again", "it heals from a live one")
        if not self.runtime.distributed and self.saved != t:
            self.tally.check()
            self.checkpoint(t)
        return Interrupted(signum, t, self.saved)

    def finish(self) -> Result:
        """The final model (the last row evaluated it) and the summary, written."""
        check_finite(self.workers, self.plan.total_steps - 1, self.ckpt_root)
        final = self.averaged if self.averaged is not None else self.average()
        local_every = self.cfg.eval_local == "every"
        summary = summarize(self.history, self.task.measures, str(self.plan.schedule), local_every)
        summary |= self.task.baselines()
        if self.rounds is not None:  # whom the final model averaged (this worker alone: its own)
            summary |= {"worker": self.cfg.worker, "averaged_over": self.history[-1].get("averaged_over")}
        self.writer.final(final, self.cfg.to_dict(), summary)
        return Result(summary, self.history, final, self.engine, self.runtime.rank == 0)


def train(cfg: Config, out: Path) -> Result:
    """Train as ``cfg`` says and write the run directory ``out`` (from rank 0)."""
    # --- check everything before any work ---
    cfg = resolve_workers(cfg)
    cfg.validate()
    runtime = Runtime(cfg)
    if cfg.fault_tolerant:
        out = ft.worker_dir(cfg, out)
    writer = RunWriter(out, runtime.rank == 0, cfg.tensorboard)
    task = make_task(cfg, runtime.device)
    plan = make_plan(cfg, task.steps_per_epoch)
    keep = kept_models(cfg, plan, cfg.row_steps or plan.steps_per_epoch)
    check_compress_block(cfg, task)
    # the run directory is this run's until it returns
    lock = ft.claim(cfg, out) if cfg.fault_tolerant else claim(cfg, out, runtime)
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
    """The run itself, once ``train`` has checked everything and holds the run directory: setup,
    then a step at a time, a row at each row's end."""
    run = Run.setup(cfg, out, runtime, writer, task, plan, keep)
    try:
        return run_steps(run)
    finally:
        run.engine.comm.shutdown()


def run_steps(run: Run) -> Result:
    """Every step from the run's first, a row at each row's end, then the final model."""
    cfg, runtime, plan = run.cfg, run.runtime, run.plan
    progress = tqdm(
        total=plan.total_steps, initial=run.first_step, desc="train", unit="step", dynamic_ncols=True,
        disable=not (runtime.rank == 0 and cfg.progress), mininterval=0.2 if sys.stderr.isatty() else 30.0,
    )  # fmt: skip
    run.start_clock()
    signals = Signals(insist=not runtime.distributed).install()
    try:  # the bar ends its line before an error is printed
        for t in range(run.first_step, plan.total_steps):
            if signals.received is not None:  # stop between steps
                raise run.interrupted(signals.received, t)
            lr = run.step(t)
            progress.set_postfix_str(f"epoch {t // plan.steps_per_epoch + 1} lr {lr:.3g}", refresh=False)
            progress.update()
            if run.ends_row(t):
                progress.set_postfix_str(run.shown(run.row(t, lr)))
                if run.checkpoint_due(t):
                    run.checkpoint(t + 1)
        if not run.history or run.history[-1]["step"] != plan.total_steps:  # joined after the last step
            last = plan.total_steps - 1
            run.row(last, lr_at(cfg, plan, last))
    except CommunicationError as e:  # a peer that stopped on the signal first
        if signals.received is None:
            raise
        raise Interrupted(signals.received, run.engine.t, run.saved) from e
    finally:
        signals.restore()
        progress.close()
    return run.finish()
