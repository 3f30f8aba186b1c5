"""``localsgd train``: the paper's training protocol, one worker per process under torchrun or K
workers in the simulator, with the same results for the same seed. Read top to bottom."""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from localsgd import DistCommunicator, Engine, LocalSGD, Simulator, outer
from localsgd.compression import DEFAULT_BLOCK, make_codec
from localsgd.harness import checkpoint, optim
from localsgd.harness.config import Config, ConfigError
from localsgd.harness.data import Dataset, augment, default_data_dir, epoch_shards, load_dataset, normalize
from localsgd.harness.models import build_model
from localsgd.harness.rundir import RunWriter
from localsgd.harness.runtime import Runtime, resolve_workers
from localsgd.schedule import Schedule

EVAL_BATCH = 1000


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


def make_plan(cfg: Config, train_size: int) -> Plan:
    per_worker = train_size // cfg.workers
    if per_worker == 0:
        raise ConfigError(f"{train_size} training images cannot be shared by workers (K) = {cfg.workers}")
    if cfg.local_batch_size > per_worker:
        raise ConfigError(
            f"local_batch_size (B_loc) = {cfg.local_batch_size} exceeds each worker's shard of {per_worker} "
            f"images ({train_size} training images / workers (K) = {cfg.workers})"
        )
    steps_per_epoch = math.ceil(per_worker / cfg.local_batch_size)  # the last batch may be short
    total_steps = max(1, round(cfg.epochs * steps_per_epoch))
    switch_step = round(cfg.switch_epoch_value() * steps_per_epoch)
    schedule = Schedule(local_steps=cfg.local_steps, switch_step=switch_step, block_steps=cfg.block_steps)
    peak = cfg.peak_lr or optim.peak_lr(cfg.lr_per_64, cfg.local_batch_size, cfg.workers)
    decay_epochs = [f * cfg.epochs for f in cfg.decay_at]
    return Plan(steps_per_epoch, total_steps, switch_step, peak, decay_epochs, schedule)


def subset(x: torch.Tensor, y: torch.Tensor, n: int | None, seed: int, what: str) -> tuple[torch.Tensor, ...]:
    if n is None:
        return x, y
    if n > len(x):
        raise ConfigError(f"{what}_subset = {n} exceeds the {len(x)} {what} images")
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:n]
    return x[idx], y[idx]


@torch.no_grad()
def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, data: Dataset, channels_last: bool
) -> torch.Tensor:
    """[loss sum, correct, count] of ``model`` on (x, y): float64 on the data's device (not read)."""
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=x.device)
    for i in range(0, len(x), EVAL_BATCH):
        xb = normalize(x[i : i + EVAL_BATCH], data.mean, data.std)
        if channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        out = model(xb)
        yb = y[i : i + EVAL_BATCH]
        sums[0] += F.cross_entropy(out, yb, reduction="sum").double()
        sums[1] += (out.argmax(1) == yb).sum()
    sums[2] = len(x)
    model.train()
    return sums


