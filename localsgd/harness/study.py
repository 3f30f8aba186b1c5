"""``localsgd study``: a named grid of runs (methods x seeds) as resumable pieces. A finished run is
skipped, an interrupted one resumes from its last checkpoint, so a study can be spread over
several sittings (``--max-hours`` stops starting new runs once the budget is spent)."""

from __future__ import annotations

import json
import math
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from localsgd.harness.config import Config, ConfigError, from_mapping
from localsgd.harness.rundir import check_claim, inspect, metrics_rows, read_json
from localsgd.harness.tasks import sampling


@dataclass(frozen=True)
class Measures:
    """What a study of one kind of task collects per run (each a mean ± std over seeds), compares
    with its baseline seed by seed, and shows first."""

    metrics: tuple[str, ...]
    compared: tuple[str, ...]
    headline: str  # the final metric of the table's first column and the figure's panels
    curve: str  # its key in metrics.jsonl rows
    x: str  # the rows' x axis: epoch or tokens
    label: str
    scale: float  # shown as value * scale (100: percent points)
    digits: int


MEASURES = {
    "image": Measures(
        metrics=(
            "final_test_acc",
            "best_test_acc",
            "final_local_test_acc",
            "final_train_loss",
            "wall_seconds",
            "eigenvalue",
        ),
        compared=("final_test_acc", "best_test_acc", "eigenvalue"),
        headline="final_test_acc",
        curve="test_acc",
        x="epoch",
        label="test accuracy (%)",
        scale=100,
        digits=2,
    ),
    "text": Measures(
        metrics=(
            "final_valid_bpb",
            "best_valid_bpb",
            "final_local_valid_bpb",
            "final_valid_loss",
            "final_train_loss",
            "wall_seconds",
            "tokens_per_second",
        ),
        compared=("final_valid_bpb", "best_valid_bpb"),
        headline="final_valid_bpb",
        curve="valid_bpb",
        x="tokens",
        label="validation bits per byte",
        scale=1,
        digits=4,
    ),
}


@dataclass(frozen=True)
class Study:
    """``base`` settings for every run; ``methods`` name the settings that differ."""

    base: dict[str, Any]
    methods: dict[str, dict[str, Any]]
    seeds: tuple[int, ...] = (1, 2, 3)
    notes: str = ""
    baseline: str | None = None  # the method every other one is compared with, seed by seed
    sharpness_samples: int | None = None  # measure every run's models on this many training images

    @property
    def kept_models(self) -> bool:
        """Whether the runs keep models along the way (``save_models_at``): a phase study."""
        return bool(self.base.get("save_models_at"))

    @property
    def kind(self) -> str:
        """image or text: what the study's runs measure (``MEASURES``)."""
        return "text" if self.base.get("dataset") == "text" else "image"

    @property
    def measures(self) -> Measures:
        return MEASURES[self.kind]

    def config(self, method: str, seed: int, data_dir: str | None, threads: int | None = None) -> Config:
        values = {**self.base, **self.methods[method], "seed": seed, "resume": True}
        if data_dir is not None:
            values["data_dir"] = data_dir
        if threads is not None:  # run control, like data_dir: a finished piece is reused either way
            values["threads"] = threads
        return from_mapping(values, f"study method {method!r}")


# cifar10-resnet8's protocol, shared by the studies built on it (docs/results/cifar10-resnet8.md).
RESNET8_PROTOCOL: dict[str, Any] = {
    "dataset": "cifar10",
    "model": "resnet8",
    "workers": 16,
    "local_batch_size": 32,
    "epochs": 16,
    "warmup_epochs": 2,
    "decay_at": [0.5, 0.75],
    "eval_local": "final",
    "progress": False,
}

