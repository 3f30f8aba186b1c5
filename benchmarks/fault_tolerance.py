"""Fault tolerance on torchft (``localsgd.ft``), measured: a lighthouse and K worker processes on
this machine, one worker SIGKILLed at a seeded step and restarted.

    python benchmarks/fault_tolerance.py trials --method diloco --trials 10
    python benchmarks/fault_tolerance.py trials --method post-local --trials 10
    python benchmarks/fault_tolerance.py heal --models resnet20 gpt gpt-25m

``trials``: K = 3 workers of a small MLP with an emulated compute time per step (``--step-ms``:
a sleep, so that the times measured are the protocol's, not two cores shared by three
processes); worker 1 is killed after a step drawn from the trial's seed and restarted at once.
Per trial: the time from the kill to the survivors' next committed round, the survivors' step
times around it, the rounds they discarded, the restarted worker's time to rejoin and its heal's
transfer time, whether all workers end equal, and whether the simulator's replay of the logged
membership gives the same models bit for bit.

``heal``: K = 2 workers of a real model (DiLoCo; SGD with momentum, or AdamW for the GPTs) on
random data; worker 1 is killed and restarted: the seconds its heal took (torchft's HTTP
checkpoint transfer, then loading) against the bytes it received.

Worker processes use one thread each; the lighthouse uses torchft's own CLI.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from common import ROOT, write_result

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from localsgd import LocalSGD, Schedule, Simulator, diloco
from localsgd.ft import FaultTolerantCommunicator
from localsgd.membership import merge

H = 8  # local steps between global rounds
SWITCH = 40  # post-local: t'


# --- what a worker trains ------------------------------------------------------------------------


def make_model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == "mlp":
        return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 8))
    if name == "resnet20":
        from localsgd.harness.models import build_model

        return build_model("resnet20", 10)
    from localsgd.harness.language import GPT

    width, depth, heads = (128, 4, 4) if name == "gpt" else (512, 8, 8)  # the sotu GPT; 25.8M
    return GPT(256, width, depth, heads, 64)


def make_optimizer(name: str):
    def make(model: torch.nn.Module) -> torch.optim.Optimizer:
        if name.startswith("gpt"):
            return torch.optim.AdamW(model.parameters(), lr=1e-3)
        return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    return make


def schedule_of(method: str) -> Schedule:
    return Schedule.post_local(H, switch_step=SWITCH) if method == "post-local" else Schedule.local(H)


def policy_of(method: str) -> dict[str, Any]:
    return {"outer_optimizer": diloco()} if method == "diloco" else {}


def loss(name: str, model: torch.nn.Module, worker: int, t: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(10_000 * worker + t)
    if name == "mlp":
        x = torch.randn(32, 32, generator=g)
        return torch.nn.functional.mse_loss(model(x), x[:, :8].tanh())
    if name == "resnet20":
        x, y = torch.randn(32, 3, 32, 32, generator=g), torch.randint(0, 10, (32,), generator=g)
        return torch.nn.functional.cross_entropy(model(x), y)
    tokens = torch.randint(0, 256, (8, 65), generator=g)
    logits = model(tokens[:, :-1])
    return torch.nn.functional.cross_entropy(logits.reshape(-1, 256), tokens[:, 1:].reshape(-1))


def tensor_bytes(state: Any) -> int:
    if torch.is_tensor(state):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(tensor_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(tensor_bytes(v) for v in state)
    return 0


def worker(args: argparse.Namespace) -> None:
    """One worker process (started by the driver)."""
    started = time.time()
    torch.set_num_threads(1)
    out, k = Path(args.out), args.worker
    rounds = (out / f"rounds-{k}.jsonl").open("a")

    def on_round(record: dict) -> None:
        rounds.write(json.dumps({**record, "time": time.time()}) + "\n")
        rounds.flush()

    comm = FaultTolerantCommunicator(k, args.workers, lighthouse=args.lighthouse, on_round=on_round)
    transport = comm.manager._checkpoint_transport  # (timed: the heal's transfer)
    receive = transport.recv_checkpoint

    def timed_receive(*a: Any, **kw: Any) -> Any:
        start = time.perf_counter()
        state = receive(*a, **kw)
        heal = {"transfer_seconds": time.perf_counter() - start, "bytes": tensor_bytes(state)}
        (out / f"heal-{k}-{os.getpid()}.json").write_text(json.dumps(heal))
        return state

    transport.recv_checkpoint = timed_receive
    model = make_model(args.model)
    opt = LocalSGD(make_optimizer(args.model)(model), model, schedule_of(args.method), comm=comm,
                   **policy_of(args.method))  # fmt: skip
    steps = (out / f"steps-{k}.jsonl").open("a")
    steps.write(json.dumps({"event": "joined", "t": opt.t, "time": time.time(), "started": started}) + "\n")
    steps.flush()
    (out / f"joined-{k}-{os.getpid()}").touch()
    stop = None
    while stop is None or opt.t < stop:
        t = opt.t
        if stop is None and t % H == 0 and (out / "ready").exists():
            stop = int((out / "ready").read_text())
        begin = time.perf_counter()
        loss(args.model, model, k, t).backward()
        opt.step()
        opt.zero_grad()
        time.sleep(max(0.0, args.step_ms / 1000 - (time.perf_counter() - begin)))
        steps.write(json.dumps({"t": t, "time": time.time()}) + "\n")
        steps.flush()
        if t == args.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
    torch.save(model.state_dict(), out / f"final-{k}.pt")
    comm.shutdown()
    os._exit(0)  # (gloo's static destructors can abort at exit)


# --- the driver ----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_lighthouse(
    out: Path, join_timeout_ms: int = 1000, heartbeat_timeout_ms: int = 1000
) -> tuple[subprocess.Popen, str]:
    """A torchft lighthouse (its own CLI) on a free port, logging to ``out/lighthouse.txt``, and its
    address."""
    port = free_port()
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "torchft_lighthouse"), "--bind", f"127.0.0.1:{port}",
         "--min_replicas", "1", "--join_timeout_ms", str(join_timeout_ms), "--quorum_tick_ms", "10",
         "--heartbeat_timeout_ms", str(heartbeat_timeout_ms)],
        stdout=(out / "lighthouse.txt").open("w"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    return process, f"http://127.0.0.1:{port}"


def scratch(work: str, name: str) -> Path:
    """A new folder for one run under ``work`` (never one an earlier invocation left there)."""
    Path(work).mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"{name}-", dir=work)) / "run"


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def run_once(
    out: Path, model: str, method: str, workers: int, kill_at: int, steps: int, step_ms: float
) -> int:
    """Start a lighthouse and the workers, kill worker 1 after step ``kill_at`` and restart it; once
    it is back and everyone passed ``steps``, stop all a few rounds on. Returns the last step."""
    out.mkdir(parents=True)  # (always a new folder: a run's files are appended to and read back)
    lighthouse, address = start_lighthouse(out)
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    restarts = 0

    def start(k: int, kill: int | None) -> subprocess.Popen:
        args = [sys.executable, __file__, "worker", "--worker", str(k), "--workers", str(workers),
                "--out", str(out), "--lighthouse", address, "--model", model,
                "--method", method, "--step-ms", str(step_ms),
                "--kill-at", str(-1 if kill is None else kill)]  # fmt: skip
        log = (out / f"log-{k}-{restarts}.txt").open("w")
        return subprocess.Popen(args, env=env, stdout=log, stderr=log)

    procs = {k: start(k, kill_at if k == 1 else None) for k in range(workers)}
    stop, deadline, died = None, time.monotonic() + 600, None
    try:
        while procs:
            if time.monotonic() > deadline:
                raise SystemExit(f"{out}: the run did not finish in 600 s")
            for k, p in list(procs.items()):
                rc = p.poll()
                if rc is None:
                    continue
                del procs[k]
                if rc == -signal.SIGKILL and restarts == 0:
                    restarts, died = 1, time.monotonic()
                    procs[k] = start(k, None)
                elif rc != 0:
                    raise SystemExit(f"{out}: worker {k} exited with {rc}; see its log")
            back = {int(f.name.split("-")[2]) for f in out.glob("joined-*")} >= {
                p.pid for p in procs.values()
            }
            if stop is None and died is not None and back and time.monotonic() - died > 1:
                at = [
                    max((r.get("t", -1) for r in read_jsonl(out / f"steps-{k}.jsonl")), default=-1)
                    for k in procs
                ]
                if min(at) >= steps:
                    stop = (max(at) // H + 3) * H
                    (out / "ready").write_text(str(stop))
            time.sleep(0.05)
    finally:
        for p in procs.values():
            p.kill()
        lighthouse.kill()
        lighthouse.wait()
    assert stop is not None
    return stop


def replayed_equal(out: Path, method: str, stop: int, workers: int) -> bool:
    """Whether the simulator, replaying the logged membership, ends with every worker's model."""
    records = [r for k in range(workers) for r in read_jsonl(out / f"rounds-{k}.jsonl")]
    sim = Simulator(make_model("mlp"), make_optimizer("mlp"), schedule_of(method), workers,
                    membership=merge(records), **policy_of(method))  # fmt: skip
    for t in range(stop):
        for k, (m, _) in enumerate(sim.replicas):
            loss("mlp", m, k, t).backward()
        sim.step()
        sim.zero_grad()
    for k in range(workers):
        final = torch.load(out / f"final-{k}.pt")
        if not all(torch.equal(final[n], p) for n, p in sim.models[k].state_dict().items()):
            return False
    return True


