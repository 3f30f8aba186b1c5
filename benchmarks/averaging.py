"""Averaging cost: one model average with localsgd against a raw all_reduce of one flat buffer of
the same bytes (the limit), PyTorch's model averagers and a per-tensor loop, over real gloo ranks.

    python benchmarks/averaging.py --workers 2 4 8 --out benchmarks/results/averaging.json

Starts one torchrun per K (K processes on this machine), times each method side by side in the
same processes (barrier before every repetition; a repetition of a millisecond-scale call times
several calls back to back), and prints min/median/max per method and the ratio of medians to the
raw all_reduce and to a raw all_reduce followed by the division a mean needs.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from common import write_result

CALL_BYTES = 20e6  # a repeat times back-to-back calls of about this many bytes in all


def many_tensor_model() -> nn.Module:
    """About 25M parameters in 160 tensors (ResNet-50 has 25.6M in 161)."""
    return nn.Sequential(*[nn.Linear(560, 560) for _ in range(80)])


def models() -> dict[str, nn.Module]:
    from localsgd.harness.models import build_model

    torch.manual_seed(0)
    return {"resnet20": build_model("resnet20", 10), "25M/160 tensors": many_tensor_model()}


def methods(model: nn.Module) -> dict:
    from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager
    from torch.distributed.algorithms.model_averaging.utils import average_parameters

    from localsgd import DistCommunicator, FlatAverager, Level, LocalSGD, Schedule

    params = list(model.parameters())
    for p in params:  # PyTorch's averagers skip parameters without a gradient
        p.grad = torch.zeros_like(p)
    world = dist.get_world_size()
    flat = torch.zeros(sum(p.numel() for p in params))
    averager = FlatAverager(DistCommunicator())
    averager.pack_([params])  # as the engine does: parameters live in the averager's flat buffers
    grads = [p.grad for p in params]  # other tensors (buffers, optimizer state) take the copy path
    copier = FlatAverager(DistCommunicator())
    # Mini-batch SGD's gradient average as LocalSGD.step() runs it at H = 1, on a copy of the model
    # (LocalSGD packs its parameters); the optimizer holds one tiny tensor, so step() is the average.
    replica = copy.deepcopy(model)
    tiny = min(replica.parameters(), key=lambda p: p.numel())
    minibatch = LocalSGD(torch.optim.SGD([tiny], lr=0.0), replica, Schedule.local(1), comm=DistCommunicator())
    sum(p.sum() for p in replica.parameters()).backward()  # every parameter has a gradient
    with warnings.catch_warnings():  # "period 1: use DDP instead"; here it times one average
        warnings.simplefilter("ignore")
        periodic = PeriodicModelAverager(period=1, warmup_steps=0)

    def per_tensor() -> None:
        with torch.no_grad():
            for p in params:
                dist.all_reduce(p)
                p.div_(world)

    return {
        "raw all_reduce (flat buffer)": lambda: dist.all_reduce(flat),
        "raw all_reduce + division": lambda: (dist.all_reduce(flat), flat.div_(world)),
        "localsgd (packed parameters)": lambda: averager.average_(Level.GLOBAL, [params]),
        "localsgd (copied tensors)": lambda: copier.average_(Level.GLOBAL, [grads]),
        "localsgd gradients (H=1 step)": minibatch.step,
        "torch average_parameters": lambda: average_parameters(iter(params), dist.group.WORLD),
        "torch PeriodicModelAverager": lambda: periodic.average_parameters(iter(params)),
        "per-tensor all_reduce": per_tensor,
    }


def worker(out: Path, repeats: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rows = []
    for name, model in models().items():
        nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
        n = repeats if nbytes < 10e6 else max(3, repeats // 3)
        # Millisecond calls are timed in runs of several back to back: one call alone is at the
        # mercy of the scheduler's tick when K processes share 2 CPUs.
        calls = max(1, round(CALL_BYTES / nbytes))
        for method, fn in methods(model).items():
            m = max(1, calls // 10) if method.startswith("per-tensor") else calls
            for _ in range(2):  # warm-up (connections, buffers)
                fn()
            times = []
            for _ in range(n):
                dist.barrier()
                start = time.perf_counter()
                for _ in range(m):
                    fn()
                times.append((time.perf_counter() - start) / m)
            # Every rank's time counts: a collective is as slow as its slowest participant.
            t = torch.tensor(times, dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            ms = [1000 * x for x in t.tolist()]
            rows.append(
                {
                    "workers": dist.get_world_size(),
                    "model": name,
                    "bytes": nbytes,
                    "tensors": len(list(model.parameters())),
                    "method": method,
                    "repeats": n,
                    "calls_per_repeat": m,
                    "min_ms": min(ms),
                    "median_ms": statistics.median(ms),
                    "max_ms": max(ms),
                }
            )
    if dist.get_rank() == 0:
        out.write_text(json.dumps(rows))
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)  # skip gloo's C++ teardown (see localsgd/harness/cli.py: finish)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--repeats", type=int, default=31)
    p.add_argument("--out", default="benchmarks/results/averaging.json")
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker_out:
        worker(Path(args.worker_out), args.repeats)
        return
    rows = []
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    for k in args.workers:
        part = Path(args.out).with_suffix(f".K{k}.tmp")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={k}",
               __file__, "--repeats", str(args.repeats), "--worker-out", str(part)]  # fmt: skip
        print(f"K={k}: {' '.join(cmd[1:4])} ...", file=sys.stderr)
        subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
        rows += json.loads(part.read_text())
        part.unlink()

    def medians(method: str) -> dict:
        return {(r["workers"], r["model"]): r["median_ms"] for r in rows if r["method"] == method}

    raw, mean = medians("raw all_reduce (flat buffer)"), medians("raw all_reduce + division")
    print(
        f"{'K':>2} {'model':<16} {'method':<30} {'min ms':>9} {'median ms':>9} {'max ms':>9} {'/raw':>6} "
        f"{'/raw+div':>8}"
    )
    for r in rows:
        r["ratio_to_raw"] = r["median_ms"] / raw[(r["workers"], r["model"])]
        r["ratio_to_raw_mean"] = r["median_ms"] / mean[(r["workers"], r["model"])]
        print(
            f"{r['workers']:>2} {r['model']:<16} {r['method']:<30} {r['min_ms']:>9.2f} "
            f"{r['median_ms']:>9.2f} {r['max_ms']:>9.2f} {r['ratio_to_raw']:>6.2f} "
            f"{r['ratio_to_raw_mean']:>8.2f}"
        )
    write_result(args.out, {"rows": rows})
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