STUDIES: dict[str, Study] = {
    # A seconds-long study that exercises the machinery (tests, first use on a new machine).
    "smoke": Study(
        base={
            "dataset": "cifar10",
            "model": "resnet20",
            "train_subset": 256,
            "test_subset": 200,
            "workers": 2,
            "local_batch_size": 16,
            "epochs": 2,
            "warmup_epochs": 0.5,
            "eval_local": "never",
            "progress": False,
        },
        methods={"mini-batch": {"local_steps": 1}, "post-local H=4": {"local_steps": 4, "switch_epoch": 1}},
        seeds=(1, 2),
        baseline="mini-batch",
    ),
    # The same for the text task: a GPT of 2 x 32 on windows of 32 bytes, 20 steps per run.
    "smoke-text": Study(
        base={
            "dataset": "text",
            "model": "gpt",
            "width": 32,
            "depth": 2,
            "heads": 2,
            "seq_len": 32,
            "workers": 2,
            "local_batch_size": 4,
            "epochs": 20 / 39_013,  # steps per epoch: (9,987,579 - 32) // (2 * 4) // 32
            "optimizer": "adamw",
            "peak_lr": 0.01,
            "lr_schedule": "cosine",
            "warmup_epochs": 0.0,
            "test_subset": 64,
            "row_steps": 10,
            "eval_local": "final",
            "progress": False,
        },
        methods={"mini-batch": {"local_steps": 1}, "local H=4": {"local_steps": 4}},
        seeds=(1, 2),
        baseline="mini-batch",
    ),
    # The scaled reproduction of the paper's CIFAR-10 comparison (docs/results/cifar10-resnet8.md says
    # why each number was chosen and what the pilot showed).
    "cifar10-resnet8": Study(
        base=RESNET8_PROTOCOL,
        methods={
            "small-batch": {"workers": 4},
            "large-batch": {},
            "local H=16": {"local_steps": 16},
            "post-local H=16": {"local_steps": 16, "switch_epoch": "first-decay"},
            "post-local H=32": {"local_steps": 32, "switch_epoch": "first-decay"},
            "hierarchical": {
                "workers_per_block": 4,
                "local_steps": 4,
                "block_steps": 4,
                "switch_epoch": "first-decay",
            },
        },
        notes="ResNet-8 on CIFAR-10, K=16 workers x B_loc=32 (global batch 512; small-batch: K=4, 128), "
        "16 epochs, paper LR rule (0.1 per 64 samples, linear warm-up from 0.1 over 2 epochs, x0.1 at "
        "epochs 8 and 12), switch t' at the first decay; hierarchical: K'=4, H=4, H_b=4.",
        baseline="large-batch",
    ),
    # Language modelling at equal tokens (issue: the paper's second task): the sotu-gpt demo's
    # GPT and AdamW recipe at K = 8, B_loc = 8 (8,192 tokens per step, as the demo), 1.5 epochs of
    # the SOTU training split (1,828 steps, 15M tokens), a row and an evaluation every 64 steps.
    # Pilot (128 steps of local H=16 at K = 8 on the AVX-512 VM, alone): 15,900-17,100 tokens/s,
    # 1.3 s per evaluation of the 512 validation windows, 11 s for the final one of the 8 local
    # models: about 16 minutes a run, 4 hours for the 15 runs, within the 5 CPU-hour budget.
    "sotu-lm": Study(
        base={
            "dataset": "text",
            "model": "gpt",
            "seq_len": 128,
            "workers": 8,
            "local_batch_size": 8,
            "epochs": 1.5,
            "optimizer": "adamw",
            "peak_lr": 3e-3,
            "weight_decay": 0.1,
            "lr_schedule": "cosine",
            "warmup_epochs": 0.05,
            "test_subset": 512,
            "row_steps": 64,
            "eval_local": "final",
            "progress": False,
        },
        methods={
            "H=1": {"local_steps": 1},
            "local H=16": {"local_steps": 16},
            "local H=64": {"local_steps": 64},
            "post-local H=16": {"local_steps": 16, "switch_epoch": 0.375},
            "diloco H=64": {"local_steps": 64, "outer_optimizer": "diloco"},
        },
        seeds=(1, 2, 3),
        notes="GPT 4 x 128 (0.84M parameters) on windows of 128 bytes of the SOTU split, K=8, B_loc=8, "
        "AdamW (peak 3e-3, betas 0.9/0.95, weight decay 0.1 off norms, biases and embeddings), warm-up "
        "0.05 epochs then cosine to 10%, 1.5 epochs; post-local: H=16 from 25% of training; DiLoCo: "
        "outer Nesterov SGD lr 0.7, momentum 0.9.",
        baseline="H=1",
    ),
    # Does post-local SGD's gain need a long phase at the small LR (Gu et al., ICLR 2023)? The
    # cifar10-resnet8 protocol's first 8 epochs, then 48 epochs at the decayed LR with no second
    # decay; each run keeps its averaged model 8, 16, 32 and 40 epochs after t' and ends at 48, so
    # one run per seed measures every phase length (docs/results/cifar10-long-local.md). One thread
    # per run, two runs side by side: pilot (one epoch at K = 16, AVX-512 VM) 40.8 s alone on two
    # threads, 63 s each for two one-thread runs at once: 1.3x the throughput, about an hour a run,
    # so two pairs of runs fit in one sitting.
    "cifar10-long-local": Study(
        base={
            **RESNET8_PROTOCOL,
            "epochs": 56,
            "decay_at": [1 / 7],  # epoch 8
            "save_models_at": [16, 24, 40, 48],
            "eval_local": "never",
            "threads": 1,
        },
        methods={
            "large-batch": {},
            "post-local H=16": {"local_steps": 16, "switch_epoch": "first-decay"},
            "post-local H=64": {"local_steps": 64, "switch_epoch": "first-decay"},
        },
        seeds=(1, 2, 3),
        notes="ResNet-8 on CIFAR-10, K=16 x B_loc=32, paper LR rule with 2 warm-up epochs, one decay "
        "(x0.1) at epoch 8 = t', then 48 epochs at that LR; averaged model kept at epochs 16, 24, 40, 48 "
        "and 56 (phases of 8, 16, 32, 40, 48 epochs), each measured on 1024 clean training images.",
        baseline="large-batch",
        sharpness_samples=1024,
    ),
    # Outer optimizers and compressed averaging on the cifar10-resnet8 protocol's post-local H=16
    # row (issue: outer optimizers, compressed and overlapped averaging). The plain row is run
    # again beside them: the earlier study ran on another CPU, whose kernels round differently.
    "cifar10-outer": Study(
        base={**RESNET8_PROTOCOL, "local_steps": 16, "switch_epoch": "first-decay"},
        methods={
            "post-local H=16": {},
            "diloco": {"outer_optimizer": "diloco"},
            "slowmo": {"outer_optimizer": "slowmo"},
            "int8": {"compress": "int8"},
            "sign": {"compress": "sign"},
        },
        seeds=(1, 2, 3),
        notes="cifar10-resnet8's post-local H=16 (ResNet-8, K=16, B_loc=32, 16 epochs, t' at the first "
        "decay) with an outer optimizer (DiLoCo: Nesterov SGD lr 0.7, momentum 0.9; SlowMo: alpha 1, "
        "beta 0.5) or compressed pseudo-gradients (int8 and sign, blocks of 256, error feedback).",
        baseline="post-local H=16",
    ),
}


