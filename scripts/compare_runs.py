"""Compare two run directories bit for bit: a reproduction against the original.

    python scripts/compare_runs.py runs/study-cifar10-long-local/post-local_H16/seed-1 \
        runs/repro/post-local_H16/seed-1

Compares every line of `metrics.jsonl`, `summary.json` and every sharpness JSON (`sharpness.json`,
`models/*.json`) field by field, leaving out wall-clock timings and the run's own path, and every
tensor of every model file (`model.pt`, `models/*.pt`) with `torch.equal`. `config.json` is left
out: it names the run's own output directory. Prints one row per file and exits with 1 if anything
differs or is in one run only.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from localsgd.harness.rundir import TIMING_FIELDS

# Wall-clock measurements and the run's own location differ between any two runs.
IGNORED = {*TIMING_FIELDS, "run"}


def strip(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in IGNORED}


def tensors(obj: object, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor in a nested dict/list, by its path."""
    if torch.is_tensor(obj):
        return {prefix: obj}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else []
    out: dict[str, torch.Tensor] = {}
    for k, v in items:
        out.update(tensors(v, f"{prefix}/{k}"))
    return out


def compare_metrics(a: Path, b: Path) -> str:
    la, lb = a.read_text().splitlines(), b.read_text().splitlines()
    if len(la) != len(lb):
        return f"different: {len(la)} lines against {len(lb)}"
    pairs = enumerate(zip(la, lb, strict=True), start=1)
    bad = [i for i, (x, y) in pairs if strip(json.loads(x)) != strip(json.loads(y))]
    return f"different in {len(bad)} lines, first {bad[0]}" if bad else f"equal ({len(la)} lines)"


def compare_json(a: Path, b: Path) -> str:
    return "equal" if strip(json.loads(a.read_text())) == strip(json.loads(b.read_text())) else "different"


def compare_model(a: Path, b: Path) -> str:
    ta = tensors(torch.load(a, map_location="cpu", weights_only=False))
    tb = tensors(torch.load(b, map_location="cpu", weights_only=False))
    if ta.keys() != tb.keys():
        return "different tensors"
    bad = [k for k in ta if not torch.equal(ta[k], tb[k])]
    n = sum(t.numel() for t in ta.values())
    return f"different in {len(bad)} tensors" if bad else f"equal ({len(ta)} tensors, {n} values)"


def files(run: Path) -> set[str]:
    """The files compared, relative to the run directory."""
    patterns = ("*.pt", "*.json", "models/*.pt", "models/*.json")
    found = {f.relative_to(run).as_posix() for pattern in patterns for f in run.glob(pattern)}
    return {"metrics.jsonl"} | found - {"config.json"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("original", type=Path)
    parser.add_argument("reproduction", type=Path)
    args = parser.parse_args()
    for d in (args.original, args.reproduction):
        if not (d / "metrics.jsonl").is_file():
            sys.exit(f"error: {d} is not a run directory (no metrics.jsonl)")
    names = sorted(files(args.original) | files(args.reproduction), key=lambda n: (n != "metrics.jsonl", n))
    check = {".jsonl": compare_metrics, ".json": compare_json, ".pt": compare_model}
    ok = True
    for name in names:
        a, b = args.original / name, args.reproduction / name
        result = check[a.suffix](a, b) if a.is_file() and b.is_file() else "missing in one of them"
        ok &= result.startswith("equal")
        print(f"{name:<24} {result}")
    print("all equal" if ok else "DIFFERENT")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
