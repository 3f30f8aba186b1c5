"""``localsgd study``: a named grid of runs (methods x seeds, ``studies.py``) as resumable
pieces. A finished run is skipped, an interrupted one resumes from its last checkpoint, so a
study can be spread over several sittings (``--max-hours`` stops starting new runs once the
budget is spent). ``report.py`` summarises the finished runs."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from localsgd.harness.config import ConfigError
from localsgd.harness.report import summarize
from localsgd.harness.rundir import check_claim, inspect
from localsgd.harness.studies import Study, get, run_dir
from localsgd.harness.tasks import sampling


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
