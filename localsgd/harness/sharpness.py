"""How flat is the minimum a run ended in?

* ``top_eigenvalue``: the dominant eigenvalue of the Hessian of the training loss, by power iteration
  with Hessian-vector products (double backward), on a fixed set of batches with BatchNorm in eval mode,
  so the loss is a fixed function of the parameters.
* ``interpolate``: loss and accuracy along the line ``(1 - alpha) * theta_A + alpha * theta_B`` between
  two runs' final models, with BatchNorm statistics re-estimated at every point (on the training
  subset with the training augmentation, which is what BatchNorm saw during training).

``localsgd sharpness RUN_DIR...`` and ``localsgd interpolate RUN_A RUN_B`` wrap them for run
directories; the loss is the training cross-entropy without weight decay, on un-augmented images.
"""

from __future__ import annotations

import copy
import json
import math
import pickle
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from localsgd.engine import first_line
from localsgd.harness.config import Config, ConfigError, from_mapping
from localsgd.harness.data import MEAN_STD, Dataset, augment, default_data_dir, load_dataset, normalize
from localsgd.harness.models import build_model
from localsgd.harness.plot import pyplot
from localsgd.harness.rundir import read_json, write_text

Batches = Sequence[tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Eigen:
    """Result of ``top_eigenvalue``."""

    eigenvalue: float
    iterations: int
    relative_change: float  # |lambda_k - lambda_{k-1}| / |lambda_k| at the last iteration
    converged: bool
    tol: float
    samples: int


def check_iteration(tol: float, max_iters: int) -> None:
    if not tol > 0:
        raise ConfigError(f"tol must be > 0, got {tol}")
    if max_iters < 1:
        raise ConfigError(f"max_iters must be >= 1, got {max_iters}")


def _mean_loss_hvp(model: nn.Module, params: list[torch.Tensor], batches: Batches, v: list[torch.Tensor]):
    """H v for the mean loss over all samples in ``batches`` (accumulated batch by batch)."""
    total = sum(len(y) for _, y in batches)
    out = [torch.zeros_like(p) for p in params]
    for x, y in batches:
        loss = F.cross_entropy(model(x), y) * (len(y) / total)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        dot = sum((g * u).sum() for g, u in zip(grads, v, strict=True))
        for o, h in zip(out, torch.autograd.grad(dot, params), strict=True):
            o.add_(h)
    return out


def top_eigenvalue(
    model: nn.Module, batches: Batches, tol: float = 1e-3, max_iters: int = 100, seed: int = 0
) -> Eigen:
    """Dominant (largest-magnitude) Hessian eigenvalue of the mean cross-entropy over ``batches``.

    Power iteration from a seeded random direction; stops when the eigenvalue estimate changes by at
    most ``tol`` relative to itself. The model is put in eval mode (BN uses its running statistics).
    """
    check_iteration(tol, max_iters)
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(seed)
    v = [torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device) for p in params]
    norm = math.sqrt(sum(float((u * u).sum()) for u in v))
    v = [u / norm for u in v]
    eigenvalue, change = math.nan, math.inf
    for k in range(1, max_iters + 1):
        hv = _mean_loss_hvp(model, params, batches, v)
        new = sum(float((h * u).sum()) for h, u in zip(hv, v, strict=True))  # Rayleigh quotient
        norm = math.sqrt(sum(float((h * h).sum()) for h in hv))
        if norm == 0:
            return Eigen(0.0, k, 0.0, True, tol, sum(len(y) for _, y in batches))
        v = [h / norm for h in hv]
        change = abs(new - eigenvalue) / max(abs(new), 1e-12) if k > 1 else math.inf
        eigenvalue = new
        if change <= tol:
            break
    return Eigen(eigenvalue, k, change, change <= tol, tol, sum(len(y) for _, y in batches))


