"""``localsgd train``: the paper's training protocol, one worker per process under torchrun or K
workers in the simulator, with the same results for the same seed. Read top to bottom."""

from __future__ import annotations

import io
import json
import math
import os
import platform
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

import localsgd
from localsgd import DistCommunicator, Engine, LocalSGD, Schedule, Simulator
from localsgd.comm import init_process_group
from localsgd.engine import CommunicationError, first_line
from localsgd.harness import checkpoint, optim
from localsgd.harness.config import Config, ConfigError
from localsgd.harness.data import Dataset, augment, default_data_dir, epoch_shards, load_dataset, normalize
from localsgd.harness.models import build_model
from localsgd.harness.progress import Progress

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


def bf16_supported(device: torch.device) -> bool:
    """Whether bfloat16 autocast runs on native kernels (on CPU: oneDNN with AVX-512 BF16 or AMX)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


class Runtime:
    """This process's place among the K workers: simulator (all K here) or one torchrun rank."""

    def __init__(self, cfg: Config) -> None:
        self.distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
        self.device = torch.device("cpu")
        if self.distributed:
            world = int(os.environ["WORLD_SIZE"])
            if world != cfg.workers:
                raise ConfigError(
                    f"workers (K) = {cfg.workers} but torchrun started {world} processes; "
                    f"pass --workers {world} or start {cfg.workers} processes"
                )
            if torch.cuda.is_available():
                self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
                torch.cuda.set_device(self.device)
            if not dist.is_initialized():
                backend = "nccl" if self.device.type == "cuda" else "gloo"
                init_process_group(backend, timeout=timedelta(seconds=cfg.timeout))
        if cfg.precision == "bf16" and not bf16_supported(self.device):
            raise ConfigError(
                f"precision = bf16 needs native bfloat16, which this {self.device.type} lacks (torch CPU "
                f"capability {torch.backends.cpu.get_cpu_capability()}; bf16 would run several times slower "
                "than fp32 here); use precision = fp32"
            )
        self.rank = dist.get_rank() if self.distributed else 0
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        threads = cfg.threads or max(1, (os.cpu_count() or 1) // local)
        torch.set_num_threads(threads)

    def all_sum(self, values: list[float]) -> list[float]:
        """Sums over all processes (identity in the simulator)."""
        if not self.distributed:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        try:
            dist.all_reduce(t)
        except RuntimeError as e:
            raise CommunicationError(f"summing metrics across workers failed ({first_line(e)})") from e
        return t.tolist()


@torch.no_grad()
def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, data: Dataset, channels_last: bool
) -> list[float]:
    """[loss sum, correct, count] of ``model`` on (x, y)."""
    model.eval()
    loss = correct = 0.0
    for i in range(0, len(x), EVAL_BATCH):
        xb = normalize(x[i : i + EVAL_BATCH], data.mean, data.std)
        if channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        out = model(xb)
        yb = y[i : i + EVAL_BATCH]
        loss += F.cross_entropy(out, yb, reduction="sum").item()
        correct += (out.argmax(1) == yb).sum().item()
    model.train()
    return [loss, correct, float(len(x))]


def check_finite(workers: list[tuple[int, nn.Module]], t: int, ckpt_root: Path) -> None:
    for k, m in workers:
        for name, value in m.state_dict().items():
            if value.is_floating_point() and not torch.isfinite(value).all():
                raise TrainingError(
                    f"{name} is not finite after step {t} on worker {k}; {last_good(ckpt_root)}"
                )


def last_good(ckpt_root: Path) -> str:
    if (ckpt_root / "latest").exists():
        return f"the last good checkpoint is in {ckpt_root}"
    return "no checkpoint was written before"


def write_text(text: str, path: Path) -> None:
    checkpoint.atomic_write_bytes(text.encode(), path)


@dataclass
class Result:
    summary: dict[str, Any]
    history: list[dict[str, Any]]
    final_model: nn.Module
    engine: Engine
    main: bool


def source_commit(paths: tuple[str, ...] = ("localsgd",)) -> str | None:
    """The git commit of the localsgd source in use (``+dirty`` if files under ``paths`` differ
    from it), or None outside a git checkout (an installed package)."""
    import subprocess

    root = Path(localsgd.__file__).resolve().parents[1]
    if not (root / ".git").exists():
        return None

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)

    try:
        head, status = git("rev-parse", "--short", "HEAD"), git("status", "--porcelain", "--", *paths)
    except OSError:
        return None
    if head.returncode:
        return None
    return head.stdout.strip() + ("+dirty" if status.stdout.strip() else "")