def analyse(out: Path, workers: int, kill_at: int) -> dict[str, Any]:
    steps = {k: read_jsonl(out / f"steps-{k}.jsonl") for k in range(workers)}
    rounds = {k: read_jsonl(out / f"rounds-{k}.jsonl") for k in range(workers)}
    killed = next(r["time"] for r in steps[1] if r.get("t") == kill_at and "event" not in r)
    survivors = [k for k in range(workers) if k != 1]
    after = [r["time"] for k in survivors for r in rounds[k] if r["committed"] and r["time"] > killed]
    durations, around = [], []
    for k in survivors:
        rows = [r for r in steps[k] if "event" not in r]
        for a, b in itertools.pairwise(rows):
            (around if killed - 1 < b["time"] < min(after) + 1 else durations).append(b["time"] - a["time"])
    joins = [r for r in steps[1] if r.get("event") == "joined"][1:]
    heal = [json.loads(f.read_text()) for f in out.glob("heal-1-*.json")]
    finals = [torch.load(out / f"final-{k}.pt") for k in range(workers)]
    first_back = next(r for r in rounds[1] if r["heals"] and r["time"] > killed)
    return {
        "kill_at": kill_at,
        "kill_to_next_commit_s": min(after) - killed,
        "survivor_step_median_s": statistics.median(durations),
        "survivor_step_max_around_kill_s": max(around),
        "survivor_steps_taken": {k: len([r for r in steps[k] if "event" not in r]) for k in survivors},
        "discarded_rounds_survivors": sum(not r["committed"] for k in survivors for r in rounds[k]),
        "rounds_without_worker_1": sum(1 for r in rounds[0] if 1 not in r["members"]),
        "rejoined_at_t": first_back["t"],
        "kill_to_rejoined_s": joins[0]["time"] - killed,
        "start_to_joined_s": joins[0]["time"] - joins[0]["started"],
        "heal_transfer_s": heal[0]["transfer_seconds"] if heal else None,
        "heal_bytes": heal[0]["bytes"] if heal else None,
        "all_equal_at_end": all(torch.equal(finals[0][n], f[n]) for f in finals[1:] for n in finals[0]),
    }


