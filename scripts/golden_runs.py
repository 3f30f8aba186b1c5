"""Short runs that cover every path of the harness, for checking that a refactor changes no bit.

    python scripts/golden_runs.py runs/golden-before            # before the change
    python scripts/golden_runs.py runs/golden-after --against runs/golden-before

Each case is one ``localsgd train`` (in the simulator, or as 2 gloo processes under torchrun)
with one thread per process, so two recordings on the same machine are comparable bit for bit.
With ``--against``, every run is compared with the one of the same name there by
``scripts/compare_runs.py`` (metrics rows without timings, summaries, every tensor of every model
file); exits with 1 if any differs. A recording is only valid on the CPU that made it: another
CPU's kernels round differently.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
COMPARE = Path(__file__).resolve().parent / "compare_runs.py"

IMAGE = [
    "--dataset", "cifar10", "--data-dir", str(DATA / "cifar-10-batches-py"), "--model", "resnet8",
    "--train-subset", "512", "--test-subset", "256", "--local-batch-size", "16", "--epochs", "2",
    "--warmup-epochs", "0.5", "--decay-at", "0.5", "--eval-local", "final",
]  # fmt: skip
TEXT = [
    "--dataset", "text", "--data-dir", str(DATA / "sotu"), "--seq-len", "32", "--width", "32",
    "--depth", "2", "--local-batch-size", "4", "--epochs", "0.002", "--optimizer", "adamw",
    "--peak-lr", "3e-3", "--warmup-epochs", "0.0005", "--lr-schedule", "cosine", "--test-subset", "64",
    "--row-steps", "8",
]  # fmt: skip

# name: (processes under torchrun, or 0 for the simulator; settings)
CASES: dict[str, tuple[int, list[str]]] = {
    "image-post-local": (0, [*IMAGE, "--workers", "4", "--local-steps", "4", "--switch-epoch", "first-decay",
                             "--save-models-at", "1"]),
    "image-hierarchical": (0, [*IMAGE, "--workers", "4", "--local-steps", "2", "--workers-per-block", "2",
                               "--block-steps", "2", "--buffers", "average", "--optimizer-state", "average"]),
    "image-diloco-int8-overlap": (0, [*IMAGE, "--workers", "4", "--local-steps", "4",
                                      "--outer-optimizer", "diloco", "--compress", "int8",
                                      "--overlap-steps", "1"]),
    "text-gpt": (0, [*TEXT, "--model", "gpt", "--workers", "2", "--local-steps", "4", "--max-grad-norm", "1",
                     "--eval-every", "2"]),
    "text-lstm-slowmo": (0, [*TEXT, "--model", "lstm", "--workers", "2", "--local-steps", "4",
                             "--outer-optimizer", "slowmo"]),
    "gloo-image-post-local": (2, [*IMAGE, "--local-steps", "4", "--switch-epoch", "first-decay",
                                  "--ordered-averaging"]),
    "gloo-text-diloco-int8-overlap": (2, [*TEXT, "--model", "gpt", "--local-steps", "4",
                                          "--outer-optimizer", "diloco", "--compress", "int8",
                                          "--overlap-steps", "1", "--ordered-averaging"]),
}  # fmt: skip


def record(name: str, out: Path) -> None:
    nproc, settings = CASES[name]
    args = [*settings, "--threads", "1", "--seed", "3", "--out", str(out), "--no-progress"]
    if nproc:
        torchrun = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
        launch = [*torchrun, "-m", "localsgd"]
    else:
        launch = ["-m", "localsgd"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, *launch, "train", *args], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{name} failed ({done.returncode}):\n{done.stdout[-2000:]}{done.stderr[-4000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder for the runs (one folder per case); must not exist")
    parser.add_argument("--against", type=Path, help="an earlier recording to compare every run with")
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), help="only these cases (default: all)")
    args = parser.parse_args()
    if args.out.exists():
        sys.exit(f"error: {args.out} exists; give a new folder")
    if args.against is not None and not args.against.is_dir():
        sys.exit(f"error: --against {args.against} is not a folder")
    ok = True
    for name in args.cases or CASES:
        print(f"{name}: running", flush=True)
        record(name, args.out / name)
        if args.against is not None:
            pair = [str(args.against / name), str(args.out / name)]
            done = subprocess.run([sys.executable, str(COMPARE), *pair])
            ok &= done.returncode == 0
    if args.against is not None:
        print("every run equal" if ok else "SOME RUNS DIFFER")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
