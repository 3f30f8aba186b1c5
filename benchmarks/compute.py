"""Compute speed of one worker: ResNet-20 training steps (forward, backward, SGD with Nesterov
momentum) on CIFAR-sized batches, plain fp32 eager against what localsgd's training loop uses.

    python benchmarks/compute.py --batch 128 --threads 2 --out benchmarks/results/compute.json

All configurations run in one process, interleaved repeat by repeat (a noisy machine slows them
alike). Rows:

- fp32 eager: the model and inputs in the default (contiguous) layout, a bare loop.
- fp32 channels_last: model and inputs channels_last, a bare loop.
- fp32 channels_last + LocalSGD: as the harness trains under torchrun, through the ``LocalSGD``
  wrapper (one worker, H = 16), whose parameters are packed (contiguous) in flat buffers.
- ..., channels_last weights: the same with the convolution weights put back into channels_last
  after packing (and no average, which would pack them again): what packing costs, if anything.
- + augmentation: the same plus the harness's per-step data path (random crop and flip,
  normalisation, on uint8 images held in memory).
- bf16 autocast + channels_last: the speed mode. Where the CPU has no native bf16 (AVX-512 BF16
  or AMX), oneDNN falls back to slow kernels; the row says so.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.nn import functional as F

from common import write_result

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIGS = (
    "fp32 eager",
    "fp32 channels_last",
    "fp32 channels_last + LocalSGD",
    "fp32 channels_last + LocalSGD, channels_last weights",
    "fp32 channels_last + LocalSGD + augmentation",
    "bf16 autocast + channels_last",
)


def make_step(config: str, batch: int) -> Callable[[], None]:
    from localsgd import LocalSGD, Schedule
    from localsgd.harness.data import MEAN_STD, augment
    from localsgd.harness.models import build_model
    from localsgd.harness.optim import sgd

    torch.manual_seed(0)
    model = build_model("resnet20", 10)
    cl = config != "fp32 eager"
    fmt = torch.channels_last if cl else torch.contiguous_format
    model = model.to(memory_format=fmt)
    opt = sgd(model, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-4)
    relaid = "channels_last weights" in config
    if "LocalSGD" in config:  # H = 16, or no average at all when the weights are laid out again
        opt = LocalSGD(opt, model, Schedule.local(10**9 if relaid else 16))
    if relaid:  # undo the packing's contiguous layout
        for p in model.parameters():
            if p.dim() == 4:
                p.data = p.data.contiguous(memory_format=torch.channels_last)
    images = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8)
    gen = torch.Generator().manual_seed(0)
    mean, std = MEAN_STD["cifar10"]
    x0 = augment(images, gen, mean, std).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (batch,))
    bf16 = config.startswith("bf16")
    with_data = "augmentation" in config

    def step() -> None:
        x = augment(images, gen, mean, std).contiguous(memory_format=fmt) if with_data else x0
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()

    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=4, help="steps per repeat")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS, metavar="CONFIG")
    p.add_argument("--out", default="benchmarks/results/compute.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    native_bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    steps = {c: make_step(c, args.batch) for c in args.configs}
    for step in steps.values():  # warm-up: allocator, oneDNN primitive caches
        step()
        step()
    rates: dict[str, list[float]] = {c: [] for c in args.configs}
    for r in range(args.repeats):
        for c, step in steps.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            rates[c].append(args.steps * args.batch / (time.perf_counter() - start))
        print(f"repeat {r + 1}/{args.repeats}", file=sys.stderr)
    base = statistics.median(rates[args.configs[0]])
    rows = []
    print(f"{'configuration':<54} {'img/s min':>9} {'median':>8} {'max':>8} {'vs first':>9}")
    for c in args.configs:
        med = statistics.median(rates[c])
        slow = c.startswith("bf16") and not native_bf16
        note = " (no native bf16 on this CPU: slow kernels)" if slow else ""
        rows.append({"config": c, "img_per_s": rates[c], "median_img_per_s": med, "ratio": med / base,
                     "note": note.strip(" ()")})  # fmt: skip
        print(f"{c:<54} {min(rates[c]):>9.0f} {med:>8.0f} {max(rates[c]):>8.0f} {med / base:>9.2f}{note}")
    cpuinfo = Path("/proc/cpuinfo")
    flags = (
        sorted({f for f in cpuinfo.read_text().split() if f.startswith(("avx512", "amx"))})
        if cpuinfo.exists()
        else None
    )
    result = {"batch": args.batch, "steps_per_repeat": args.steps, "rows": rows}
    extra = {"processor": platform.processor(), "threads": args.threads, "native_bf16": native_bf16}
    write_result(args.out, result, **extra, cpu_flags_avx512=flags)
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
