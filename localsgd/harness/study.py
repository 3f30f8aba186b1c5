"""``localsgd study``: a named grid of runs (methods x seeds) as resumable pieces. A finished run is
skipped, an interrupted one resumes from its last checkpoint, so a study can be spread over
several sittings (``--max-hours`` stops starting new runs once the budget is spent)."""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from localsgd.harness.config import Config, ConfigError, from_mapping


@dataclass(frozen=True)
class Study:
    """``base`` settings for every run; ``methods`` name the settings that differ."""

    base: dict[str, Any]
    methods: dict[str, dict[str, Any]]
    seeds: tuple[int, ...] = (1, 2, 3)
    notes: str = ""

    def config(self, method: str, seed: int, data_dir: str | None) -> Config:
        values = {**self.base, **self.methods[method], "seed": seed, "resume": True}
        if data_dir is not None:
            values["data_dir"] = data_dir
        return from_mapping(values, f"study method {method!r}")


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
            "eval_local": False,
            "progress": False,
        },
        methods={"mini-batch": {"local_steps": 1}, "post-local H=4": {"local_steps": 4, "switch_epoch": 1}},
        seeds=(1, 2),
    ),
}


def run_dir(root: Path, method: str, seed: int) -> Path:
    return root / method.replace(" ", "_").replace("=", "") / f"seed-{seed}"


def run_study(name: str, root: Path, data_dir: str | None, max_hours: float | None) -> list[dict[str, Any]]:
    """Run (or resume, or skip) every piece of study ``name``; returns the summary table rows."""
    from localsgd.harness.train import train

    if name not in STUDIES:
        raise ConfigError(f"unknown study {name!r}; studies: {', '.join(STUDIES)}")
    if max_hours is not None and max_hours <= 0:
        raise ConfigError(f"max_hours must be > 0, got {max_hours}")
    study = STUDIES[name]
    pieces = [(m, s) for m in study.methods for s in study.seeds]
    configs = {(m, s): study.config(m, s, data_dir) for m, s in pieces}
    for cfg in configs.values():
        cfg.validate()  # every piece is checked before the first one starts
    start = time.monotonic()
    for i, (method, seed) in enumerate(pieces):
        out = run_dir(root, method, seed)
        if (out / "summary.json").is_file():
            continue
        if max_hours is not None and time.monotonic() - start > max_hours * 3600:
            print(f"time budget spent; {len(pieces) - i} pieces left, run the same command again to go on")
            break
        print(f"[{i + 1}/{len(pieces)}] {method}, seed {seed} -> {out}", flush=True)
        train(configs[method, seed], out)
    return summarize(name, root)


def summarize(name: str, root: Path) -> list[dict[str, Any]]:
    """Mean and standard deviation over the finished seeds of each method."""
    study = STUDIES[name]
    rows = []
    for method in study.methods:
        done = [
            json.loads((run_dir(root, method, s) / "summary.json").read_text())
            for s in study.seeds
            if (run_dir(root, method, s) / "summary.json").is_file()
        ]
        row: dict[str, Any] = {"method": method, "seeds_done": len(done), "seeds": len(study.seeds)}
        for key in ("final_test_acc", "best_test_acc", "wall_seconds"):
            values = [d[key] for d in done]
            row[key] = (
                (statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0)
                if values
                else None
            )
        row["global_rounds"] = [d["rounds"].get("global", 0) for d in done]
        rows.append(row)
    root.mkdir(parents=True, exist_ok=True)
    (root / "study.json").write_text(json.dumps({"study": name, "rows": rows}, indent=1) + "\n")
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    def pm(v: tuple[float, float] | None, scale: float = 100, unit: str = "%") -> str:
        return "-" if v is None else f"{v[0] * scale:.2f} ± {v[1] * scale:.2f}{unit}"

    head = f"{'method':<20} {'seeds':>5} {'final test acc':>18} {'best test acc':>18} {'global rounds':>14}"
    lines = [head, "-" * len(head)]
    for r in rows:
        rounds = "/".join(str(n) for n in sorted(set(r["global_rounds"]))) or "-"
        lines.append(
            f"{r['method']:<20} {r['seeds_done']:>2}/{r['seeds']:<2} {pm(r['final_test_acc']):>18} "
            f"{pm(r['best_test_acc']):>18} {rounds:>14}"
        )
    return "\n".join(lines)