@torch.no_grad()
def reestimate_bn(model: nn.Module, batches: Batches) -> None:
    """Replace every BatchNorm's running statistics by their exact average over ``batches``."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average = plain mean over the batches
    model.train()
    for x, _ in batches:
        model(x)
    for m, momentum in zip(norms, saved, strict=True):
        m.momentum = momentum
    model.eval()


@torch.no_grad()
def loss_acc(model: nn.Module, batches: Batches) -> tuple[float, float]:
    model.eval()
    loss = correct = seen = 0.0
    for x, y in batches:
        out = model(x)
        loss += float(F.cross_entropy(out, y, reduction="sum"))
        correct += float((out.argmax(1) == y).sum())
        seen += len(y)
    return loss / seen, correct / seen


def interpolate(
    model_a: nn.Module,
    model_b: nn.Module,
    alphas: Sequence[float],
    train: Batches,
    test: Batches,
    bn: Batches | None = None,
) -> list[dict[str, float]]:
    """Loss and accuracy of ``(1 - alpha) * A + alpha * B`` for each alpha, on ``train`` and ``test``.

    Parameters are interpolated; BN running statistics are re-estimated at every point on ``bn``
    (default ``train``), since interpolated statistics do not belong to the interpolated weights.
    """
    probe = copy.deepcopy(model_a)
    pa, pb = dict(model_a.named_parameters()), dict(model_b.named_parameters())
    rows = []
    for alpha in alphas:
        with torch.no_grad():
            for name, p in probe.named_parameters():
                p.copy_(pa[name].lerp(pb[name], alpha))
        reestimate_bn(probe, train if bn is None else bn)
        train_loss, train_acc = loss_acc(probe, train)
        test_loss, test_acc = loss_acc(probe, test)
        rows.append(
            {
                "alpha": alpha,
                "train_loss": train_loss,
                "train_acc": train_acc,
                "test_loss": test_loss,
                "test_acc": test_acc,
            }
        )
    return rows


# --- run directories -----------------------------------------------------------------------------------


def load_run(run: Path, path: Path | None = None) -> tuple[Config, nn.Module]:
    """The config and a model of a finished run directory: its final averaged model, or ``path``
    (one of the models ``save_models_at`` kept)."""
    path = run / "model.pt" if path is None else path
    if not path.is_file():
        raise ConfigError(f"{str(run)!r} has no model.pt (not a run directory, or the run is not finished)")
    try:
        saved = torch.load(path, weights_only=True)
        cfg = from_mapping(saved["config"], str(path))
        if cfg.dataset == "text":
            raise ConfigError(
                f"{str(run)!r} is a text run; sharpness and interpolation measure image runs only"
            )
        classes = saved["model"]["head.fc.weight"].shape[0]
        model = build_model(cfg.model, classes, in_channels=len(MEAN_STD[cfg.dataset][0]))
        model.load_state_dict(saved["model"])
    except (RuntimeError, KeyError, TypeError, EOFError, pickle.UnpicklingError) as e:
        raise ConfigError(f"cannot load {str(path)!r}: {first_line(e)}") from None
    return cfg, model


def measured_models(run: Path) -> list[tuple[Path, Path]]:
    """(model file, its sharpness JSON) for the models ``save_models_at`` kept, by epoch, then the
    final one."""
    kept = sorted((run / "models").glob("epoch-*.pt"), key=lambda p: float(p.stem.removeprefix("epoch-")))
    return [(p, p.with_suffix(".json")) for p in kept] + [(run / "model.pt", run / "sharpness.json")]


def _batches(x: torch.Tensor, y: torch.Tensor, data: Dataset, batch: int) -> Batches:
    return [
        (normalize(x[i : i + batch], data.mean, data.std), y[i : i + batch]) for i in range(0, len(x), batch)
    ]


def _train_subset(data: Dataset, samples: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    if not 0 < samples <= len(data.train_x):
        raise ConfigError(f"samples must be in 1..{len(data.train_x)}, got {samples}")
    idx = torch.randperm(len(data.train_x), generator=torch.Generator().manual_seed(seed))[:samples]
    return data.train_x[idx], data.train_y[idx]


def train_probe(cfg: Config, data: Dataset, samples: int, seed: int, batch: int = 512) -> Batches:
    """A fixed random subset of ``samples`` training images (no augmentation), in batches."""
    return _batches(*_train_subset(data, samples, seed), data, batch)


def augmented_probe(data: Dataset, samples: int, seed: int, batch: int = 512) -> Batches:
    """The same subset with the training augmentation (seeded): what BatchNorm saw in training."""
    x, y = _train_subset(data, samples, seed)
    gen = torch.Generator().manual_seed(seed)
    return [
        (augment(x[i : i + batch], gen, data.mean, data.std), y[i : i + batch])
        for i in range(0, len(x), batch)
    ]


def _data(cfg: Config, data_dir: str | None) -> Dataset:
    return load_dataset(cfg.dataset, data_dir or cfg.data_dir or default_data_dir(cfg.dataset))


def sharpness(
    run: Path,
    data_dir: str | None,
    samples: int,
    tol: float,
    max_iters: int,
    seed: int,
    skip_measured: bool = False,
) -> list[dict[str, Any]]:
    """Top Hessian eigenvalue, loss and accuracy on the same clean training subset, of every model
    ``run`` kept (``save_models_at``) and of its final model; each written beside its model file
    (``models/epoch-E.json``, ``sharpness.json``). ``skip_measured``: keep the results already
    written with the same ``samples``, ``tol``, ``max_iters`` and ``seed``."""
    check_iteration(tol, max_iters)
    cfg, _ = load_run(run)
    data = _data(cfg, data_dir)
    batches = train_probe(cfg, data, samples, seed)
    results = []
    for path, out in measured_models(run):
        setting = {"samples": samples, "tol": tol, "seed": seed}
        if skip_measured and out.is_file():
            old = read_json(out)
            if {k: old.get(k) for k in setting} == setting and old.get("max_iters") == max_iters:
                results.append(old)
                continue
        _, model = load_run(run, path)
        eig = top_eigenvalue(model, batches, tol, max_iters, seed)
        train_loss, train_acc = loss_acc(model, batches)
        result = {
            "run": str(run),
            "model": str(path.relative_to(run)),
            **asdict(eig),
            "max_iters": max_iters,
            "seed": seed,
            "train_loss": train_loss,
            "train_acc": train_acc,
        }
        write_text(json.dumps(result, indent=2) + "\n", out)
        results.append(result)
    return results


def interpolate_runs(
    run_a: Path, run_b: Path, data_dir: str | None, alphas: Sequence[float], samples: int, seed: int
) -> list[dict[str, float]]:
    cfg_a, model_a = load_run(run_a)
    cfg_b, model_b = load_run(run_b)
    if (cfg_a.dataset, cfg_a.model) != (cfg_b.dataset, cfg_b.model):
        raise ConfigError(
            f"runs differ in dataset/model: {cfg_a.dataset}/{cfg_a.model} vs {cfg_b.dataset}/{cfg_b.model}"
        )
    data = _data(cfg_a, data_dir)
    train = train_probe(cfg_a, data, samples, seed)
    test = _batches(data.test_x, data.test_y, data, 1000)
    return interpolate(model_a, model_b, alphas, train, test, bn=augmented_probe(data, samples, seed))


def plot_interpolation(rows: list[dict[str, float]], labels: tuple[str, str], out: Path) -> Path:
    plt = pyplot()
    alpha = [r["alpha"] for r in rows]
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for split, style in (("train", "-"), ("test", "--")):
        loss_ax.plot(alpha, [r[f"{split}_loss"] for r in rows], style, marker=".", label=split)
        acc_ax.plot(alpha, [100 * r[f"{split}_acc"] for r in rows], style, marker=".", label=split)
    for ax, what in ((loss_ax, "loss"), (acc_ax, "accuracy (%)")):
        ax.set(xlabel=f"alpha  (0 = {labels[0]}, 1 = {labels[1]})", ylabel=what)
        ax.axvline(0, color="grey", lw=0.5)
        ax.axvline(1, color="grey", lw=0.5)
        ax.legend()
    loss_ax.set_yscale("log")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