def train(cfg: Config, out: Path) -> Result:
    """Train as ``cfg`` says and write the run directory ``out`` (from rank 0)."""
    # --- check everything before any work ---
    cfg.validate()
    runtime = Runtime(cfg)
    if cfg.tensorboard:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError(
                "tensorboard = true needs the tensorboard package: pip install tensorboard"
            ) from None
    data = load_dataset(cfg.dataset, cfg.data_dir or default_data_dir(cfg.dataset))
    train_x, train_y = subset(data.train_x, data.train_y, cfg.train_subset, cfg.seed, "train")
    test_x, test_y = subset(data.test_x, data.test_y, cfg.test_subset, cfg.seed + 1, "test")
    plan = make_plan(cfg, len(train_x))
    dev = runtime.device
    train_x, train_y, test_x, test_y = (t.to(dev) for t in (train_x, train_y, test_x, test_y))
    main = runtime.rank == 0

    # --- workers: the same initial model everywhere ---
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, data.num_classes, in_channels=train_x.shape[1]).to(dev)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)

    def make_optimizer(m: nn.Module) -> torch.optim.Optimizer:
        return optim.sgd(m, plan.peak_lr, cfg.momentum, cfg.nesterov, cfg.weight_decay)

    policies = {"buffers": cfg.buffers, "optimizer_state": cfg.optimizer_state}
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
    # Each worker's augmentation randomness depends on its index only: the same in both runtimes.
    generators = {k: torch.Generator(device=dev).manual_seed(cfg.seed * 100_003 + k) for k, _ in workers}

    # --- the run directory ---
    writer = None
    if main:
        out.mkdir(parents=True, exist_ok=True)
        resolved = {
            "config": cfg.to_dict(),
            "derived": {
                "steps_per_epoch": plan.steps_per_epoch,
                "total_steps": plan.total_steps,
                "switch_step": plan.switch_step,
                "peak_lr": plan.peak_lr,
                "decay_epochs": plan.decay_epochs,
                "train_images": len(train_x),
                "test_images": len(test_x),
                "runtime": "torchrun" if runtime.distributed else "simulator",
            },
            "versions": {
                "localsgd": localsgd.__version__,
                "commit": source_commit(),
                "torch": torch.__version__,
                "python": platform.python_version(),
                "machine": platform.machine(),
            },
        }
        write_text(json.dumps(resolved, indent=2) + "\n", out / "config.json")
        if cfg.tensorboard:
            writer = SummaryWriter(str(out / "tensorboard"))

    # --- resume: everything an uninterrupted run would hold at the checkpoint's step ---
    ckpt_root = out / "checkpoints"
    history: list[dict[str, Any]] = []
    eval_seconds = wall_offset = 0.0
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
    state = checkpoint.read_state(ckpt_root, runtime.rank) if cfg.resume or restarted else None
    if state is not None:
        checkpoint.check_same_config(state["config"], cfg.to_dict(), ckpt_root)
        engine.load_state_dict(state["engine"])
        if runtime.distributed:
            model.load_state_dict(state["model"])
        for k, g in generators.items():
            g.set_state(state["generators"][k])
        history, eval_seconds, wall_offset = state["history"], state["eval_seconds"], state["wall_seconds"]
    start_t = engine.t
    if runtime.all_sum([float(start_t)])[0] != start_t * (cfg.workers if runtime.distributed else 1):
        raise checkpoint.CheckpointError(f"{ckpt_root}: the processes found checkpoints of different steps")
    if main:
        write_text("".join(json.dumps(row) + "\n" for row in history), out / "metrics.jsonl")

    # --- training ---
    B = cfg.local_batch_size
    progress = Progress(plan.total_steps - start_t, "train", enabled=main and cfg.progress)
    start = time.perf_counter() - wall_offset
    sums = [0.0, 0.0, 0.0]  # loss sum, correct, samples (this epoch, this process's workers)
    averaged: nn.Module | None = None  # the last evaluated average of the workers' models
    shards: list[torch.Tensor] = []
    for t in range(start_t, plan.total_steps):
        epoch, i = divmod(t, plan.steps_per_epoch)
        if i == 0 or t == start_t:  # a fresh random disjoint shard per worker every epoch
            shards = epoch_shards(len(train_x), cfg.workers, epoch, cfg.seed)
        lr = optim.lr_at(
            t / plan.steps_per_epoch, plan.peak_lr, cfg.lr_per_64, cfg.warmup_epochs, plan.decay_epochs,
            cfg.decay_factor,
        )  # fmt: skip
        for opt in engine.optimizers:
            for group in opt.param_groups:
                group["lr"] = lr
        for k, m in workers:
            idx = shards[k][i * B : (i + 1) * B].to(dev)
            x = augment(train_x[idx], generators[k], data.mean, data.std)
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            y = train_y[idx]
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
                logits = m(x)
                loss = F.cross_entropy(logits, y)
            value = loss.item()
            if not math.isfinite(value):  # stop before the bad values reach any average or checkpoint
                raise TrainingError(
                    f"loss is {value} at step {t} (epoch {epoch + 1}) on worker {k}; {last_good(ckpt_root)}"
                )
            loss.backward()
            sums[0] += value * len(y)
            sums[1] += (logits.argmax(1) == y).sum().item()
            sums[2] += len(y)
        engine.step()
        engine.zero_grad()
        progress.update(postfix=f"epoch {epoch + 1} lr {lr:.3g} loss {sums[0] / sums[2]:.3f}")

        last_of_epoch = i == plan.steps_per_epoch - 1 or t == plan.total_steps - 1
        if not last_of_epoch:
            continue
        done_epochs = (t + 1) / plan.steps_per_epoch
        loss_sum, correct, seen = runtime.all_sum(sums)
        sums = [0.0, 0.0, 0.0]
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
            if runtime.distributed:  # each rank evaluates its share of the test set
                part = slice(runtime.rank, None, cfg.workers)
                ev = runtime.all_sum(evaluate(averaged, test_x[part], test_y[part], data, cfg.channels_last))
            else:
                ev = evaluate(averaged, test_x, test_y, data, cfg.channels_last)
            row.update(test_loss=ev[0] / ev[2], test_acc=ev[1] / ev[2])
            final = t == plan.total_steps - 1
            if cfg.eval_local == "every" or (cfg.eval_local == "final" and final):
                # each worker's own model on the whole test set, then the mean
                local = [0.0, 0.0, 0.0]
                for _, m in workers:
                    local = [
                        a + b
                        for a, b in zip(
                            local, evaluate(m, test_x, test_y, data, cfg.channels_last), strict=True
                        )
                    ]
                local = runtime.all_sum(local)
                row.update(local_test_loss=local[0] / local[2], local_test_acc=local[1] / local[2])
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
        if main:
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            if writer is not None:
                for key, value in row.items():
                    if isinstance(value, float | int) and key not in ("epoch", "step"):
                        writer.add_scalar(key, value, t + 1)
        if (epoch + 1) % cfg.checkpoint_every == 0 and t + 1 < plan.total_steps:
            check_finite(workers, t, ckpt_root)  # never replace a good checkpoint by a broken one
            state = {
                "config": cfg.to_dict(),
                "engine": engine.state_dict(),
                "generators": {k: g.get_state() for k, g in generators.items()},
                "history": history,
                "eval_seconds": eval_seconds,
                "wall_seconds": time.perf_counter() - start,
            }
            if runtime.distributed:
                state["model"] = model.state_dict()
            digest = checkpoint.write_state(ckpt_root, t + 1, runtime.rank, state)
            digests = [digest]
            if runtime.distributed:  # also waits until every process has written
                digests = [d.decode() for d in engine.comm.all_gather_bytes([digest.encode()])]
            if main:
                checkpoint.commit(ckpt_root, t + 1, digests)
    progress.close()

    # --- final model and summary ---
    check_finite(workers, plan.total_steps - 1, ckpt_root)
    final = averaged if averaged is not None else engine.averaged_model()  # the last step evaluates it
    summary = summarize(cfg, plan, history)
    if main:
        buf = io.BytesIO()
        torch.save({"model": final.state_dict(), "config": cfg.to_dict()}, buf)
        checkpoint.atomic_write_bytes(buf.getvalue(), out / "model.pt")
        write_text(json.dumps(summary, indent=2) + "\n", out / "summary.json")
        if writer is not None:
            writer.close()
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