class Tally:
    """The epoch's training sums and every loss since the last check, kept on the device: the loop
    reads them at averaging rounds, checkpoints and epoch ends, never per step or per worker."""

    MAX_PENDING = 4096  # losses held between reads (a read comes sooner if no round comes)

    def __init__(self, device: torch.device, steps_per_epoch: int, ckpt_root: Path) -> None:
        self.device, self.steps_per_epoch, self.ckpt_root = device, steps_per_epoch, ckpt_root
        self.pending: list[tuple[int, int, torch.Tensor]] = []  # (step, worker, loss)
        self.new_epoch()

    def new_epoch(self) -> None:
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self.correct = torch.zeros((), dtype=torch.int64, device=self.device)
        self.seen = 0

    def add(self, t: int, k: int, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
        loss = loss.detach()
        self.pending.append((t, k, loss))
        self.loss_sum += loss.double() * len(y)  # as a float64 sum of float32 losses on the host would
        self.correct += (logits.argmax(1) == y).sum()
        self.seen += len(y)
        if len(self.pending) >= self.MAX_PENDING:
            self.check()

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
    averaged: nn.Module,
    workers: list[tuple[int, nn.Module]],
    runtime: Runtime,
    cfg: Config,
    data: Dataset,
    x: torch.Tensor,
    y: torch.Tensor,
) -> dict[str, float]:
    """Test loss and accuracy of the averaged model and, if ``workers`` are given, the mean over
    every worker's own model (each on the whole test set), summed over all processes."""
    if runtime.distributed:  # each rank evaluates its share of the test set
        part = slice(runtime.rank, None, cfg.workers)
        ev = runtime.all_sum(evaluate(averaged, x[part], y[part], data, cfg.channels_last))
    else:
        ev = evaluate(averaged, x, y, data, cfg.channels_last).tolist()
    row = {"test_loss": ev[0] / ev[2], "test_acc": ev[1] / ev[2]}
    if workers:
        local = torch.zeros(3, dtype=torch.float64, device=x.device)
        for _, m in workers:
            local = local + evaluate(m, x, y, data, cfg.channels_last)
        loss_sum, correct, seen = runtime.all_sum(local)
        row.update(local_test_loss=loss_sum / seen, local_test_acc=correct / seen)
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


def resolved_config(cfg: Config, plan: Plan, runtime: Runtime, sizes: tuple[int, int]) -> dict[str, Any]:
    """What ``config.json`` records besides the versions: the settings and derived quantities."""
    return {
        "config": cfg.to_dict(),
        "derived": {
            "steps_per_epoch": plan.steps_per_epoch,
            "total_steps": plan.total_steps,
            "switch_step": plan.switch_step,
            "peak_lr": plan.peak_lr,
            "decay_epochs": plan.decay_epochs,
            "train_images": sizes[0],
            "test_images": sizes[1],
            "runtime": "torchrun" if runtime.distributed else "simulator",
            "device": str(runtime.device),
        },
    }


