"""A run's metrics rows: the training sums a row reads (``Tally``), the evaluation of the
averaged and the local models, the checks that nothing non-finite goes on, and the run's summary
from its rows. Every quantity is read from the device once per row, never per step."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from localsgd.harness.measures import ACCURACY, Measures
from localsgd.harness.runtime import Runtime
from localsgd.harness.tasks import Task
from localsgd.sharding import local


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a non-finite loss): one line naming step and worker."""


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
        for name, value in ((n, local(v)) for n, v in m.state_dict().items())
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


def summarize(
    history: list[dict[str, Any]], measures: Measures, schedule: str, local_every: bool
) -> dict[str, Any]:
    """The run's headline numbers from its rows: accuracy on the evaluation split always, and the
    task's own headline (text: bits per byte, with the loss it comes from) where that is another
    metric; ``schedule`` as the run's schedule reads, ``local_every``: the local models were
    evaluated at every evaluation (their best accuracy too)."""
    split, h = measures.split, measures.headline
    evals = [r for r in history if f"{split}_acc" in r]
    last = history[-1]
    summary: dict[str, Any] = {
        "schedule": schedule,
        "epochs": last["epoch"],
        "steps": last["step"],
        "final_train_loss": last.get("train_loss"),
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
    if local_every:
        summary[f"best_local_{split}_acc"] = max(r[f"local_{split}_acc"] for r in evals)
    return summary
