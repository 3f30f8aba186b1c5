"""Random-kill trials: SIGKILL a training run at a random moment, resume it with --resume, and check
that its final model equals an uninterrupted run's bit for bit.

    python scripts/kill_trials.py --runtime simulator --trials 10
    python scripts/kill_trials.py --runtime torchrun --trials 10
    python scripts/kill_trials.py --runtime torchrun-restart --trials 10

Under torchrun one worker process is killed (torchrun then stops the others) and the run is
started again with --resume. With torchrun-restart nobody starts it again: torchrun
--max-restarts 1 restarts the worker group, which resumes from the last checkpoint by itself.
Prints one row per trial and writes JSON next to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIG = [
    "--dataset", "cifar10", "--data-dir", str(ROOT.parent / "shared/data/cifar-10-batches-py"),
    "--train-subset", "512", "--test-subset", "200", "--workers", "2", "--local-batch-size", "16",
    "--epochs", "6", "--local-steps", "4", "--switch-epoch", "2", "--warmup-epochs", "1", "--seed", "5",
    "--threads", "1", "--ordered-averaging", "true", "--eval-local", "never", "--progress", "false",
]  # fmt: skip


def command(runtime: str, out: Path, resume: bool) -> list[str]:
    run = ["-m", "localsgd", "train", *CONFIG, "--out", str(out), "--resume", str(resume).lower()]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    if runtime == "torchrun":
        return [*torchrun, *run]
    if runtime == "torchrun-restart":
        return [*torchrun, "--max-restarts=1", *run]
    return [sys.executable, *run]


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    return kids


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def run_to_end(runtime: str, out: Path, resume: bool) -> None:
    subprocess.run(command(runtime, out, resume), env=env(), check=True, stdout=subprocess.DEVNULL)


def trial(runtime: str, out: Path, delay: float) -> dict:
    proc = subprocess.Popen(
        command(runtime, out, False), env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    time.sleep(delay)
    victim = proc.pid
    if runtime.startswith("torchrun"):  # a worker, never the torchrun agent (wait until one exists)
        workers: list[int] = []
        while not workers and proc.poll() is None:
            workers = [c for c in children(proc.pid) if b"localsgd" in cmdline(c)]
            time.sleep(0.01)
        victim = workers[-1] if workers else victim
    killed = proc.poll() is None
    if killed:
        os.kill(victim, signal.SIGKILL)
    pointer = out / "checkpoints" / "latest"
    step = json.loads(pointer.read_text())["step"] if pointer.exists() else 0
    if runtime == "torchrun-restart":  # torchrun restarts the group; it must finish by itself
        if proc.wait() != 0:
            raise RuntimeError(f"the restarted run failed (exit code {proc.returncode}) in {out}")
    else:
        proc.wait()
        run_to_end(runtime, out, resume=True)
    return {"delay_s": round(delay, 2), "killed": killed, "resumed_from_step": step}


def same_model(a: Path, b: Path) -> bool:
    ma = torch.load(a / "model.pt", weights_only=True)["model"]
    mb = torch.load(b / "model.pt", weights_only=True)["model"]
    return ma.keys() == mb.keys() and all(torch.equal(ma[k], mb[k]) for k in ma)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runtime", choices=["simulator", "torchrun", "torchrun-restart"], default="simulator")
    p.add_argument("--trials", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="/tmp/localsgd-kill-trials")
    args = p.parse_args()
    root = Path(args.out) / args.runtime
    rng = random.Random(args.seed)
    reference = root / "reference"
    if not (reference / "model.pt").exists():
        start = time.perf_counter()
        run_to_end(args.runtime, reference, resume=False)
        (reference / "duration_s").write_text(str(time.perf_counter() - start))
    duration = float((reference / "duration_s").read_text())  # kills fall in 10-100% of it
    rows = []
    print(f"{'trial':>5} {'kill after s':>12} {'killed':>6} {'resumed from step':>17} {'bitwise equal':>13}")
    for i in range(args.trials):
        out = root / f"trial-{i}"
        if out.exists():
            subprocess.run(["rm", "-rf", str(out)], check=True)
        row = trial(args.runtime, out, rng.uniform(0.1, 1.0) * duration)
        row["equal"] = same_model(reference, out)
        rows.append(row)
        cells = (i, row["delay_s"], row["killed"], row["resumed_from_step"], row["equal"])
        print("{:>5} {:>12} {!s:>6} {:>17} {!s:>13}".format(*cells))
    equal = sum(r["equal"] for r in rows)
    print(f"{equal} of {len(rows)} trials ended bit for bit equal to the uninterrupted run ({args.runtime})")
    (root / "trials.json").write_text(
        json.dumps({"config": CONFIG, "runtime": args.runtime, "rows": rows}, indent=1)
    )


if __name__ == "__main__":
    main()
