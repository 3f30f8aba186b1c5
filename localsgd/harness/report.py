"""What the commands report, read from what each task measures (``measures.py``): a run's rows and
result lines, a study's summary (``study.json``), its table and its paired comparisons."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from localsgd.harness.measures import Measures
from localsgd.harness.rundir import metrics_rows, read_json
from localsgd.harness.stats import compare, mean_std
from localsgd.harness.studies import get, run_dir
from localsgd.harness.tables import Column, plus_minus, render

# --- one run ----------------------------------------------------------------------------------


def rows_table(history: list[dict[str, Any]], measures: Measures) -> str:
    """A run's evaluated rows: its headline metric (images: accuracies; text: bits per byte) on the
    training batches, the evaluation split and the mean of the local models, and the rounds."""
    metric, split = measures.headline, measures.split
    name = metric.name

    def value(key: str) -> Any:
        return lambda r: metric.cell(r[key]) if key in r else "-"

    columns = [
        Column("epoch", 6, lambda r: f"{r['epoch']:g}"),
        Column("lr", 8, lambda r: f"{r['lr']:.4f}"),
        Column("train loss", 10, lambda r: f"{r['train_loss']:.4f}" if "train_loss" in r else "-"),
        Column(f"train {name}", 9, value(f"train_{name}")),
        Column(f"{split} {name}", 9, value(measures.curve)),
        Column(f"local {name}", 9, value(f"local_{measures.curve}")),
        Column("rounds", 14, lambda r: "/".join(str(n) for n in r["rounds"].values())),
    ]
    return render(columns, [r for r in history if f"{split}_loss" in r])


def result_lines(summary: dict[str, Any], measures: Measures) -> list[str]:
    """A finished run in a few lines: its headline numbers, rounds and time."""
    s, m = summary, measures.headline
    if measures.kind == "text":
        line = (
            f"final validation loss (averaged model) {m.show(s[measures.final])} bits per byte, best "
            f"{m.show(s['best_' + measures.curve])}; unigram entropy of the training bytes "
            f"{s['unigram_bits_per_byte']:.4f}; {s['tokens_per_second']:,.0f} tokens/s"
        )
    else:
        line = f"final test accuracy (averaged model) {m.cell(s[measures.final])}"
        line += f", best {m.cell(s['best_' + measures.curve])}"
        if f"final_local_{measures.curve}" in s:
            line += f"; mean of local models {m.cell(s[f'final_local_{measures.curve}'])}"
    rounds = ", ".join(f"{level} {n}" for level, n in s["rounds"].items())
    return [
        line,
        f"rounds: {rounds}; wall {s['wall_seconds']:.0f} s (communication {s['comm_seconds']:.1f} s)",
    ]


# --- a study ----------------------------------------------------------------------------------


def run_record(run: Path, seed: int, metrics: tuple[str, ...]) -> dict[str, Any]:
    """One finished run: its summary's ``metrics``, the rounds after the first LR decay (the local
    phase of post-local SGD, counted from the metrics, not computed), and its top Hessian
    eigenvalue if measured."""
    summary = read_json(run / "summary.json")
    config = read_json(run / "config.json")["config"]
    record: dict[str, Any] = {"seed": seed, **{k: summary.get(k) for k in metrics if k in summary}}
    record.update(rounds=summary["rounds"], bytes=summary["bytes"])
    rows = metrics_rows(run)
    step_decays = config.get("lr_schedule", "step") == "step" and config["decay_at"]
    first_decay = config["decay_at"][0] * config["epochs"] if step_decays else None
    at = [r for r in rows if first_decay is not None and abs(r["epoch"] - first_decay) < 1e-6]
    if at:
        record["rounds_after_first_decay"] = {
            level: n - at[0]["rounds"].get(level, 0) for level, n in summary["rounds"].items()
        }
    if (run / "sharpness.json").is_file():
        record["eigenvalue"] = read_json(run / "sharpness.json")["eigenvalue"]
    return record


def summarize(name: str, root: Path) -> list[dict[str, Any]]:
    """Per method: every finished seed's record, and mean and standard deviation over seeds; the
    rows and their comparisons with the study's baseline are also written to ``root/study.json``."""
    study = get(name)
    metrics = tuple(study.measures.study)
    rows = []
    for method in study.methods:
        runs = [(s, run_dir(root, method, s)) for s in study.seeds]
        done = [run_record(run, s, metrics) for s, run in runs if (run / "summary.json").is_file()]
        row: dict[str, Any] = {"method": method, "seeds_done": len(done), "seeds": len(study.seeds)}
        for key in metrics:
            row[key] = mean_std([d[key] for d in done if d.get(key) is not None])
        row["gigabytes"] = [sum(d["bytes"].values()) / 1e9 for d in done]
        row["global_rounds"] = [d["rounds"].get("global", 0) for d in done]
        row["block_rounds"] = [d["rounds"].get("block", 0) for d in done]
        row["global_rounds_after_first_decay"] = [
            d["rounds_after_first_decay"].get("global", 0) for d in done if "rounds_after_first_decay" in d
        ]
        row["runs"] = done
        rows.append(row)
    root.mkdir(parents=True, exist_ok=True)
    result = {
        "study": name,
        "rows": rows,
        "comparisons": compare(rows, study.baseline, study.measures.compared, study.versus),
    }
    (root / "study.json").write_text(json.dumps(result, indent=1) + "\n")
    return rows


