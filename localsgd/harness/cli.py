"""The ``localsgd`` command: train, study, plot, sharpness, interpolate, plan, download, demo."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import textwrap
from pathlib import Path
from typing import Any


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def setting_flag(group: Any, name: str, doc: str, default: Any) -> None:
    """The flag of setting ``name``: ``--name VALUE``, or for true/false settings ``--name``,
    ``--name true|false`` and ``--no-name``."""
    from localsgd.harness.config import kind, shown

    flag = name.replace("_", "-")
    if "default" not in doc:  # a None default says in its doc what none means
        doc += f" (default: {shown(default)})"
    if kind(name) is not bool:
        group.add_argument(f"--{flag}", dest=name, metavar="VALUE", default=argparse.SUPPRESS, help=doc)
        return
    group.add_argument(
        f"--{flag}", dest=name, nargs="?", const="true", metavar="true|false",
        default=argparse.SUPPRESS, help=f"{doc} [--no-{flag} turns it off]",
    )  # fmt: skip
    group.add_argument(
        f"--no-{flag}", dest=name, action="store_const", const="false",
        default=argparse.SUPPRESS, help=argparse.SUPPRESS,
    )  # fmt: skip


def parser() -> argparse.ArgumentParser:
    from localsgd.harness.config import (
        PRESET_NOTES,
        PRESETS,
        SECTIONS,
        Config,
        field_docs,
    )

    p = argparse.ArgumentParser(
        prog="localsgd", description="Local SGD, post-local SGD and hierarchical local SGD."
    )
    sub = p.add_subparsers(dest="command", required=True)

    width = min(100, shutil.get_terminal_size().columns - 2)
    description = textwrap.fill(
        "Settings come from a preset, then a TOML file, then --key value flags. Under torchrun "
        "each process is one worker and K is the number of processes, unless a flag, the config file or "
        "the preset sets --workers (a K that differs from the number of processes is an error); "
        "otherwise --workers K workers (default 16) run in the simulator. A true/false setting is a flag "
        "(--resume, --no-resume) that also takes a value (--resume true). A setting the run does not use "
        "(--momentum with adamw) is an error; one a preset set is dropped, with a line saying so.",
        width,
    )
    presets = "\n".join(f"  {name:<18} {PRESET_NOTES[name]}" for name in PRESETS)
    train = sub.add_parser(
        "train",
        help="train a model (simulator, or one worker per process under torchrun)",
        description=description,
        epilog=f"presets (--preset NAME; a file or flag overrides any of its settings):\n{presets}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument("--preset", choices=list(PRESETS), help="start from a named preset (listed below)")
    train.add_argument("--config", metavar="FILE", help="TOML file of settings (keys as below, with _ or -)")
    docs, defaults = field_docs(), Config().to_dict()
    for section, names in SECTIONS.items():
        title = section.__name__.removesuffix("Settings").lower()
        group = train.add_argument_group(f"{title} settings", section.__doc__)
        for name in names:
            setting_flag(group, name, docs[name], defaults[name])

    plot = sub.add_parser("plot", help="plot runs against each other (PNG)")
    plot.add_argument("runs", nargs="+", metavar="RUN_DIR")
    plot.add_argument(
        "--out", help="output PNG (default: runs.png in the folder that holds the runs, if they share one)"
    )

    study = sub.add_parser(
        "study",
        help="run a named study (methods x seeds) as resumable pieces, then print its table",
        description="A finished run is skipped and an interrupted one resumes, so the same command can "
        "be repeated across sittings.",
    )
    study.add_argument("name", help="the study (see localsgd.harness.studies.STUDIES)")
    study.add_argument("--out", help="study directory (default runs/study-NAME)")
    study.add_argument("--data-dir", help="dataset folder for every run")
    study.add_argument("--max-hours", type=float, help="start no new run after this many hours")
    study.add_argument(
        "--threads",
        type=int,
        help="torch threads per run (default: the study's; e.g. 1 to run two studies' pieces side by side)",
    )
    study.add_argument("--methods", nargs="+", metavar="METHOD", help="run only these methods (default: all)")
    study.add_argument(
        "--seeds", nargs="+", type=int, metavar="SEED", help="run only these seeds (default: all)"
    )
    study.add_argument("--summary", action="store_true", help="only print the table of finished runs")
    study.add_argument("--plot", action="store_true", help="also write the study's figure to OUT/study.png")
    study.add_argument(
        "--export", metavar="DIR", help="copy the small raw results (JSON/JSONL, PNG; no checkpoints) to DIR"
    )

    sharp = sub.add_parser(
        "sharpness",
        help="top Hessian eigenvalue of the training loss at each run's final model (and kept models)",
        description="Power iteration with Hessian-vector products on a fixed random subset of the training "
        "set (no augmentation, BN in eval mode, no weight decay), with the loss and accuracy there. Writes "
        "RUN_DIR/sharpness.json, and RUN_DIR/models/epoch-E.json for each model save_models_at kept.",
    )
    sharp.add_argument("runs", nargs="+", metavar="RUN_DIR")
    sharp.add_argument("--samples", type=positive_int, default=2048, help="training images (default 2048)")
    sharp.add_argument("--tol", type=float, default=1e-3, help="relative change to stop at (default 1e-3)")
    sharp.add_argument("--max-iters", type=positive_int, default=100, help="power iterations (default 100)")
    sharp.add_argument("--seed", type=int, default=0, help="subset and start vector (default 0)")
    sharp.add_argument("--data-dir", help="dataset folder (default: the one the run used)")

    interp = sub.add_parser(
        "interpolate",
        help="loss and accuracy along the line between two runs' final models (JSON + PNG)",
        description="Evaluates (1 - alpha) * A + alpha * B, re-estimating BN statistics at every point.",
    )
    interp.add_argument("run_a", metavar="RUN_A")
    interp.add_argument("run_b", metavar="RUN_B")
    interp.add_argument("--alphas", default="-0.5:1.5:21", help="START:STOP:POINTS (default -0.5:1.5:21)")
    interp.add_argument("--samples", type=positive_int, default=2048, help="training images (default 2048)")
    interp.add_argument("--seed", type=int, default=0)
    interp.add_argument("--data-dir", help="dataset folder (default: the one run A used)")
    interp.add_argument("--out", default="interpolation", help="output stem: .json and .png")

    from localsgd.harness import planning

    plan = sub.add_parser(
        "plan",
        help="predict seconds per epoch and the speed-up of each H over mini-batch SGD on a network",
        description="A cost model of gloo's ring all-reduce (latency d, bandwidth, K) plus measured compute "
        "time per step; benchmarks/network.py checks it on emulated networks.",
    )
    planning.add_arguments(plan)

    download = sub.add_parser("download", help="download a dataset and verify its official checksums")
    download.add_argument("dataset")
    download.add_argument("--data-dir", help="destination (default: the cache that `train` looks in)")
    download.add_argument("--base-url", help="mirror to download from instead of the official server")

    demo = sub.add_parser(
        "demo",
        help="compare mini-batch, local, post-local and hierarchical local SGD on a synthetic task",
        description="Runs in the simulator, or one worker per process under torchrun "
        "(torchrun --nproc-per-node 4 -m localsgd demo).",
    )
    demo.add_argument("--workers", type=positive_int, default=8, help="K (simulator only; default 8)")
    demo.add_argument("--epochs", type=positive_int, default=6, help="epochs (default 6)")
    demo.add_argument("--local-steps", type=positive_int, default=16, help="H (default 16)")
    demo.add_argument("--local-batch-size", type=positive_int, default=32, help="B_loc (default 32)")
    demo.add_argument("--seed", type=int, default=0)
    return p


def train_config(args: argparse.Namespace):
    """The settings: preset < file < flags. A preset's setting that the result does not use (the
    user switched the optimizer, schedule or task) is dropped with one line naming the preset."""
    from localsgd.harness.config import (
        SETTINGS,
        Config,
        drop_unused_preset_settings,
        load_toml,
        parse_value,
        preset,
    )

    cfg = preset(args.preset) if args.preset else Config()
    if args.config:
        cfg = load_toml(args.config, base=cfg)
    for name in SETTINGS:
        if name in vars(args):
            setattr(cfg, name, parse_value(name, getattr(args, name)))
            cfg.given = {**cfg.given, name: "flag"}
    for line in drop_unused_preset_settings(cfg):
        if os.environ.get("RANK", "0") == "0":
            print(f"localsgd: {line}", file=sys.stderr)
    return cfg


def run_train(args: argparse.Namespace) -> int:
    import torch.distributed as dist

    from localsgd.harness import report
    from localsgd.harness.rundir import check_claim, inspect
    from localsgd.harness.runtime import resolve_workers
    from localsgd.harness.tasks import measures_of, sampling
    from localsgd.harness.train import train

    cfg = resolve_workers(train_config(args))
    cfg.validate()
    name = (
        f"{args.preset or 'train'}-{cfg.dataset}-{cfg.model}-K{cfg.workers}-H{cfg.local_steps}-seed{cfg.seed}"
    )
    out = Path(cfg.out or f"runs/{name}")
    state = inspect(out)
    if cfg.resume and state.kind == "run" and state.finished:  # nothing to continue: same settings?
        check_claim(state, cfg.resume, cfg.overwrite, cfg.to_dict(), sampling(cfg))
        print(f"{out} holds a finished run with these settings; not running it again (see its summary.json)")
        return 0
    try:
        result = train(cfg, out)
        if result.main:
            measures = measures_of(cfg.dataset)
            print(report.rows_table(result.history, measures))
            print("\n".join(report.result_lines(result.summary, measures)))
            print(f"run directory: {out / f'worker-{cfg.worker}' if cfg.fault_tolerant else out}")
        if dist.is_initialized():
            dist.barrier()  # no rank tears its connections down while a peer still uses them
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


def run_demo(args: argparse.Namespace) -> int:
    import torch
    import torch.distributed as dist

    from localsgd.harness import demo
    from localsgd.harness.runtime import is_distributed

    if is_distributed():
        torch.set_num_threads(1)
        dist.init_process_group("gloo")
    try:
        demo.main(args.workers, args.epochs, args.local_steps, args.local_batch_size, args.seed)
        if dist.is_initialized():
            dist.barrier()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


def alphas(text: str) -> list[float]:
    from localsgd.harness.config import ConfigError

    try:
        start, stop, points = text.split(":")
        n = int(points)
        lo, hi = float(start), float(stop)
    except ValueError:
        raise ConfigError(f"--alphas must be START:STOP:POINTS, e.g. -0.5:1.5:21; got {text!r}") from None
    if n < 2 or not lo < hi:
        raise ConfigError(f"--alphas needs START < STOP and POINTS >= 2; got {text!r}")
    return [round(lo + (hi - lo) * i / (n - 1), 6) for i in range(n)]


def run_interpolate(args: argparse.Namespace) -> int:
    from localsgd.harness import sharpness
    from localsgd.harness.measures import ACCURACY
    from localsgd.harness.tables import Column, render

    points = alphas(args.alphas)
    a, b = Path(args.run_a), Path(args.run_b)
    rows = sharpness.interpolate_runs(a, b, args.data_dir, points, args.samples, args.seed)
    out = Path(args.out)
    record = {"run_a": str(a), "run_b": str(b), "samples": args.samples, "seed": args.seed, "points": rows}
    out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    columns = [
        Column("alpha", 6, lambda r: f"{r['alpha']:.2f}"),
        Column("train loss", 10, lambda r: f"{r['train_loss']:.4f}"),
        Column("train acc", 9, lambda r: ACCURACY.cell(r["train_acc"])),
        Column("test loss", 9, lambda r: f"{r['test_loss']:.4f}"),
        Column("test acc", 8, lambda r: ACCURACY.cell(r["test_acc"])),
    ]
    print(render(columns, rows, rule=False))
    print(sharpness.plot_interpolation(rows, (a.name, b.name), out.with_suffix(".png")))
    return 0


def plot_path(runs: list[Path]) -> Path:
    """Where ``localsgd plot`` writes without ``--out``: beside the runs, never in the current folder
    by accident."""
    if len({r.resolve().parent for r in runs}) > 1:
        raise ValueError("the runs are in different folders; say where the plot goes with --out FILE.png")
    return runs[0].parent / "runs.png"


def finish(code: int) -> int:
    """Leave a torchrun worker without C++ teardown: torch 2.13's gloo backend sometimes aborts in
    static destructors after Python has finished ("terminate called without an active exception"),
    which torchrun would report as a failed run (or restart) although everything was written."""
    from localsgd.harness.runtime import is_distributed

    if is_distributed():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def main(argv: list[str] | None = None) -> int:
    try:
        return command(argv)
    except KeyboardInterrupt:  # Ctrl-C outside a training loop, or a second one inside it
        print("localsgd: interrupted; a run continues with --resume from its checkpoint", file=sys.stderr)
        return finish(130)


def command(argv: list[str] | None) -> int:
    """Run one ``localsgd`` command; bad input, OS errors and signals end it with one line."""
    args = parser().parse_args(argv)
    from localsgd.engine import CommunicationError, first_line
    from localsgd.harness.interrupt import Interrupted
    from localsgd.harness.rows import TrainingError

    try:
        if args.command == "train":
            return finish(run_train(args))
        if args.command == "demo":
            return finish(run_demo(args))
        if args.command == "study":
            from localsgd.harness import report, study

            root = Path(args.out or f"runs/study-{args.name}")
            if args.summary:
                rows = report.summarize(args.name, root)
            else:
                try:
                    rows = study.run_study(
                        args.name, root, args.data_dir, args.max_hours, args.methods, args.seeds, args.threads
                    )
                except Interrupted as e:  # a study continues by running it again
                    how = "by running the same command again"
                    raise Interrupted(e.signum, e.step, e.checkpoint_step, how) from None
            print(report.study_report(args.name, root, rows, args.plot))
            if args.export:
                copied = study.export(args.name, root, Path(args.export))
                print(f"{len(copied)} files copied to {args.export}")
            return 0
        if args.command == "plot":
            from localsgd.harness.plot import plot_runs

            runs = [Path(r) for r in args.runs]
            print(plot_runs(runs, Path(args.out) if args.out else plot_path(runs)))
            return 0
        if args.command == "sharpness":
            from localsgd.harness import sharpness

            for run in args.runs:
                for r in sharpness.sharpness(
                    Path(run), args.data_dir, args.samples, args.tol, args.max_iters, args.seed
                ):
                    state = "converged" if r["converged"] else "NOT converged"
                    print(
                        f"{Path(run) / r['model']}: top Hessian eigenvalue {r['eigenvalue']:.4g} ({state}: "
                        f"relative change {r['relative_change']:.1e} after {r['iterations']} iterations, "
                        f"{r['samples']} images); clean train accuracy {r['train_acc']:.2%}"
                    )
            return 0
        if args.command == "plan":
            from localsgd.harness import planning

            return planning.run(args)
        if args.command == "interpolate":
            return run_interpolate(args)
        if args.command == "download":
            from localsgd.harness.data import default_data_dir, download

            print(download(args.dataset, args.data_dir or default_data_dir(args.dataset), args.base_url))
            return 0
    except Interrupted as e:  # a signal, noticed between two steps: one line, 128 + its number
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank stops; rank 0 says so
            print(f"localsgd: {e}", file=sys.stderr)
        return finish(e.exit_code)
    except (ValueError, TrainingError, CommunicationError, OSError) as e:  # one line, no traceback
        print(f"localsgd: error: {first_line(e)}", file=sys.stderr)
        return finish(2)  # under torchrun also on the error path: no gloo teardown abort
    return 0


if __name__ == "__main__":
    sys.exit(main())