def trials(args: argparse.Namespace) -> None:
    rows = []
    for trial in range(args.trials):
        kill_at = random.Random(1000 + trial).randint(5, 60)
        out = scratch(args.work, f"{args.method}-{trial}")
        stop = run_once(out, "mlp", args.method, 3, kill_at, args.steps, args.step_ms)
        row = {"trial": trial, "steps": stop, **analyse(out, 3, kill_at)}
        row["replay_bit_for_bit"] = replayed_equal(out, args.method, stop, 3)
        rows.append(row)
        r = row
        print(
            f"trial {trial}: kill after step {kill_at}, next commit "
            f"{r['kill_to_next_commit_s']:.2f} s later, survivor steps "
            f"{r['survivor_step_median_s'] * 1000:.0f} ms "
            f"(max {r['survivor_step_max_around_kill_s']:.2f} s around the kill), back at "
            f"t={r['rejoined_at_t']} {r['kill_to_rejoined_s']:.1f} s after the kill, heal "
            f"{r['heal_transfer_s'] * 1000:.0f} ms, equal {r['all_equal_at_end']}, "
            f"replay {r['replay_bit_for_bit']}",
            flush=True,
        )
    result = {"method": args.method, "workers": 3, "H": H, "step_ms": args.step_ms, "trials": rows}
    write_result(args.json or f"benchmarks/results/fault-tolerance-{args.method}.json", result)


def heals(args: argparse.Namespace) -> None:
    rows = []
    for name in args.models:
        for repeat in range(args.repeats):
            out = scratch(args.work, f"heal-{name}-{repeat}")
            run_once(out, name, "diloco", 2, 3 * H + 2, 4 * H, 0.0)
            heal = [json.loads(f.read_text()) for f in out.glob("heal-1-*.json")]
            params = sum(p.numel() for p in make_model(name).parameters())
            rows.append({"model": name, "parameters": params, "repeat": repeat, **heal[0]})
            print(f"{name}: {params:,} parameters, heal {heal[0]['bytes'] / 1e6:.1f} MB in "
                  f"{heal[0]['transfer_seconds']:.3f} s", flush=True)  # fmt: skip
    write_result(args.json or "benchmarks/results/fault-tolerance-heal.json", {"workers": 2, "heals": rows})


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="mode", required=True)
    t = sub.add_parser("trials", help="K = 3, one worker killed and restarted, repeated")
    t.add_argument("--method", choices=["local", "post-local", "diloco"], default="diloco")
    t.add_argument("--trials", type=int, default=10)
    t.add_argument(
        "--steps", type=int, default=96, help="at least this many steps (more while a worker is away)"
    )
    t.add_argument("--step-ms", type=float, default=50.0, help="emulated compute per step")
    h = sub.add_parser("heal", help="heal time against model size")
    h.add_argument("--models", nargs="+", default=["resnet20", "gpt", "gpt-25m"])
    h.add_argument("--repeats", type=int, default=3)
    for p in (t, h):
        p.add_argument("--work", default="/tmp/localsgd-ft-bench", help="where runs' folders go")
        p.add_argument("--json", help="where to write the results")
    w = sub.add_parser("worker")  # (started by the driver)
    for name in ("--worker", "--workers", "--kill-at"):
        w.add_argument(name, type=int)
    for name in ("--out", "--lighthouse", "--model", "--method"):
        w.add_argument(name)
    w.add_argument("--step-ms", type=float)
    args = parser.parse_args()
    if args.mode == "worker":
        worker(args)
    elif args.mode == "trials":
        trials(args)
    else:
        heals(args)


if __name__ == "__main__":
    main()