def _counts(values: list[int]) -> str:
    return "/".join(str(n) for n in sorted(set(values))) or "-"


def _gigabytes(values: list[float]) -> str:
    return "/".join(f"{v:.2f}" for v in sorted(set(values))) or "-"


def study_table(rows: list[dict[str, Any]], measures: Measures) -> str:
    """A study's rows: per method, the mean ± std over seeds of what its task measures, and what it
    communicated (each count that occurred, seeds alike or not)."""

    def collected(title: str, key: str, width: int) -> Column:
        return Column(title, width, lambda r: plus_minus(r[key], measures.study[key]))

    communication = [
        Column("global rounds", 13, lambda r: _counts(r["global_rounds"])),
        *([Column("after decay", 11, lambda r: _counts(r["global_rounds_after_first_decay"]))]
          if measures.after_decay else []),
        Column("block rounds", 12, lambda r: _counts(r["block_rounds"])),
        Column("GB/worker", 10, lambda r: _gigabytes(r["gigabytes"])),
    ]  # fmt: skip
    columns = [
        Column("method", 18, lambda r: r["method"], left=True),
        Column("seeds", 5, lambda r: f"{r['seeds_done']:>2}/{r['seeds']:<2}"),
        *(collected(*c) for c in measures.leading),
        *communication,
        *(collected(*c) for c in measures.trailing),
    ]
    return render(columns, rows)


def comparison_table(comparisons: list[dict[str, Any]], measures: Measures) -> str:
    """The paired comparisons: one line per method and metric ("" if there are none)."""
    if not comparisons:
        return ""

    def diff(c: dict[str, Any]) -> str:
        m = measures.study[c["metric"]]
        std = "" if c["std"] is None else f" ± {m.show(c['std'])}"
        return f"{c['mean'] * m.scale:>+8.{m.digits}f}{std:<9}"

    def interval(c: dict[str, Any]) -> str:
        m = measures.study[c["metric"]]
        if c["ci95"] is None:
            return "-"
        lo, hi = (v * m.scale for v in c["ci95"])
        return f"[{lo:+.{m.digits}f}, {hi:+.{m.digits}f}]"

    def verdict(c: dict[str, Any]) -> str:
        return "-" if c["ci_excludes_zero"] is None else ("yes" if c["ci_excludes_zero"] else "no")

    first = comparisons[0]["baseline"]

    def method(c: dict[str, Any]) -> str:  # a method compared with another than the first's says so
        return c["method"] if c["baseline"] == first else f"{c['method']} vs {c['baseline']}"

    columns = [
        Column(f"vs {first} (paired by seed)", 32, method, left=True),
        Column("metric", 15, lambda c: c["metric"], left=True),
        Column("seeds", 5, lambda c: str(len(c["seeds"]))),
        Column("mean diff ± std", 17, diff),
        Column("95% CI", 18, interval),
        Column("CI excludes 0", 13, verdict),
    ]
    return render(columns, comparisons)


def study_report(name: str, root: Path, rows: list[dict[str, Any]], plot: bool = False) -> str:
    """``localsgd study``'s text: the table, the comparisons with the baseline (if the study has
    one) and, for a study that keeps models along the way, a row per phase length; with ``plot``,
    the figures are written to ``root`` and their paths listed."""
    study = get(name)
    comparisons = compare(rows, study.baseline, study.measures.compared, study.versus)
    parts = [study_table(rows, study.measures)]
    if comparisons:
        parts.append("\n" + comparison_table(comparisons, study.measures))
    if plot:
        from localsgd.harness.plot import plot_study

        runs = {m: [run_dir(root, m, s) for s in study.seeds] for m in study.methods}
        parts.append(str(plot_study(rows, runs, root / "study.png", comparisons, study.measures)))
    if study.kept_models:  # the same runs read at every kept model: a row per phase length
        from localsgd.harness import phases

        points = phases.phase_rows(name, root)
        parts.append("\n" + phases.phase_table(points))
        if plot and points:
            parts.append(str(phases.plot_phases(points, root / "phases.png")))
    return "\n".join(parts)
