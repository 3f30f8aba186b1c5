"""``localsgd plot RUN_DIR...``: compare runs in one PNG (test accuracy vs epochs and vs
communication rounds, training loss, learning rate)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from localsgd.harness.config import ConfigError


def read_run(run: Path) -> tuple[str, list[dict[str, Any]]]:
    metrics = run / "metrics.jsonl"
    if not metrics.is_file():
        raise ConfigError(f"{str(run)!r} is not a run directory (no metrics.jsonl)")
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    if not rows:
        raise ConfigError(f"{str(metrics)!r} holds no epochs yet")
    label = run.name
    config = run / "config.json"
    if config.is_file():
        c = json.loads(config.read_text())
        d = c["config"]
        label = f"{run.name}: K={d['workers']}, H={d['local_steps']}"
        if c["derived"]["switch_step"]:
            label += f", t'={d['switch_epoch']}"
        if d.get("block_steps"):
            label += f", K'={d['workers_per_block']}, H_b={d['block_steps']}"
    return label, rows


def plot_runs(runs: list[Path], out: Path) -> Path:
    """Write the comparison figure to ``out`` and return its path."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("plotting needs matplotlib: pip install 'localsgd[plot]'") from None
    data = [read_run(r) for r in runs]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    (acc_epoch, acc_rounds), (loss_ax, lr_ax) = axes
    for label, rows in data:
        evals = [r for r in rows if "test_acc" in r]
        epochs = [r["epoch"] for r in evals]
        acc = [100 * r["test_acc"] for r in evals]
        (line,) = acc_epoch.plot(epochs, acc, marker=".", label=label)
        if evals and "local_test_acc" in evals[0]:
            local = [100 * r["local_test_acc"] for r in evals]
            acc_epoch.plot(epochs, local, linestyle=":", color=line.get_color())
        acc_rounds.plot([r["rounds"].get("global", 0) for r in evals], acc, marker=".", label=label)
        loss_ax.plot([r["epoch"] for r in rows], [r["train_loss"] for r in rows], label=label)
        lr_ax.plot([r["epoch"] for r in rows], [r["lr"] for r in rows], label=label)
    acc_epoch.set(
        xlabel="epoch",
        ylabel="test accuracy (%)",
        title="averaged model (solid), mean of local models (dotted)",
    )
    acc_rounds.set(
        xlabel="global communication rounds", ylabel="test accuracy (%)", title="accuracy vs communication"
    )
    acc_rounds.set_xscale("symlog")
    loss_ax.set(xlabel="epoch", ylabel="training loss", title="training loss (workers' mini-batches)")
    loss_ax.set_yscale("log")
    lr_ax.set(xlabel="epoch", ylabel="learning rate", title="learning rate (end of epoch)")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    acc_epoch.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
