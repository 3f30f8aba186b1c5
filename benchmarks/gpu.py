"""One-GPU benchmark: simulator throughput (K workers against one model on the same samples, fp32
and bf16) and a short run of the paper's protocol on real CIFAR-10, in under 8 minutes on a modern
GPU. The same script runs on a CPU with small sizes.

    python benchmarks/gpu.py                       # CUDA if available, the paper's sizes
    python benchmarks/gpu.py --device cpu --model resnet8 --workers 2 --local-batch-size 8 \\
        --steps 2 --repeats 2 --epochs 1 --train-subset 256 --test-subset 200

1. Throughput: K simulated workers (``localsgd.Simulator``, ``Schedule.local(H)``: each worker takes
   local steps on its own B_loc samples, parameters are averaged every H-th step) against one model
   trained on the same K * B_loc samples per step; SGD with Nesterov momentum 0.9 and weight decay
   1e-4 (not on BatchNorm), channels_last, random CIFAR-shaped inputs held on the device. fp32 and
   bf16 autocast (forward and loss); bf16 is skipped, with the reason, where the device has no native
   bf16. Warm-up steps, then repeats of ``--steps`` steps (a multiple of H, so every repeat holds the
   same number of averages), all configurations interleaved repeat by repeat; no host reads inside
   a timed repeat, and on CUDA a synchronisation before every clock read.
2. Training: ``localsgd train --preset paper`` through the library for a few epochs (warm-up
   shortened to fit; the overrides are recorded), with its final test accuracy, wall time and img/s.
3. Sharded workers, with two or more GPUs: ``benchmarks/sharded.py --device cuda`` on up to 4 of
   them (NCCL; FSDP2 groups of S = 1, 2, 4 GPUs): per-GPU bytes held and sent per average, and
   peak device memory. Skipped, with the reason, on one GPU or a CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

from common import write_result

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's localsgd

SHARED_CIFAR10 = ROOT.parent / "shared/data/cifar-10-batches-py"
CIFAR10_TRAIN_IMAGES = 50_000
PRECISIONS = ("fp32", "bf16")
CONFIGS = ("one model", "simulator")


class InputError(ValueError):
    """A bad command-line value, reported in one line before any work."""


# --- arguments and checks (no work) ---------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto: CUDA if available"
    )
    p.add_argument("--out", default="benchmarks/results/gpu.json", help="JSON result")
    p.add_argument(
        "--threads", type=int, help="torch threads (default: torch's; the training run: all cores)"
    )
    p.add_argument("--skip-throughput", action="store_true", help="skip part 1")
    p.add_argument("--skip-train", action="store_true", help="skip part 2")
    w = p.add_argument_group("workload (both parts)")
    w.add_argument("--model", default="resnet20", help="resnet8, resnet14, resnet20, ...")
    w.add_argument("--workers", type=int, default=16, help="K")
    w.add_argument("--local-batch-size", type=int, default=128, help="B_loc")
    w.add_argument("--local-steps", type=int, default=16, help="H: local steps between parameter averages")
    t = p.add_argument_group("part 1: throughput")
    t.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS)
    t.add_argument("--warmup", type=int, default=3, help="untimed steps per configuration")
    t.add_argument("--steps", type=int, help="steps per timed repeat, a multiple of H (default: H)")
    t.add_argument("--repeats", type=int, default=5, help="timed repeats per configuration (median)")
    t.add_argument("--lr", type=float, default=0.05, help="learning rate of the throughput runs")
    r = p.add_argument_group("part 2: paper-protocol training run")
    r.add_argument("--epochs", type=float, default=8)
    r.add_argument("--warmup-epochs", type=float, help="LR warm-up (default: min(5, epochs / 5))")
    r.add_argument(
        "--data-dir",
        help=f"CIFAR-10 folder (default: {SHARED_CIFAR10} if it exists, else the cache `localsgd download "
        "cifar10` fills)",
    )
    r.add_argument("--train-subset", type=int, help="train on N training images (quick runs)")
    r.add_argument("--test-subset", type=int, help="evaluate on N test images (quick runs)")
    r.add_argument("--seed", type=int, help="the preset's seed unless given")
    r.add_argument("--run-dir", help="keep the run directory here (default: a temporary one, removed)")
    args = p.parse_args(argv)
    if args.steps is None:
        args.steps = args.local_steps
    args.precisions = list(dict.fromkeys(args.precisions))
    return args


def pick_device(name: str) -> torch.device:
    from localsgd.harness.config import ConfigError
    from localsgd.harness.runtime import pick_device as runtime_device

    try:
        return runtime_device(name, distributed=False)
    except ConfigError:
        raise InputError(f"--device {name} but torch.cuda.is_available() is False") from None


def native_bf16(device: torch.device) -> tuple[bool, str]:
    """Whether bf16 autocast runs on native kernels here (the check `localsgd train` makes)."""
    from localsgd.harness.runtime import bf16_supported

    return bf16_supported(device), "localsgd.harness.runtime.bf16_supported"


def default_data_dir() -> Path:
    from localsgd.harness.data import default_data_dir as cache

    return SHARED_CIFAR10 if SHARED_CIFAR10.is_dir() else cache("cifar10")


def check_inputs(args: argparse.Namespace) -> tuple[torch.device, Any, dict[str, Any]]:
    """The device, the training config and its overrides of the preset; InputError on bad input."""
    from localsgd.harness.config import ConfigError, preset
    from localsgd.harness.models import MODELS

    device = pick_device(args.device)
    if args.model not in MODELS:
        raise InputError(f"--model must be one of {', '.join(MODELS)}, got {args.model!r}")
    positive = ("workers", "local_batch_size", "local_steps", "steps", "repeats", "threads", "train_subset",
                "test_subset")  # fmt: skip
    for name in positive:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise InputError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.warmup < 0:
        raise InputError(f"--warmup must be >= 0, got {args.warmup}")
    if args.steps % args.local_steps:
        raise InputError(
            f"--steps ({args.steps}) must be a multiple of --local-steps ({args.local_steps}), so that every "
            "timed repeat holds the same number of averages"
        )
    if not args.lr > 0:
        raise InputError(f"--lr must be > 0, got {args.lr}")
    if args.skip_throughput and args.skip_train:
        raise InputError("--skip-throughput and --skip-train leave nothing to measure")
    if args.skip_train:
        return device, None, {}
    if not (math.isfinite(args.epochs) and args.epochs > 0):
        raise InputError(f"--epochs must be > 0, got {args.epochs}")
    warmup = args.warmup_epochs if args.warmup_epochs is not None else min(5.0, args.epochs / 5)
    data_dir = Path(args.data_dir).expanduser() if args.data_dir else default_data_dir()
    if not any((d / "data_batch_1").is_file() for d in (data_dir, data_dir / "cifar-10-batches-py")):
        raise InputError(
            f"CIFAR-10 not found in {data_dir}; run `localsgd download cifar10` (the default cache) or pass "
            "--data-dir"
        )
    overrides: dict[str, Any] = {
        "epochs": args.epochs,
        "warmup_epochs": warmup,
        "device": device.type,
        "data_dir": str(data_dir),
    }
    cfg = preset("paper")
    for name in ("model", "workers", "local_batch_size", "local_steps"):
        if getattr(args, name) != getattr(cfg, name):
            overrides[name] = getattr(args, name)
    for name in ("train_subset", "test_subset", "seed", "threads"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    cfg = dataclasses.replace(cfg, **overrides)
    try:
        cfg.validate()
    except ConfigError as e:
        raise InputError(str(e)) from None
    per_worker = (cfg.train_subset or CIFAR10_TRAIN_IMAGES) // cfg.workers
    if cfg.local_batch_size > per_worker:
        raise InputError(
            f"--local-batch-size ({cfg.local_batch_size}) exceeds each worker's shard of {per_worker} images"
        )
    return device, cfg, overrides


# --- part 1: throughput ---------------------------------------------------------------------------


def clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@dataclass
class Bench:
    """One configuration: a training step that reads nothing back, and what to check afterwards."""

    config: str
    precision: str
    step: Callable[[], None]
    last_loss: list[torch.Tensor]
    averages: Callable[[], int]


def make_bench(config: str, precision: str, args: argparse.Namespace, device: torch.device) -> Bench:
    from localsgd import Schedule, Simulator
    from localsgd.harness.models import build_model
    from localsgd.harness.optim import sgd

    torch.manual_seed(0)
    model = build_model(args.model, 10).to(device, memory_format=torch.channels_last)

    def make_opt(m: torch.nn.Module) -> torch.optim.Optimizer:
        return sgd(m, lr=args.lr, momentum=0.9, nesterov=True, weight_decay=1e-4)

    total = args.workers * args.local_batch_size
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(total, 3, 32, 32, generator=gen, device=device).contiguous(
        memory_format=torch.channels_last
    )
    y = torch.randint(0, 10, (total,), generator=gen, device=device)
    bf16 = precision == "bf16"
    last: list[torch.Tensor] = []
    if config == "one model":
        opt = make_opt(model)

        def step() -> None:
            opt.zero_grad()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            last[:] = [loss.detach()]

        return Bench(config, precision, step, last, lambda: 0)

    sim = Simulator(model, make_opt, Schedule.local(args.local_steps), args.workers)
    xs, ys = x.split(args.local_batch_size), y.split(args.local_batch_size)

    def sim_step() -> None:
        for k, m in enumerate(sim.models):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = F.cross_entropy(m(xs[k]), ys[k])
            loss.backward()
        sim.step()
        sim.zero_grad()
        last[:] = [loss.detach()]

    return Bench(config, precision, sim_step, last, lambda: sum(s.rounds for s in sim.stats.values()))


def label(config: str, args: argparse.Namespace) -> str:
    if config == "one model":
        return f"one model, batch {args.workers * args.local_batch_size}"
    return f"simulator K={args.workers} H={args.local_steps}"


def throughput(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    native, check = native_bf16(device)
    skip_reason = {
        "bf16": f"no native bf16 on this {device.type} ({check} is False)" if not native else None,
        "fp32": None,
    }
    benches: list[Bench] = []
    for precision in args.precisions:
        if skip_reason[precision] is None:
            for config in CONFIGS:
                print(f"[throughput] building {label(config, args)}, {precision}", file=sys.stderr)
                benches.append(make_bench(config, precision, args, device))
    for b in benches:
        print(f"[throughput] warm-up: {label(b.config, args)}, {b.precision}", file=sys.stderr)
        for _ in range(args.warmup):
            b.step()
    total = args.workers * args.local_batch_size
    images = args.steps * total
    rates: dict[int, list[float]] = {i: [] for i in range(len(benches))}
    averages: dict[int, list[int]] = {i: [] for i in range(len(benches))}
    for r in range(args.repeats):
        for i, b in enumerate(benches):
            rounds = b.averages()
            start = clock(device)
            for _ in range(args.steps):
                b.step()
            seconds = clock(device) - start
            rates[i].append(images / seconds)
            averages[i].append(b.averages() - rounds)
        print(f"[throughput] repeat {r + 1}/{args.repeats}", file=sys.stderr)
    rows: list[dict[str, Any]] = []
    base: dict[str, float] = {}
    for precision in args.precisions:
        for config in CONFIGS:
            row: dict[str, Any] = {
                "config": config,
                "label": label(config, args),
                "precision": precision,
                "workers": args.workers if config == "simulator" else 1,
                "local_batch_size": args.local_batch_size if config == "simulator" else total,
                "local_steps": args.local_steps if config == "simulator" else None,
                "images_per_step": total,
            }
            if skip_reason[precision] is not None:
                rows.append({**row, "status": "skipped", "reason": skip_reason[precision]})
                continue
            i = next(j for j, b in enumerate(benches) if (b.config, b.precision) == (config, precision))
            med = statistics.median(rates[i])
            base.setdefault(precision, med)  # "one model" comes first
            rows.append({
                **row, "status": "measured", "img_per_s": rates[i], "median_img_per_s": med,
                "ratio_to_one_model": med / base[precision],
                "averages_per_repeat": averages[i] if config == "simulator" else None,
                "last_loss": float(benches[i].last_loss[0]),
            })  # fmt: skip
    result = {
        "model": args.model,
        "inputs": "random normal CIFAR-shaped images (3x32x32) and labels, held on the device",
        "schedule": f"Schedule.local({args.local_steps}): parameters averaged every {args.local_steps} steps",
        "optimizer": f"SGD lr {args.lr}, momentum 0.9, Nesterov, weight decay 1e-4 (not on BatchNorm)",
        "channels_last": True,
        "warmup_steps": args.warmup,
        "steps_per_repeat": args.steps,
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "bf16_native": native,
        "bf16_check": check,
        "rows": rows,
    }
    if device.type == "cuda":
        result["peak_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return result


def throughput_table(part: dict[str, Any]) -> str:
    head = (
        f"{'configuration':<28} {'precision':<9} {'img/s min':>9} {'median':>8} {'max':>8} "
        f"{'vs one model':>12}"
    )
    lines = [head, "-" * len(head)]
    for r in part["rows"]:
        if r["status"] == "skipped":
            lines.append(f"{r['label']:<28} {r['precision']:<9} skipped: {r['reason']}")
            continue
        lines.append(
            f"{r['label']:<28} {r['precision']:<9} {min(r['img_per_s']):>9.0f} {r['median_img_per_s']:>8.0f} "
            f"{max(r['img_per_s']):>8.0f} {r['ratio_to_one_model']:>12.3f}"
        )
    return "\n".join(lines)


# --- part 2: the paper's protocol, a few epochs ---------------------------------------------------


def images_trained(total_steps: int, steps_per_epoch: int, per_worker: int, batch: int, workers: int) -> int:
    """Images the K workers took in ``total_steps`` steps (an epoch's last batch may be short)."""
    per_step = [min(batch, per_worker - i * batch) for i in range(steps_per_epoch)]
    full, rest = divmod(total_steps, steps_per_epoch)
    return workers * (full * sum(per_step) + sum(per_step[:rest]))


def paper_run(cfg: Any, overrides: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    from localsgd.harness.train import train

    start = time.perf_counter()
    result = train(cfg, run_dir)
    total = time.perf_counter() - start
    s, history = result.summary, result.history
    derived = json.loads((run_dir / "config.json").read_text())["derived"]
    per_worker = derived["train_images"] // cfg.workers
    images = images_trained(
        s["steps"], derived["steps_per_epoch"], per_worker, cfg.local_batch_size, cfg.workers
    )
    eval_seconds = history[-1]["eval_seconds"]
    train_seconds = s["wall_seconds"] - eval_seconds
    return {
        "status": "finished",
        "preset": "paper",
        "overrides": overrides,
        "schedule": s["schedule"],
        "device": derived.get("device"),
        "train_images": derived["train_images"],
        "test_images": derived["test_images"],
        "steps_per_epoch": derived["steps_per_epoch"],
        "steps_expected": derived["total_steps"],
        "switch_step": derived["switch_step"],
        "peak_lr": derived["peak_lr"],
        "steps": s["steps"],
        "epochs": s["epochs"],
        "images_trained": images,
        "final_test_acc": s["final_test_acc"],
        "best_test_acc": s["best_test_acc"],
        "final_local_test_acc": s.get("final_local_test_acc"),
        "rounds": s["rounds"],
        "wall_seconds": s["wall_seconds"],
        "eval_seconds": eval_seconds,
        "train_img_per_s": images / train_seconds,
        "img_per_s_with_eval": images / s["wall_seconds"],
        "seconds_with_data_loading": total,
        "threads": torch.get_num_threads(),
        "history": [
            {
                k: r.get(k)
                for k in ("epoch", "step", "lr", "train_loss", "train_acc", "test_acc", "wall_seconds")
            }
            for r in history
        ],
    }


def train_table(part: dict[str, Any]) -> str:
    head = f"{'epoch':>6} {'lr':>8} {'train loss':>10} {'test acc':>8} {'wall s':>8}"
    lines = [head, "-" * len(head)]
    for r in part["history"]:
        acc = f"{r['test_acc']:.2%}" if r["test_acc"] is not None else "-"
        lines.append(
            f"{r['epoch']:>6g} {r['lr']:>8.4f} {r['train_loss']:>10.4f} {acc:>8} {r['wall_seconds']:>8.1f}"
        )
    lines.append(
        f"final test accuracy {part['final_test_acc']:.2%} after {part['steps']} steps "
        f"({part['epochs']:g} epochs), "
        f"{part['wall_seconds']:.1f} s, {part['train_img_per_s']:.0f} img/s training "
        f"({part['img_per_s_with_eval']:.0f} with evaluation)"
    )
    return "\n".join(lines)


# --- main -------------------------------------------------------------------------------------------


def machine_extra(device: torch.device) -> dict[str, Any]:
    extra: dict[str, Any] = {"device": str(device)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        extra.update(
            gpu=props.name,
            gpu_capability=f"{props.major}.{props.minor}",
            gpu_memory_gb=round(props.total_memory / 2**30, 1),
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
            cudnn_benchmark=torch.backends.cudnn.benchmark,
        )
        try:  # fp32 convolutions may run as TF32 on Ampere and later
            extra["cudnn_conv_fp32_precision"] = torch.backends.cudnn.conv.fp32_precision
        except AttributeError:
            extra["cudnn_allow_tf32"] = torch.backends.cudnn.allow_tf32
    return extra


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        device, cfg, overrides = check_inputs(args)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    name = (
        torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    )
    print(f"device: {device} ({name})", file=sys.stderr)
    result: dict[str, Any] = {"device": str(device), "throughput": None, "train": None}
    extra = machine_extra(device)

    if not args.skip_throughput:
        print(
            "[1/2] simulator throughput" if not args.skip_train else "[1/1] simulator throughput",
            file=sys.stderr,
        )
        result["throughput"] = throughput(args, device)
        print(throughput_table(result["throughput"]))
        write_result(args.out, result, **extra)
        if device.type == "cuda":
            torch.cuda.empty_cache()

    if args.skip_train:
        print(f"wrote {args.out}", file=sys.stderr)
        return 0
    phase = "[2/2]" if not args.skip_throughput else "[1/1]"
    print(f"{phase} paper protocol, {cfg.epochs:g} epochs (overrides {overrides})", file=sys.stderr)
    run_dir = Path(args.run_dir) if args.run_dir else Path(tempfile.mkdtemp(prefix="localsgd-gpu-"))
    try:
        result["train"] = paper_run(cfg, overrides, run_dir)
        result["train"]["run_dir"] = str(run_dir) if args.run_dir else None
    except Exception as e:  # keep the throughput results; say what failed
        traceback.print_exc()
        first = str(e).splitlines()[0] if str(e) else ""
        error = f"{type(e).__name__}: {first}"
        result["train"] = {"status": "failed", "overrides": overrides, "error": error}
        write_result(args.out, result, **extra)
        print(f"error: the training run failed: {result['train']['error']}", file=sys.stderr)
        return 1
    finally:
        if not args.run_dir:
            shutil.rmtree(run_dir, ignore_errors=True)
    print(train_table(result["train"]))
    result["sharded"] = sharded_case(device)
    write_result(args.out, result, **extra)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


def sharded_case(device: torch.device) -> dict[str, Any]:
    """``benchmarks/sharded.py`` on up to 4 GPUs (it launches torchrun itself), or why not."""
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    if gpus < 2:
        return {"status": "skipped", "reason": f"needs 2 or more GPUs, found {gpus}"}
    world = 4 if gpus >= 4 else 2
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "sharded.json"
        script = Path(__file__).with_name("sharded.py")
        shards = ["1", "2", "4"][: 3 if world == 4 else 2]
        command = [
            sys.executable,
            str(script),
            "--device",
            "cuda",
            "--world",
            str(world),
            "--shards",
            *shards,
        ]
        done = subprocess.run([*command, "--out", str(out)], capture_output=True, text=True)
        if done.returncode != 0:
            return {"status": "failed", "error": (done.stderr.strip().splitlines() or ["?"])[-1]}
        print(done.stdout)
        return {"status": "done", "rows": json.loads(out.read_text())["rows"]}


if __name__ == "__main__":
    sys.exit(main())
