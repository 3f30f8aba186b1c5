"""The outer step against the wire: one DiLoCo sync (pseudo-gradient, mean, outer Nesterov step, copy
back) against a bare mean of the same bytes (all-reduce of one flat buffer and the division), over
2 gloo processes with 1 thread each, measured side by side.

    python benchmarks/outer_step.py --out benchmarks/results/outer_step.json

Models: ResNet-20 (272,474 parameters in 65 tensors) and a GPT of 3.3M parameters (d = 256, 4
blocks). Rows: the whole model (N = 1) and one fragment of N = 4 (Streaming DiLoCo, τ = 0), each
with the bare mean of its own bytes. Every repeat times each row once, in turn (interleaved), a few
calls back to back; the table gives medians and the ratio of each sync to its bare mean.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from common import write_result

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def models() -> dict[str, nn.Module]:
    from localsgd.harness.language import GPT
    from localsgd.harness.models import build_model

    torch.manual_seed(0)
    return {"resnet20": build_model("resnet20", 10), "gpt 3.3M": GPT(256, 256, 4, 4, 64)}


def syncs(model: nn.Module, fragments: int) -> tuple[object, object, int]:
    """(one DiLoCo sync, the bare mean of the same bytes, those bytes) for the whole model (N = 1)
    or one fragment of N."""
    import copy

    from localsgd import Level, LocalSGD, Schedule, diloco

    world = dist.get_world_size()
    replica = copy.deepcopy(model)
    inner = torch.optim.SGD(replica.parameters(), lr=0.0)
    opt = LocalSGD(inner, replica, Schedule.local(1000), outer_optimizer=diloco(), fragments=fragments)
    with torch.no_grad():  # the workers differ: a pseudo-gradient that is not zero
        for p in replica.parameters():
            p.add_(torch.randn_like(p) * 1e-3)
    if fragments == 1:
        nbytes = sum(p.numel() * p.element_size() for p in replica.parameters())

        def sync() -> None:
            opt._average_model(Level.GLOBAL, outer=True)

    else:
        streaming = opt._streaming
        assert streaming is not None
        params = list(replica.parameters())
        nbytes = sum((end - start) * params[i].element_size() for i, start, end in streaming.parts[0])

        def sync() -> None:
            opt._timed(Level.GLOBAL, streaming.start(0, opt.t))
            opt._apply_delayed(streaming.fragments[0])

    flat = torch.zeros(nbytes // 4)

    def bare() -> None:
        dist.all_reduce(flat)
        flat.div_(world)

    return sync, bare, nbytes


def worker(out: Path, repeats: int, calls: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rows = []
    for name, model in models().items():
        for fragments in (1, 4):
            sync, bare, nbytes = syncs(model, fragments)
            timed = {"DiLoCo sync": sync, "bare mean": bare}
            for fn in timed.values():  # warm-up: connections, buffers, the outer state
                fn()
                fn()
            times: dict[str, list[float]] = {key: [] for key in timed}
            for _ in range(repeats):  # interleaved: each repeat times both, in turn
                for key, fn in timed.items():
                    dist.barrier()
                    start = time.perf_counter()
                    for _ in range(calls):
                        fn()
                    times[key].append((time.perf_counter() - start) / calls)
            for key, values in times.items():
                t = torch.tensor(values, dtype=torch.float64)
                dist.all_reduce(t, op=dist.ReduceOp.MAX)  # as slow as the slowest rank
                ms = [1000 * x for x in t.tolist()]
                rows.append(
                    {"model": name, "fragments": fragments, "bytes": nbytes, "method": key,
                     "median_ms": statistics.median(ms), "min_ms": min(ms), "max_ms": max(ms)}
                )  # fmt: skip
    if dist.get_rank() == 0:
        out.write_text(json.dumps(rows))
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=21)
    p.add_argument("--calls", type=int, default=5, help="calls per repeat, back to back")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/outer_step.json"))
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker_out:
        worker(Path(args.worker_out), args.repeats, args.calls)
        return
    tmp = Path(args.out).with_suffix(".rows.tmp")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               __file__, "--repeats", str(args.repeats), "--calls", str(args.calls),
               "--worker-out", str(tmp)]  # fmt: skip
    subprocess.run(command, env=env, check=True)
    rows = json.loads(tmp.read_text())
    tmp.unlink()
    print(f"{'model':10} {'N':>2} {'MB':>6} | {'bare mean ms':>12} {'DiLoCo sync ms':>14} {'ratio':>6}")
    for name in dict.fromkeys(r["model"] for r in rows):
        for n in (1, 4):
            mine = {r["method"]: r for r in rows if r["model"] == name and r["fragments"] == n}
            bare, sync = mine["bare mean"]["median_ms"], mine["DiLoCo sync"]["median_ms"]
            mb = mine["bare mean"]["bytes"] / 1e6
            print(f"{name:10} {n:>2} {mb:6.2f} | {bare:12.3f} {sync:14.3f} {sync / bare:6.2f}")
    write_result(
        args.out, {"workers": 2, "threads": 1, "repeats": args.repeats, "calls": args.calls, "rows": rows}
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