def get(name: str) -> Study:
    if name not in STUDIES:
        raise ConfigError(f"unknown study {name!r}; studies: {', '.join(STUDIES)}")
    return STUDIES[name]


def run_dir(root: Path, method: str, seed: int) -> Path:
    return root / method.replace(" ", "_").replace("=", "") / f"seed-{seed}"


def run_study(
    name: str,
    root: Path,
    data_dir: str | None,
    max_hours: float | None,
    methods: list[str] | None = None,
    seeds: list[int] | None = None,
    threads: int | None = None,
) -> list[dict[str, Any]]:
    """Run (or resume, or skip) every piece of study ``name`` (or only those of the given
    ``methods`` and ``seeds``, with ``threads`` torch threads if given); returns the summary
    table rows."""
    from localsgd.harness.train import train

    study = get(name)
    if max_hours is not None and max_hours <= 0:
        raise ConfigError(f"max_hours must be > 0, got {max_hours}")
    for m in methods or []:
        if m not in study.methods:
            raise ConfigError(
                f"study {name!r} has no method {m!r}; methods: {', '.join(map(repr, study.methods))}"
            )
    for s in seeds or []:
        if s not in study.seeds:
            raise ConfigError(f"study {name!r} has no seed {s}; seeds: {', '.join(map(str, study.seeds))}")
    # seed-major: an interrupted study has every method at its first seeds, not some methods complete
    pieces = [
        (m, s)
        for s in study.seeds
        for m in study.methods
        if (methods is None or m in methods) and (seeds is None or s in seeds)
    ]
    configs = {(m, s): study.config(m, s, data_dir, threads) for m, s in pieces}
    for cfg in configs.values():
        cfg.validate()  # every piece is checked before the first one starts
    start = time.monotonic()
    for i, (method, seed) in enumerate(pieces):
        out = run_dir(root, method, seed)
        if (out / "summary.json").is_file():  # finished: reused only if run with this piece's settings
            cfg = configs[method, seed]
            check_claim(inspect(out), True, False, cfg.to_dict(), sampling(cfg))
            continue
        if max_hours is not None and time.monotonic() - start > max_hours * 3600:
            print(f"time budget spent; {len(pieces) - i} pieces left, run the same command again to go on")
            break
        print(f"[{i + 1}/{len(pieces)}] {method}, seed {seed} -> {out}", flush=True)
        train(configs[method, seed], out)
        measure(study, out, data_dir)
    for method, seed in pieces:  # also the runs finished before their measurement
        measure(study, run_dir(root, method, seed), data_dir)
    return summarize(name, root)


