"""Measurements along one run: a study whose runs keep their averaged model at some epochs
(``save_models_at``) reads each kept model, and the final one, as the end of a shorter run. After the
first LR decay (t' of post-local SGD) the LR stays put, so the model at epoch t' + P is what a run
with a phase of P epochs at the decayed LR ends in: one run per seed gives every phase length.

Per phase length and method: test accuracy of the averaged model (from ``metrics.jsonl``), and its
mean over the ``WINDOW`` epochs up to the point (at a constant LR the test accuracy moves from epoch to
epoch; the mean over a few epochs is the steadier reading of the same run), loss and accuracy on the
clean training subset and top Hessian eigenvalue (from ``localsgd sharpness``:
``models/epoch-E.json`` and ``sharpness.json``), and every method against the study's baseline,
paired by seed (``stats.compare``).
"""

from __future__ import annotations

import json
from pathlib import Path
from statistics import mean
from typing import Any

from localsgd.harness.measures import ACCURACY, EIGENVALUE, Metric
from localsgd.harness.plot import pyplot, save
from localsgd.harness.rundir import metrics_rows, model_path, read_json
from localsgd.harness.stats import compare, mean_std
from localsgd.harness.studies import Study, get, run_dir
from localsgd.harness.tables import Column, plus_minus, render

METRICS = ("test_acc", "test_acc_window", "train_acc", "train_loss", "eigenvalue")
COMPARED = ("test_acc", "test_acc_window", "train_acc", "eigenvalue")
WINDOW = 4  # epochs: the points of cifar10-long-local are >= 8 epochs apart, so windows never overlap


def phase_start(config: dict[str, Any]) -> float:
    """The epoch the phase lengths count from: the first LR decay (t')."""
    return config["decay_at"][0] * config["epochs"]


def run_points(run: Path, seed: int, window: float = WINDOW) -> list[dict[str, Any]]:
    """One finished run: a point per kept model and the final model whose sharpness was measured;
    ``test_acc_window`` is the mean test accuracy of the rows in the last ``window`` epochs up to it."""
    config = read_json(run / "config.json")["config"]
    rows = metrics_rows(run)
    test_acc = {r["epoch"]: r["test_acc"] for r in rows if "test_acc" in r}
    files = [(e, model_path(run, e).with_suffix(".json")) for e in config["save_models_at"]]
    if rows[-1]["epoch"] not in config["save_models_at"]:  # else the same model, kept and final
        files.append((rows[-1]["epoch"], run / "sharpness.json"))
    points = []
    for epoch, path in files:
        if not path.is_file():
            continue
        measured = read_json(path)
        points.append(
            {
                "seed": seed,
                "epoch": epoch,
                "phase": round(epoch - phase_start(config), 6),
                "test_acc": test_acc[round(epoch, 4)],
                "test_acc_window": mean([a for e, a in test_acc.items() if epoch - window < e <= epoch]),
                "train_acc": measured["train_acc"],
                "train_loss": measured["train_loss"],
                "eigenvalue": measured["eigenvalue"],
            }
        )
    return points


def phase_rows(name: str, root: Path, window: float = WINDOW) -> list[dict[str, Any]]:
    """Per phase length: each method's finished seeds (mean, std per metric), the paired
    comparisons with the study's baseline and the ``window`` of ``test_acc_window`` (so the table and
    the plot label what was computed); also written to ``root/phases.json``."""
    study: Study = get(name)
    points = [
        (method, point)
        for method in study.methods
        for seed in study.seeds
        if (run_dir(root, method, seed) / "summary.json").is_file()
        for point in run_points(run_dir(root, method, seed), seed, window)
    ]
    out = []
    for phase in sorted({p["phase"] for _, p in points}):
        methods = []
        for method in study.methods:
            runs = [p for m, p in points if m == method and p["phase"] == phase]
            row: dict[str, Any] = {"method": method, "seeds_done": len(runs), "runs": runs}
            row.update({key: mean_std([r[key] for r in runs]) for key in METRICS})
            methods.append(row)
        epoch = next(p["epoch"] for _, p in points if p["phase"] == phase)
        comparisons = compare(methods, study.baseline, COMPARED, study.versus)
        out.append(
            {"phase": phase, "epoch": epoch, "window": window, "methods": methods, "comparisons": comparisons}
        )
    root.mkdir(parents=True, exist_ok=True)
    record = {"study": name, "phases": out}
    (root / "phases.json").write_text(json.dumps(record, indent=1) + "\n")
    return out


def _diff(comparisons: list[dict[str, Any]], method: str, key: str, metric: Metric) -> str:
    for c in comparisons:
        if c["method"] == method and c["metric"] == key:
            d, f = metric.digits, metric.scale
            if c["ci95"] is None:
                return f"{c['mean'] * f:+.{d}f}"
            lo, hi = (v * f for v in c["ci95"])
            return f"{c['mean'] * f:+.{d}f} [{lo:+.{d}f}, {hi:+.{d}f}]"
    return "-"


def _window(phases: list[dict[str, Any]]) -> str:
    return f"{phases[0]['window']:g}" if phases else "?"


