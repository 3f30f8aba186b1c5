"""The figures: ``localsgd plot RUN_DIR...`` compares runs in one PNG (per kind of run, its
headline metric against epochs or tokens and against communication rounds, training loss,
learning rate); ``plot_study`` draws a study. Every label and scale comes from what the runs'
task measures (``measures.py``)."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from localsgd.harness.config import ConfigError
from localsgd.harness.measures import Measures
from localsgd.harness.rundir import metrics_rows, read_json
from localsgd.harness.tasks import measures_of


def pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("plotting needs matplotlib: pip install 'localsgd[plot]'") from None
    return plt


def save(fig: Any, axes: Any, legend_ax: Any, out: Path) -> Path:
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    legend_ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    pyplot().close(fig)
    return out


def read_run(run: Path, name: str | None = None) -> tuple[str, list[dict[str, Any]], Measures]:
    """A run's legend label (``name``, default the folder's), metrics rows and what its task
    measures."""
    metrics = run / "metrics.jsonl"
    if not metrics.is_file():
        raise ConfigError(f"{str(run)!r} is not a run directory (no metrics.jsonl)")
    rows = metrics_rows(run)
    if not rows:
        raise ConfigError(f"{str(metrics)!r} holds no epochs yet")
    config = run / "config.json"
    if not config.is_file():
        raise ConfigError(f"{str(run)!r} is not a run directory (no config.json)")
    c = read_json(config)
    try:
        d = c["config"]
        label = f"{name or run.name}: K={d['workers']}, H={d['local_steps']}"
        if c["derived"]["switch_step"]:
            label += f", t'={d['switch_epoch']}"
        if d.get("block_steps"):
            label += f", K'={d['workers_per_block']}, H_b={d['block_steps']}"
        measures = measures_of(d["dataset"])
    except (KeyError, TypeError, AttributeError) as e:
        raise ConfigError(f"{config}: not a run's config.json ({type(e).__name__}: {e})") from None
    return label, rows, measures


def plot_runs(runs: list[Path], out: Path) -> Path:
    """Write the comparison figure to ``out`` and return its path: per kind of run (image, text),
    four panels: the task's headline metric (test accuracy, validation bits per byte) against its
    x axis (epochs, tokens) and against global rounds, the training loss and the learning rate."""
    names = [r.name for r in runs]
    if len(set(names)) < len(names):  # e.g. seed-1 of two studies: name their folders too
        names = [f"{r.parent.name}/{r.name}" for r in runs]
    data = [read_run(r, n) for r, n in zip(runs, names, strict=True)]
    kinds = {m.kind: m for _, _, m in data}  # in the order the runs name them
    plt = pyplot()
    fig, axes = plt.subplots(2 * len(kinds), 2, figsize=(12, 8 * len(kinds)), squeeze=False)
    for i, measures in enumerate(kinds.values()):
        group = [(label, rows) for label, rows, m in data if m.kind == measures.kind]
        _draw_runs(axes[2 * i : 2 * i + 2], group, measures)
    return save(fig, axes, axes[0][0], out)


def _draw_runs(axes: Any, data: list[tuple[str, list[dict[str, Any]]]], measures: Measures) -> None:
    (by_x, by_rounds), (loss_ax, lr_ax) = axes
    key, ylabel, scale, xkey = measures.curve, measures.label, measures.headline.scale, measures.x
    for label, rows in data:
        evals = [r for r in rows if key in r]
        xs = [r[xkey] for r in evals]
        values = [scale * r[key] for r in evals]
        (line,) = by_x.plot(xs, values, marker=".", label=label)
        if evals and f"local_{key}" in evals[0]:
            local = [scale * r[f"local_{key}"] for r in evals]
            by_x.plot(xs, local, linestyle=":", color=line.get_color())
        by_rounds.plot([r["rounds"].get("global", 0) for r in evals], values, marker=".", label=label)
        loss_ax.plot([r[xkey] for r in rows], [r["train_loss"] for r in rows], label=label)
        lr_ax.plot([r[xkey] for r in rows], [r["lr"] for r in rows], label=label)
    xlabel = measures.x_label
    by_x.set(xlabel=xlabel, ylabel=ylabel, title="averaged model (solid), mean of local models (dotted)")
    by_x.legend(fontsize=8)
    by_rounds.set(xlabel="global communication rounds", ylabel=ylabel, title=f"{ylabel} vs communication")
    by_rounds.set_xscale("symlog")
    loss_ax.set(xlabel=xlabel, ylabel="training loss", title="training loss (workers' mini-batches)")
    loss_ax.set_yscale("log")
    lr_ax.set(xlabel=xlabel, ylabel="learning rate", title="learning rate (end of each row)")


def _dots(
    ax: Any,
    groups: list[tuple[str, list[float], tuple[float, float] | None]],
    clip_below: float | None,
    colors: dict[str, str],
) -> None:
    """Per group: every seed's value (dots) and mean ± half-width (error bar); values below
    ``clip_below`` are drawn at it as a triangle with their value written next to them, so one
    far-off method does not flatten the others."""
    for i, (name, values, bar) in enumerate(groups):
        color = colors[name]
        kept = [v for v in values if clip_below is None or v >= clip_below]
        clipped = [v for v in values if clip_below is not None and v < clip_below]
        ax.scatter([i] * len(kept), kept, color=color, s=14)
        if clipped:
            ax.scatter([i], [clip_below], color=color, marker="v", s=30)
            text = ", ".join(f"{v:.1f}" for v in clipped)
            ax.annotate(text, (i, clip_below), textcoords="offset points", xytext=(6, 2), fontsize=7)
        if bar is not None and (clip_below is None or bar[0] >= clip_below):
            ax.errorbar([i + 0.15], [bar[0]], yerr=[bar[1]], fmt="o", color=color, capsize=4)
    ax.set_xticks(range(len(groups)), [g[0] for g in groups], rotation=20, fontsize=8)


def _floor(values: list[float], spread: float) -> float | None:
    """A lower axis limit that keeps values within ``spread`` of the median (None: nothing to clip)."""
    if not values:
        return None
    mid = statistics.median(values)
    kept = [v for v in values if v >= mid - spread]
    return None if len(kept) == len(values) else min(kept) - 0.1 * spread


def plot_study(
    rows: list[dict[str, Any]],
    runs: dict[str, list[Path]],
    out: Path,
    comparisons: list[dict[str, Any]] | None,
    measures: Measures,
) -> Path:
    """A study in one PNG: per method, the mean over seeds (band: min to max) of the headline metric
    (image studies: test accuracy; text: validation bits per byte) vs epochs or tokens and vs global
    rounds, and training loss; every seed's final value with the mean ± std; every seed's
    difference to the baseline with the mean and its 95% interval; and (images) the top Hessian
    eigenvalue per seed with the mean ± std. ``measures``: what the study's runs measure."""
    key, x, scale, label = measures.curve, measures.x, measures.headline.scale, measures.label
    xlabel = measures.x_label
    plt = pyplot()
    fig, axes = plt.subplots(2, 3, figsize=(19, 9))
    (by_x, by_rounds, loss_ax), (final_ax, diff_ax, eig_ax) = axes
    for i, (method, dirs) in enumerate(runs.items()):
        curves = [read_run(d)[1] for d in dirs if (d / "summary.json").is_file()]
        if not curves:
            continue
        color = f"C{i}"
        evals = [[r for r in rows_ if key in r] for rows_ in curves]
        n = min(len(e) for e in evals)
        xs = [r[x] for r in evals[0][:n]]
        values = [[scale * e[j][key] for e in evals] for j in range(n)]
        mean = [sum(a) / len(a) for a in values]
        by_x.plot(xs, mean, color=color, label=f"{method} ({len(curves)} seeds)")
        by_x.fill_between(xs, [min(a) for a in values], [max(a) for a in values], color=color, alpha=0.2)
        by_rounds.plot([evals[0][j]["rounds"].get("global", 0) for j in range(n)], mean, color=color)
        m = min(len(c) for c in curves)
        loss = [sum(c[j]["train_loss"] for c in curves) / len(curves) for j in range(m)]
        loss_ax.plot([curves[0][j][x] for j in range(m)], loss, color=color)

    def scaled(pair: tuple[float, float] | None, f: float) -> tuple[float, float] | None:
        return None if pair is None else (f * pair[0], f * pair[1])

    by_method = {r["method"]: r for r in rows}
    head = measures.final
    finals = [
        (m, [scale * d[head] for d in by_method[m]["runs"]], scaled(by_method[m][head], scale)) for m in runs
    ]
    colors = {m: f"C{i}" for i, m in enumerate(runs)}
    # a percentage: one far-off method does not flatten the others
    spread = 5.0 if measures.headline.unit == "%" else None
    _dots(
        final_ax,
        finals,
        None if spread is None else _floor([v for _, vs, _ in finals for v in vs], spread),
        colors,
    )
    measured = any(d.get("eigenvalue") is not None for r in rows for d in r["runs"])
    if x == "epoch" and measured:
        eigen = [
            (m, [d["eigenvalue"] for d in by_method[m]["runs"] if d.get("eigenvalue") is not None],
             by_method[m]["eigenvalue"])
            for m in runs
        ]  # fmt: skip
        _dots(eig_ax, eigen, None, colors)
        eig_ax.set(
            ylabel="top Hessian eigenvalue", title="sharpness at the final model: each seed, mean ± std"
        )
    else:  # no sharpness measured (or a text study)
        eig_ax.set_visible(False)
    paired = [c for c in comparisons or [] if c["metric"] == head]
    if paired:
        diffs = [
            (c["method"], [scale * d for d in c["differences"]],
             None if c["ci95"] is None else (scale * c["mean"], scale * (c["ci95"][1] - c["mean"])))
            for c in paired
        ]  # fmt: skip
        percent = measures.headline.unit == "%"
        floor = _floor([v for _, vs, _ in diffs for v in vs], 3.0) if percent else None
        _dots(diff_ax, diffs, floor, colors)
        diff_ax.axhline(0, color="gray", lw=1)
        final_name = f"final {measures.split_label} {measures.headline.label}"
        baselines = " or ".join(dict.fromkeys(c["baseline"] for c in paired))
        diff_ax.set(
            ylabel="points" if percent else measures.headline.label,
            title=f"{final_name} minus {baselines}, same seed; mean ± 95% CI",
        )
    by_x.set(xlabel=xlabel, ylabel=label, title="averaged model: mean over seeds, band min-max")
    by_rounds.set(xlabel="global communication rounds", ylabel=label, title=f"{label} vs communication")
    by_rounds.set_xscale("log")
    loss_ax.set(xlabel=xlabel, ylabel="training loss", title="training loss (mean over seeds)")
    loss_ax.set_yscale("log")
    final_ax.set(ylabel=f"final {label}", title="final value: each seed (dots), mean ± std")
    return save(fig, axes, by_x, out)