def train(cfg: Config, out: Path) -> Result:
    """Train as ``cfg`` says and write the run directory ``out`` (from rank 0)."""
    # --- check everything before any work ---
    cfg = resolve_workers(cfg)
    cfg.validate()
    runtime = Runtime(cfg)
    main = runtime.rank == 0
    writer = RunWriter(out, main, cfg.tensorboard)
    data = load_dataset(cfg.dataset, cfg.data_dir or default_data_dir(cfg.dataset))
    train_x, train_y = subset(data.train_x, data.train_y, cfg.train_subset, cfg.seed, "train")
    test_x, test_y = subset(data.test_x, data.test_y, cfg.test_subset, cfg.seed + 1, "test")
    plan = make_plan(cfg, len(train_x))
    writer.config(resolved_config(cfg, plan, runtime, (len(train_x), len(test_x))))
    dev = runtime.device
    train_x, train_y, test_x, test_y = (t.to(dev) for t in (train_x, train_y, test_x, test_y))

    # --- workers: the same initial model everywhere ---
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, data.num_classes, in_channels=train_x.shape[1]).to(dev)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)

    def make_optimizer(m: nn.Module) -> torch.optim.Optimizer:
        return optim.sgd(m, plan.peak_lr, cfg.momentum, cfg.nesterov, cfg.weight_decay)

    policies: dict[str, Any] = {"buffers": cfg.buffers, "optimizer_state": cfg.optimizer_state}
    outer_hyper = cfg.outer()
    if outer_hyper is not None:
        make_outer = {"diloco": outer.diloco, "slowmo": outer.slowmo}[cfg.outer_optimizer]
        policies["outer_optimizer"] = make_outer(*outer_hyper)
    if cfg.compress != "none":
        policies["compression"] = make_codec(cfg.compress, cfg.compress_block or DEFAULT_BLOCK)
    if cfg.overlap_steps:
        policies["overlap_steps"] = cfg.overlap_steps
    engine: Engine
    if runtime.distributed:
        comm = DistCommunicator(workers_per_block=cfg.workers_per_block, ordered=cfg.ordered_averaging)
        engine = LocalSGD(make_optimizer(model), model, plan.schedule, comm=comm, **policies)
    else:
        engine = Simulator(
            model,
            make_optimizer,
            plan.schedule,
            cfg.workers,
            workers_per_block=cfg.workers_per_block,
            **policies,
        )
    workers = list(zip(engine.comm.local_workers, engine.models, strict=True))

    def exchange(mine: bytes) -> list[bytes]:  # checkpoint digests, every process's in rank order
        return engine.comm.all_gather_bytes([mine]) if runtime.distributed else [mine]

    # Each worker's augmentation randomness depends on its index only: the same in both runtimes.
    generators = {k: torch.Generator(device=dev).manual_seed(cfg.seed * 100_003 + k) for k, _ in workers}

    # --- resume: everything an uninterrupted run would hold at the checkpoint's step ---
    ckpt_root = out / "checkpoints"
    history: list[dict[str, Any]] = []
    eval_seconds = wall_offset = 0.0
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
    state = (
        checkpoint.restore(ckpt_root, runtime.rank, cfg.to_dict(), dev.type)
        if cfg.resume or restarted
        else None
    )
    if state is not None:
        engine.load_state_dict(state["engine"])
        if runtime.distributed:
            model.load_state_dict(state["model"])
        for k, g in generators.items():
            g.set_state(state["generators"][k])
        history, eval_seconds, wall_offset = state["history"], state["eval_seconds"], state["wall_seconds"]
    start_t = engine.t
    steps = runtime.all_sum(torch.tensor([float(start_t)], dtype=torch.float64, device=dev))[0]
    if steps != start_t * (cfg.workers if runtime.distributed else 1):
        raise checkpoint.CheckpointError(f"{ckpt_root}: the processes found checkpoints of different steps")
    writer.history(history)

    # --- training ---
    B = cfg.local_batch_size
    progress = tqdm(
        total=plan.total_steps, initial=start_t, desc="train", unit="step", dynamic_ncols=True,
        disable=not (main and cfg.progress), mininterval=0.2 if sys.stderr.isatty() else 30.0,
    )  # fmt: skip
    start = time.perf_counter() - wall_offset
    tally = Tally(dev, plan.steps_per_epoch, ckpt_root)
    averaged: nn.Module | None = None  # the last evaluated average of the workers' models
    shards: list[torch.Tensor] = []
    try:  # the bar ends its line before an error is printed
        for t in range(start_t, plan.total_steps):
            epoch, i = divmod(t, plan.steps_per_epoch)
            if i == 0 or t == start_t:  # a fresh random disjoint shard per worker every epoch
                shards = [s.to(dev) for s in epoch_shards(len(train_x), cfg.workers, epoch, cfg.seed)]
            lr = optim.lr_at(
                t / plan.steps_per_epoch, plan.peak_lr, cfg.lr_per_64, cfg.warmup_epochs, plan.decay_epochs,
                cfg.decay_factor,
            )  # fmt: skip
            for opt in engine.optimizers:
                for group in opt.param_groups:
                    group["lr"] = lr
            for k, m in workers:
                idx = shards[k][i * B : (i + 1) * B]
                x = augment(train_x[idx], generators[k], data.mean, data.std)
                if cfg.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                y = train_y[idx]
                with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
                    logits = m(x)
                    loss = F.cross_entropy(logits, y)
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

            last_of_epoch = i == plan.steps_per_epoch - 1 or t == plan.total_steps - 1
            if not last_of_epoch:
                continue
            tally.check()
            done_epochs = (t + 1) / plan.steps_per_epoch
            loss_sum, correct, seen = runtime.all_sum(tally.sums())
            tally.new_epoch()
            row: dict[str, Any] = {
                "epoch": round(done_epochs, 4),
                "step": t + 1,
                "lr": lr,
                "train_loss": loss_sum / seen,
                "train_acc": correct / seen,
            }
            if (epoch + 1) % cfg.eval_every == 0 or t == plan.total_steps - 1:
                eval_start = time.perf_counter()
                averaged = engine.averaged_model()
                final = t == plan.total_steps - 1
                local = cfg.eval_local == "every" or (cfg.eval_local == "final" and final)
                row.update(evaluation(averaged, workers if local else [], runtime, cfg, data, test_x, test_y))
                eval_seconds += time.perf_counter() - eval_start
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
            history.append(row)
            shown = f"epoch {epoch + 1} lr {lr:.3g} loss {row['train_loss']:.3f}"
            if "test_acc" in row:
                shown += f" test {row['test_acc']:.2%}"
            progress.set_postfix_str(shown)
            writer.append(row, t + 1)
            if (epoch + 1) % cfg.checkpoint_every == 0 and t + 1 < plan.total_steps:
                check_finite(workers, t, ckpt_root)  # never replace a good checkpoint by a broken one
                state = {
                    "config": cfg.to_dict(),
                    "engine": engine.state_dict(),
                    "generators": {k: g.get_state() for k, g in generators.items()},
                    "history": history,
                    "eval_seconds": eval_seconds,
                    "wall_seconds": time.perf_counter() - start,
                    "device": dev.type,  # the random generators' states are per device type
                }
                if runtime.distributed:
                    state["model"] = model.state_dict()
                checkpoint.save(ckpt_root, t + 1, state, runtime.rank, exchange)
    finally:
        progress.close()

    # --- final model and summary ---
    check_finite(workers, plan.total_steps - 1, ckpt_root)
    final = averaged if averaged is not None else engine.averaged_model()  # the last step evaluates it
    summary = summarize(cfg, plan, history)
    writer.final(final, cfg.to_dict(), summary)
    return Result(summary, history, final, engine, main)