def phase_table(phases: list[dict[str, Any]]) -> str:
    """One line per phase length and method; the differences are to the baseline, same seed, with
    their 95% intervals (the test accuracy at the point and its mean over the last ``window`` epochs)."""
    window = f"last {_window(phases)} ep."

    def measured(title: str, key: str, width: int, metric: Metric) -> Column:
        return Column(title, width, lambda pr: plus_minus(pr[1][key], metric))

    def diff(title: str, key: str, width: int, metric: Metric) -> Column:
        return Column(title, width, lambda pr: _diff(pr[0]["comparisons"], pr[1]["method"], key, metric))

    columns = [
        Column("phase", 5, lambda pr: f"{pr[0]['phase']:g}"),
        Column("epoch", 5, lambda pr: f"{pr[0]['epoch']:g}"),
        Column("method", 18, lambda pr: pr[1]["method"], left=True),
        Column("seeds", 5, lambda pr: str(pr[1]["seeds_done"])),
        measured("test %", "test_acc", 13, ACCURACY),
        measured(f"test %, {window}", "test_acc_window", 16, ACCURACY),
        measured("clean train %", "train_acc", 13, ACCURACY),
        measured("eigenvalue", "eigenvalue", 12, EIGENVALUE),
        diff("test diff (95% CI)", "test_acc", 24, ACCURACY),
        diff(f"diff, {window} (95% CI)", "test_acc_window", 28, ACCURACY),
        diff("eigenvalue diff (95% CI)", "eigenvalue", 26, EIGENVALUE),
    ]
    return render(columns, [(p, r) for p in phases for r in p["methods"]])


def _draw_differences(
    ax: Any, phases: list[dict[str, Any]], method: str, metric: str, color: str, offset: float
) -> None:
    """``method`` - baseline in ``metric`` per phase length: each seed's difference, shifted right by
    ``offset`` (to stay apart from the other reading), and the mean with its 95% interval, shifted by
    ``offset`` + 0.4; hollow and dashed, its legend entry naming the window, for the windowed mean."""
    paired = [(p["phase"], c) for p in phases for c in p["comparisons"]
              if c["method"] == method and c["metric"] == metric]  # fmt: skip
    window = metric == "test_acc_window"
    face = "white" if window else color
    last = f", last {_window(phases)} epochs" if window else ""
    for x, c in paired:
        ys = [100 * d for d in c["differences"]]
        ax.scatter([x + offset] * len(ys), ys, s=12, edgecolors=color, facecolors=face)
    with_ci = [(x, c) for x, c in paired if c["ci95"] is not None]
    if not with_ci:
        return
    ax.errorbar(
        [x + offset + 0.4 for x, _ in with_ci],
        [100 * c["mean"] for _, c in with_ci],
        yerr=[100 * (c["ci95"][1] - c["mean"]) for _, c in with_ci],
        color=color, marker="o", capsize=4, ls="--" if window else "-", mfc=face,
        label=f"{method} - {with_ci[0][1]['baseline']}{last}",
    )  # fmt: skip


def plot_phases(phases: list[dict[str, Any]], out: Path) -> Path:
    """The paired test-accuracy difference against the phase length (each seed and the mean with its
    95% interval; also for the mean over the last ``window`` epochs), and each method's test accuracy,
    clean training accuracy and eigenvalue."""
    plt = pyplot()
    window = _window(phases)
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    diff_ax, test_ax, train_ax, eig_ax = axes.flat
    lengths = [p["phase"] for p in phases]
    methods = [r["method"] for r in phases[0]["methods"]] if phases else []
    for i, method in enumerate(methods):
        color = f"C{i}"  # by the study's order, so a method keeps its colour when another has no runs
        rows = [next(r for r in p["methods"] if r["method"] == method) for p in phases]
        if not any(r["seeds_done"] for r in rows):
            continue
        for ax, key, scale in (
            (test_ax, "test_acc", 100),
            (train_ax, "train_acc", 100),
            (eig_ax, "eigenvalue", 1),
        ):
            xs = [x for x, r in zip(lengths, rows, strict=True) if r[key] is not None]
            ys = [scale * r[key][0] for r in rows if r[key] is not None]
            err = [scale * r[key][1] for r in rows if r[key] is not None]
            ax.errorbar(xs, ys, yerr=err, color=color, marker="o", capsize=3, label=method)
        done = [(x, r) for x, r in zip(lengths, rows, strict=True) if r["test_acc_window"] is not None]
        windowed = [(x, 100 * r["test_acc_window"][0]) for x, r in done]
        test_ax.plot(*zip(*windowed, strict=True), color=color, ls="--", marker="o", mfc="white")
        _draw_differences(diff_ax, phases, method, "test_acc", color, 0.0)
        _draw_differences(diff_ax, phases, method, "test_acc_window", color, 0.8)
    diff_ax.axhline(0, color="gray", lw=1)
    if diff_ax.get_legend_handles_labels()[0]:
        diff_ax.legend(fontsize=8)
    xlabel = "epochs after the first LR decay (t')"
    diff_ax.set(
        xlabel=xlabel, ylabel="points",
        title="test accuracy - baseline, same seed: seeds, mean ± 95% CI\n"
        f"(hollow: mean of last {window} epochs)",
    )  # fmt: skip
    test_ax.set(
        xlabel=xlabel, ylabel="test accuracy (%)",
        title=f"averaged model: mean ± std over seeds\n(dashed: mean of last {window} epochs)",
    )  # fmt: skip
    train_ax.set(
        xlabel=xlabel, ylabel="training accuracy (%)", title="clean training subset (no augmentation)"
    )
    eig_ax.set(xlabel=xlabel, ylabel="top Hessian eigenvalue", title="sharpness: mean ± std over seeds")
    return save(fig, axes, test_ax, out)
