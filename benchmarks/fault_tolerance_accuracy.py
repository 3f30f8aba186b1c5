"""Accuracy with one failure: the ``cifar10-ft`` study's runs (cifar10-outer's post-local H=16 and
DiLoCo: ResNet-8, CIFAR-10, K = 16, B_loc = 32, 16 epochs, t' at the first decay, per-step random
streams) as 16 ``localsgd train --fault-tolerant`` processes, one of them SIGKILLed at a step drawn
from the seed and started again at once with its command; beside the same runs without a failure
(``localsgd study cifar10-ft``, the simulator, which equals fault-tolerant workers without faults).

    python benchmarks/fault_tolerance_accuracy.py run --method diloco --seeds 1 2 3
    localsgd study cifar10-ft --threads 1 --data-dir ../shared/data/cifar-10-batches-py
    python benchmarks/fault_tolerance_accuracy.py summary --study runs/study-cifar10-ft

``run`` appends one row per (method, seed) to the JSON (a piece already there is skipped): the
worker killed and the step of its last round, where and how fast it healed, the rounds discarded,
the fewest workers in a round, whether all 16 final models are equal, the final and per-epoch test
accuracy. ``summary`` pairs them by seed with the study's runs. One thread per worker process;
the machine should be otherwise idle.
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
from typing import Any

import torch

from common import ROOT, write_result

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fault_tolerance import read_jsonl, start_lighthouse

from localsgd.harness import studies
from localsgd.harness.config import Config
from localsgd.harness.stats import paired

STUDY = "cifar10-ft"
RESULT = ROOT / "benchmarks" / "results" / "fault-tolerance-accuracy.json"


def settings_file(method: str, seed: int, data_dir: str, path: Path) -> None:
    """The study's settings of (method, seed) as a TOML file, only those that differ from the defaults
    (a fault-tolerant worker refuses settings it does not use, such as checkpoint_every)."""
    cfg = studies.get(STUDY).config(method, seed, data_dir, threads=1).to_dict()
    defaults = Config().to_dict()
    lines = []
    for name, value in cfg.items():
        if value is None or value == defaults[name] or name in ("resume", "out"):
            continue
        lines.append(f"{name} = {json.dumps(value)}")
    path.write_text("\n".join(lines) + "\n")


def last_step(rounds: Path) -> int:
    """The step of a worker's last round record (-1 before its first)."""
    try:
        lines = rounds.read_text().splitlines()
    except FileNotFoundError:
        return -1
    for line in reversed(lines):
        try:
            return int(json.loads(line)["t"])
        except (ValueError, KeyError):
            continue  # a line being written
    return -1


def run_piece(method: str, seed: int, data_dir: str, work: Path, workers: int) -> dict[str, Any]:
    """One run of 16 fault-tolerant workers, one killed and restarted; returns its row."""
    total = studies.get(STUDY).config(method, seed, data_dir).epochs
    steps_per_epoch = 50_000 // (workers * 32)
    rng = random.Random(f"{method}-{seed}")
    victim, kill_at = (
        rng.randrange(workers),
        rng.randrange(steps_per_epoch, int(total * steps_per_epoch) - 32),
    )
    out = studies.run_dir(work, method, seed)
    out.mkdir(parents=True, exist_ok=False)
    settings_file(method, seed, data_dir, out / "settings.toml")
    # a round waits up to 120 s for a live worker (16 evaluations on 2 cores lag by seconds); a dead
    # one is dropped 5 s after its last heartbeat
    lighthouse, address = start_lighthouse(out, join_timeout_ms=120_000, heartbeat_timeout_ms=5000)
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE")}
    env["OMP_NUM_THREADS"] = "1"
    starts = dict.fromkeys(range(workers), 0)

    def start(k: int) -> subprocess.Popen:
        starts[k] += 1
        log = (out / f"log-{k}-{starts[k]}.txt").open("w")
        args = ["--config", str(out / "settings.toml"), "--fault-tolerant", "--worker", str(k),
                "--lighthouse", address, "--out", str(out / "ft"),
                "--startup-timeout", "600"]  # fmt: skip
        return subprocess.Popen(
            [sys.executable, "-m", "localsgd", "train", *args], env=env, stdout=log, stderr=log
        )

    began = time.time()
    procs = {k: start(k) for k in range(workers)}
    killed: dict[str, Any] | None = None
    rounds = out / "ft" / f"worker-{victim}" / "rounds.jsonl"
    try:
        while procs:
            if killed is None and last_step(rounds) >= kill_at:
                procs[victim].send_signal(signal.SIGKILL)
                procs[victim].wait()
                killed = {"worker": victim, "after_step": last_step(rounds), "time": time.time()}
                print(f"  killed worker {victim} after step {killed['after_step']}", flush=True)
                procs[victim] = start(victim)
            for k, p in list(procs.items()):
                rc = p.poll()
                if rc is not None:
                    del procs[k]
                    if rc != 0:
                        raise SystemExit(f"{out}: worker {k} exited with {rc}; see log-{k}-{starts[k]}.txt")
            time.sleep(0.1)
    finally:
        for p in procs.values():
            p.kill()
        lighthouse.kill()
        lighthouse.wait()
    assert killed is not None, "the run ended before the kill step"
    return analyse(out / "ft", method, seed, workers, killed, time.time() - began)


