"""Simulator overhead: K replicas with B_loc samples each against one model on the same K * B_loc
samples per step (ResNet-20, CIFAR-sized random inputs, fp32 channels_last, SGD with Nesterov
momentum), throughput and peak memory, each configuration in its own process.

    python benchmarks/simulator.py --workers 16 --local-batch-size 128 --out benchmarks/results/simulator.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as F

from common import write_result

ROOT = Path(__file__).resolve().parents[1]


def measure(config: str, workers: int, batch: int, steps: int, repeats: int) -> dict:
    from localsgd import Schedule, Simulator
    from localsgd.harness.models import build_model
    from localsgd.harness.optim import sgd

    torch.manual_seed(0)
    model = build_model("resnet20", 10).to(memory_format=torch.channels_last)

    def make_opt(m):
        return sgd(m, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-4)

    total = workers * batch
    x = torch.randn(total, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (total,))
    if config == "one model":
        opt = make_opt(model)

        def step() -> None:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()

    else:
        h = {"simulator H=1": 1, "simulator H=16": 16}[config]
        sim = Simulator(model, make_opt, Schedule.local(h), workers)
        xs, ys = x.split(batch), y.split(batch)

        def step() -> None:
            for k, m in enumerate(sim.models):
                F.cross_entropy(m(xs[k]), ys[k]).backward()
            sim.step()
            sim.zero_grad()

    for _ in range(2):
        step()
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            step()
        rates.append(steps * total / (time.perf_counter() - start))
    return {
        "config": config,
        "workers": workers,
        "local_batch_size": batch,
        "images_per_step": total,
        "img_per_s": rates,
        "median_img_per_s": statistics.median(rates),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=16)
    p.add_argument("--local-batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="benchmarks/results/simulator.json")
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        row = measure(args.one, args.workers, args.local_batch_size, args.steps, args.repeats)
        print(json.dumps(row))
        return
    rows = []
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for config in ("one model", "simulator H=1", "simulator H=16"):
        cmd = [sys.executable, __file__, "--one", config, "--workers", str(args.workers),
               "--local-batch-size", str(args.local_batch_size), "--steps", str(args.steps),
               "--repeats", str(args.repeats)]  # fmt: skip
        print(f"measuring {config} ...", file=sys.stderr)
        rows.append(
            json.loads(subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout)
        )
    base = rows[0]["median_img_per_s"]
    head = ("configuration", "img/s min", "median", "max", "vs one model", "peak RSS MB")
    print("{:<16} {:>9} {:>8} {:>8} {:>12} {:>11}".format(*head))
    for r in rows:
        r["ratio_to_one_model"] = r["median_img_per_s"] / base
        print(
            f"{r['config']:<16} {min(r['img_per_s']):>9.0f} {r['median_img_per_s']:>8.0f} "
            f"{max(r['img_per_s']):>8.0f} {r['ratio_to_one_model']:>12.3f} {r['peak_rss_mb']:>11.0f}"
        )
    write_result(args.out, {"rows": rows}, threads=torch.get_num_threads())


if __name__ == "__main__":
    main()
