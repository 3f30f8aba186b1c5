"""Compressed averaging of ResNet-20 pseudo-gradients: bytes per average (as the engine counts them)
and the error of one compressed mean against the exact mean, for each codec and K.

    python benchmarks/compression.py --workers 2 4 8 --out benchmarks/results/compression.json

For each K, K simulated ResNet-20 workers take 4 local SGD steps from the same start on their own
random batches (so their pseudo-gradients differ as in training), then one global average; the
same run with plain averaging gives the exact mean. Reported per codec: bytes each worker
contributed (engine counter; the wire carries 2(K-1)/K of it, as a ring all-reduce does of fp32),
the ratio to fp32, and the relative error |θ_codec - θ_exact| / |Δ_exact| of the averaged
parameters, where Δ_exact is the exact mean pseudo-gradient (what the average moves the model by).
Counts and errors, not times: the wire time of each codec needs the emulated-network benchmark.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.nn import functional as F

from common import write_result

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's localsgd

CODECS = (None, "bf16", "fp16", "int8", "sign")
H = 4


def sgd(m: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)


def measure(workers: int, seed: int) -> list[dict]:
    """One global average per codec, from identical workers' states."""
    from localsgd import Schedule, Simulator
    from localsgd.harness.models import build_model

    results: dict[str | None, tuple[list[torch.Tensor], int]] = {}
    start: list[torch.Tensor] = []
    for codec in CODECS:
        torch.manual_seed(seed)
        model = build_model("resnet20", 10)
        start = [p.detach().clone() for p in model.parameters()]
        sim = Simulator(model, sgd, Schedule.local(H), workers, compression=codec)
        g = torch.Generator().manual_seed(seed + 1)
        for _ in range(H):
            for m in sim.models:
                x, y = torch.randn(32, 3, 32, 32, generator=g), torch.randint(0, 10, (32,), generator=g)
                F.cross_entropy(m(x), y).backward()
            sim.step()
            sim.zero_grad()
        assert sim.stats["global"].rounds == 1
        results[codec] = ([p.detach().clone() for p in sim.models[0].parameters()], sim.stats["global"].bytes)
    exact, fp32_bytes = results[None]
    delta = torch.cat([(s - e).reshape(-1) for s, e in zip(start, exact, strict=True)]).norm()
    rows = []
    for codec, (params, nbytes) in results.items():
        error = torch.cat([(p - e).reshape(-1) for p, e in zip(params, exact, strict=True)]).norm()
        rows.append({
            "workers": workers, "codec": codec or "fp32 (plain)", "bytes": nbytes,
            "ratio_to_fp32": fp32_bytes / nbytes, "relative_error": float(error / delta),
        })  # fmt: skip
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="benchmarks/results/compression.json")
    args = p.parse_args()
    if any(k < 2 for k in args.workers):
        p.error(f"--workers must be >= 2 (one worker averages nothing), got {args.workers}")
    torch.set_num_threads(args.threads)
    rows = []
    print(f"{'K':>3} {'codec':<13} {'bytes/average':>13} {'vs fp32':>8} {'rel. error':>10}")
    for k in args.workers:
        for r in measure(k, args.seed):
            rows.append(r)
            line = f"{k:>3} {r['codec']:<13} {r['bytes']:>13} {r['ratio_to_fp32']:>7.2f}x"
            print(f"{line} {r['relative_error']:>10.2e}")
    write_result(args.out, {"model": "resnet20", "local_steps": H, "rows": rows})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