def analyse(ft: Path, method: str, seed: int, workers: int, killed: dict, seconds: float) -> dict[str, Any]:
    records = [r for k in range(workers) for r in read_jsonl(ft / f"worker-{k}" / "rounds.jsonl")]
    heal = next(r for r in records if r["heals"] and r["worker"] == killed["worker"])
    discarded = sorted({(r["t"], r["kind"]) for r in records if not r["committed"]})
    models = [torch.load(ft / f"worker-{k}" / "model.pt")["model"] for k in range(workers)]
    equal = all(torch.equal(models[0][n], m[n]) for m in models[1:] for n in models[0])
    survivor = next(k for k in range(workers) if k != killed["worker"])  # (its rows span the run)
    rows = read_jsonl(ft / f"worker-{survivor}" / "metrics.jsonl")
    summary = json.loads((ft / f"worker-{survivor}" / "summary.json").read_text())
    survivors = [k for k in range(workers) if k != killed["worker"]]
    finals = {
        json.loads((ft / f"worker-{k}" / "summary.json").read_text())["final_test_acc"] for k in survivors
    }
    return {
        "method": method,
        "seed": seed,
        "killed": {"worker": killed["worker"], "after_step": killed["after_step"]},
        "healed": {
            "t": heal["t"],
            "kind": heal["kind"],
            "source": heal["heals"][0][1],
            "seconds": heal.get("heal_seconds"),
            "after_kill_s": heal["time"] - killed["time"],
        },
        "rounds_discarded": [list(d) for d in discarded],
        "fewest_members": min(len(r["members"]) for r in records),
        "final_models_equal": equal,
        "final_test_acc": summary["final_test_acc"],
        "survivors_agree": len(finals) == 1,  # (every survivor evaluated the same final average)
        "averaged_over": summary["averaged_over"],
        "test_acc": [r.get("test_acc") for r in rows],
        "wall_seconds": seconds,
    }


def reanalyse(args: argparse.Namespace) -> None:
    """Recompute the rows of finished runs from their folders (the kill's record is kept)."""
    result = json.loads(RESULT.read_text())
    for i, row in enumerate(result["runs"]):
        ft = studies.run_dir(Path(args.work), row["method"], row["seed"]) / "ft"
        victim = row["killed"]["worker"]
        heal = next(r for r in read_jsonl(ft / f"worker-{victim}" / "rounds.jsonl") if r["heals"])
        killed = {**row["killed"], "time": heal["time"] - row["healed"]["after_kill_s"]}
        result["runs"][i] = analyse(ft, row["method"], row["seed"], 16, killed, row["wall_seconds"])
    write_result(RESULT, {"runs": result["runs"]}, threads_per_process=1, processes=16)


def run(args: argparse.Namespace) -> None:
    result = json.loads(RESULT.read_text()) if RESULT.exists() else {"runs": []}
    for seed in args.seeds:
        if any(r["method"] == args.method and r["seed"] == seed for r in result["runs"]):
            print(f"{args.method} seed {seed}: done, skipped")
            continue
        print(f"{args.method} seed {seed}: 16 workers ...", flush=True)
        row = run_piece(args.method, seed, args.data_dir, Path(args.work), 16)
        healed, minutes = row["healed"], row["wall_seconds"] / 60
        print(f"  final test accuracy {row['final_test_acc']:.4f}, healed at t={healed['t']} "
              f"({healed['after_kill_s']:.1f} s after the kill), {minutes:.1f} min")  # fmt: skip
        result["runs"].append(row)
        write_result(RESULT, {"runs": result["runs"]}, threads_per_process=1, processes=16)


def summary(args: argparse.Namespace) -> None:
    runs = json.loads(RESULT.read_text())["runs"]
    table = []
    for method in studies.get(STUDY).methods:
        pairs = []
        for r in (r for r in runs if r["method"] == method):
            plain = studies.run_dir(Path(args.study), method, r["seed"]) / "summary.json"
            if plain.exists():
                pairs.append((r["final_test_acc"], json.loads(plain.read_text())["final_test_acc"]))
        if not pairs:
            continue
        failed, plain = [a for a, _ in pairs], [b for _, b in pairs]
        comparison = paired([a - b for a, b in pairs])
        table.append({"method": method, "seeds": len(pairs), "with_failure": failed, "without": plain,
                      "paired": comparison})  # fmt: skip
        print(f"{method}: with a failure {failed}, without {plain}, paired {comparison}")
    (RESULT.parent / "fault-tolerance-accuracy-summary.json").write_text(json.dumps(table, indent=1) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="mode", required=True)
    r = sub.add_parser("run", help="the runs with one failure")
    r.add_argument("--method", choices=list(studies.get(STUDY).methods), required=True)
    r.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    r.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data" / "cifar-10-batches-py"))
    r.add_argument("--work", default="runs/ft-accuracy", help="where the runs' folders go")
    a = sub.add_parser("reanalyse", help="recompute the rows of finished runs from their folders")
    a.add_argument("--work", default="runs/ft-accuracy")
    s = sub.add_parser("summary", help="pair them with the study's runs without a failure")
    s.add_argument("--study", default="runs/study-cifar10-ft")
    args = parser.parse_args()
    {"run": run, "reanalyse": reanalyse, "summary": summary}[args.mode](args)


if __name__ == "__main__":
    main()