def measure(study: Study, run: Path, data_dir: str | None) -> None:
    """The sharpness of a finished run's models (``localsgd sharpness`` with its defaults), if the
    study asks for it and it is not measured yet."""
    from localsgd.harness import sharpness

    if study.sharpness_samples is None or not (run / "summary.json").is_file():
        return
    if all(out.is_file() for _, out in sharpness.measured_models(run)):
        return
    print(f"measuring the sharpness of {run}'s models", flush=True)
    sharpness.sharpness(run, data_dir, study.sharpness_samples, 1e-3, 100, 0, skip_measured=True)


def mean_std(values: list[float]) -> tuple[float, float] | None:
    """Mean and sample standard deviation over seeds (0 for one seed; None for none)."""
    if not values:
        return None
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def run_record(run: Path, seed: int, metrics: tuple[str, ...] = MEASURES["image"].metrics) -> dict[str, Any]:
    """One finished run: its summary, the rounds after the first LR decay (the local phase of post-local
    SGD, counted from the metrics, not computed), and its top Hessian eigenvalue if measured."""
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
    """Per method: every finished seed's record, and mean and standard deviation over seeds."""
    study = get(name)
    metrics = study.measures.metrics
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
        "comparisons": compare(rows, study.baseline, study.measures.compared),
    }
    (root / "study.json").write_text(json.dumps(result, indent=1) + "\n")
    return rows


# Two-sided 95% quantiles of Student's t for 1..30 degrees of freedom (1.96 beyond).
T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
       2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
       2.045, 2.042)  # fmt: skip


def seed_of(record: dict[str, Any]) -> int:
    return record["seed"]


def compare(
    rows: list[dict[str, Any]], baseline: str | None, compared: tuple[str, ...] = MEASURES["image"].compared
) -> list[dict[str, Any]]:
    """Every method against ``baseline``, paired by seed (the same seed gives the same initial model
    and, with the same K, the same data order): per metric, the per-seed differences, their mean
    and standard deviation, and a 95% confidence interval of the mean difference (Student's t)."""
    by_method = {r["method"]: r for r in rows}
    if baseline is None or baseline not in by_method:
        return []
    out = []
    for row in rows:
        if row["method"] == baseline:
            continue
        for key in compared:
            base = {d["seed"]: d[key] for d in by_method[baseline]["runs"] if d.get(key) is not None}
            runs = sorted(
                (d for d in row["runs"] if d.get(key) is not None and d["seed"] in base), key=seed_of
            )
            diffs = [d[key] - base[d["seed"]] for d in runs]
            if not diffs:
                continue
            n, mean = len(diffs), statistics.mean(diffs)
            std = statistics.stdev(diffs) if n > 1 else None
            half = None if std is None else (T95[n - 2] if n - 1 <= len(T95) else 1.96) * std / math.sqrt(n)
            out.append(
                {
                    "method": row["method"],
                    "baseline": baseline,
                    "metric": key,
                    "seeds": [d["seed"] for d in runs],
                    "differences": diffs,
                    "mean": mean,
                    "std": std,
                    "ci95": None if half is None else [mean - half, mean + half],
                    "ci_excludes_zero": None if half is None else abs(mean) > half,
                }
            )
    return out


def comparison_table(comparisons: list[dict[str, Any]]) -> str:
    """The comparisons as text: one line per method and metric."""
    if not comparisons:
        return ""

    def shown(metric: str) -> tuple[float, int]:  # scale and digits
        return (
            (100, 2) if metric.endswith("_acc") else (1, 4) if metric.endswith(("_bpb", "_loss")) else (1, 2)
        )

    head = (
        f"{'vs ' + comparisons[0]['baseline'] + ' (paired by seed)':<32} {'metric':<15} {'seeds':>5} "
        f"{'mean diff ± std':>17} {'95% CI':>18} {'CI excludes 0':>13}"
    )
    lines = [head, "-" * len(head)]
    for c in comparisons:
        f, d = shown(c["metric"])
        std = "" if c["std"] is None else f" ± {c['std'] * f:.{d}f}"
        ci = "-" if c["ci95"] is None else f"[{c['ci95'][0] * f:+.{d}f}, {c['ci95'][1] * f:+.{d}f}]"
        verdict = "-" if c["ci_excludes_zero"] is None else ("yes" if c["ci_excludes_zero"] else "no")
        mean = f"{c['mean'] * f:>+8.{d}f}{std:<9}"
        lines.append(
            f"{c['method']:<32} {c['metric']:<15} {len(c['seeds']):>5} {mean} {ci:>18} {verdict:>13}"
        )
    return "\n".join(lines)