def summarize(cfg: Config, plan: Plan, history: list[dict[str, Any]]) -> dict[str, Any]:
    evals = [r for r in history if "test_acc" in r]
    last = history[-1]
    summary: dict[str, Any] = {
        "schedule": str(plan.schedule),
        "epochs": last["epoch"],
        "steps": last["step"],
        "final_train_loss": last["train_loss"],
        "final_test_acc": evals[-1]["test_acc"],
        "best_test_acc": max(r["test_acc"] for r in evals),
        "rounds": last["rounds"],
        "bytes": last["bytes"],
        "comm_seconds": last["comm_seconds"],
        "compute_seconds": last["compute_seconds"],
        "wall_seconds": last["wall_seconds"],
    }
    if "local_test_acc" in evals[-1]:
        summary["final_local_test_acc"] = evals[-1]["local_test_acc"]
    if cfg.eval_local == "every":
        summary["best_local_test_acc"] = max(r["local_test_acc"] for r in evals)
    return summary


def table(history: list[dict[str, Any]]) -> str:
    """The evaluated epochs as a fixed-width table."""
    head = (
        f"{'epoch':>6} {'lr':>8} {'train loss':>10} {'train acc':>9} {'test acc':>8} {'local acc':>9} "
        f"{'rounds':>14}"
    )
    rows = [head, "-" * len(head)]
    for r in history:
        if "test_acc" not in r:
            continue
        local = f"{r['local_test_acc']:.2%}" if "local_test_acc" in r else "-"
        rounds = "/".join(str(n) for n in r["rounds"].values())
        rows.append(
            f"{r['epoch']:>6g} {r['lr']:>8.4f} {r['train_loss']:>10.4f} {r['train_acc']:>9.2%} "
            f"{r['test_acc']:>8.2%} {local:>9} {rounds:>14}"
        )
    return "\n".join(rows)