def plus_minus(v: tuple[float, float] | None, scale: float = 100, digits: int = 2) -> str:
    return "-" if v is None else f"{v[0] * scale:.{digits}f} ± {v[1] * scale:.{digits}f}"


def _counts(values: list[int]) -> str:
    return "/".join(str(n) for n in sorted(set(values))) or "-"


def _gigabytes(values: list[float]) -> str:
    return "/".join(f"{v:.2f}" for v in sorted(set(values))) or "-"


def table(rows: list[dict[str, Any]], kind: str = "image") -> str:
    """The study's rows as text (``kind``: image or text, as ``Study.kind``)."""
    if kind == "text":
        return text_table(rows)
    head = (
        f"{'method':<18} {'seeds':>5} {'final test %':>14} {'best test %':>14} {'local models %':>14} "
        f"{'global rounds':>13} {'after decay':>11} {'block rounds':>12} {'GB/worker':>10} "
        f"{'eigenvalue':>13} {'wall min':>10}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['method']:<18} {r['seeds_done']:>2}/{r['seeds']:<2} {plus_minus(r['final_test_acc']):>14} "
            f"{plus_minus(r['best_test_acc']):>14} {plus_minus(r['final_local_test_acc']):>14} "
            f"{_counts(r['global_rounds']):>13} {_counts(r['global_rounds_after_first_decay']):>11} "
            f"{_counts(r['block_rounds']):>12} {_gigabytes(r['gigabytes']):>10} "
            f"{plus_minus(r['eigenvalue'], 1, 1):>13} {plus_minus(r['wall_seconds'], 1 / 60, 1):>10}"
        )
    return "\n".join(lines)


def text_table(rows: list[dict[str, Any]]) -> str:
    """A text study's rows: validation loss (nats per byte) and bits per byte of the averaged model
    at the end, bits per byte of the mean of the local models, communication, speed."""
    head = (
        f"{'method':<18} {'seeds':>5} {'final valid bpb':>17} {'valid loss':>17} "
        f"{'local models bpb':>17} {'global rounds':>13} {'block rounds':>12} {'GB/worker':>10} "
        f"{'tokens/s':>16} {'wall min':>10}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        keys = ("final_valid_bpb", "final_valid_loss", "final_local_valid_bpb")
        values = [plus_minus(r[k], 1, 4) for k in keys]
        lines.append(
            f"{r['method']:<18} {r['seeds_done']:>2}/{r['seeds']:<2} {values[0]:>17} {values[1]:>17} "
            f"{values[2]:>17} "
            f"{_counts(r['global_rounds']):>13} {_counts(r['block_rounds']):>12} "
            f"{_gigabytes(r['gigabytes']):>10} {plus_minus(r['tokens_per_second'], 1, 0):>16} "
            f"{plus_minus(r['wall_seconds'], 1 / 60, 1):>10}"
        )
    return "\n".join(lines)


SMALL_FILES = ("config.json", "metrics.jsonl", "summary.json", "sharpness.json")


def export(name: str, root: Path, dest: Path) -> list[Path]:
    """Copy the study's small raw results (per finished run: config, metrics, summary, sharpness of the
    final and kept models; study.json, study.png, phases.json, phases.png) from ``root`` to ``dest``,
    leaving checkpoints, model files and unfinished runs behind. Copied back into a study directory,
    the finished runs are skipped as finished there too."""
    study = get(name)
    copied = []
    pairs = [(root / f, dest / f) for f in ("study.json", "study.png", "phases.json", "phases.png")]
    for method in study.methods:
        for seed in study.seeds:
            src, dst = run_dir(root, method, seed), run_dir(dest, method, seed)
            if not (src / "summary.json").is_file():
                continue
            pairs += [(src / f, dst / f) for f in SMALL_FILES]
            pairs += [(f, dst / "models" / f.name) for f in sorted(src.glob("models/epoch-*.json"))]
    for src, dst in pairs:
        if src.is_file():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
            copied.append(dst)
    return copied
