"""One fault-tolerant worker for tests/test_ft.py: a small MLP trained by LocalSGD over
``localsgd.ft``; its batches are a function of (worker, step) only, so a healed worker and the
simulator's replay read the same data.

    python -m tests.ft_worker OUT WORKER WORKERS LIGHTHOUSE METHOD STEPS

Writes OUT/rounds-WORKER.jsonl (the membership records), OUT/steps-WORKER.jsonl (wall time per
step) and, at the end, OUT/final-WORKER.pt (the model). With FT_KILL_AT=s the worker SIGKILLs
itself after step s, or, with FT_FAULT, at a chosen point of its first round after step s (see
``plant``). FT_STARTUP_TIMEOUT: how long the start waits for all K (30 s); FT_JOIN_AFTER=n: the
worker starts once worker 0 logged n rounds (a worker added to a running job). With FT_UNTIL_READY, STEPS is ignored: the worker trains until OUT/ready exists and
stops at the step written in it (the test's driver chooses it once every worker is back).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import torch

from localsgd import LocalSGD, Schedule, diloco
from localsgd.ft import FaultTolerantCommunicator


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))


def batch(worker: int, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * worker + t)
    x = torch.randn(16, 8, generator=g)
    return x, (x[:, :4] * 0.5 + 0.1 * torch.randn(16, 4, generator=g)).tanh()


def setup(method: str) -> tuple[Schedule, dict]:
    if method == "local":
        return Schedule.local(4), {}
    if method == "post-local":
        return Schedule.post_local(4, switch_step=12), {}
    if method == "post-local-late":  # the mini-batch phase long enough to heal in it
        return Schedule.post_local(4, switch_step=100), {}
    if method == "diloco":
        return Schedule.local(4), {"outer_optimizer": diloco()}
    if method == "diloco-int8":  # its pseudo-gradients int8-encoded, with error feedback
        return Schedule.local(4), {"outer_optimizer": diloco(), "compression": "int8"}
    if method == "streaming":  # Streaming DiLoCo: two fragments, one syncing every 2 steps
        return Schedule.local(4), {"outer_optimizer": diloco(), "fragments": 2}
    if method == "overlap":  # DiLoCo, each average applied one step after it was sent, int8
        return Schedule.local(4), {"outer_optimizer": diloco(), "overlap_steps": 1, "compression": "int8"}
    raise ValueError(method)


def make_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)


def step(model: torch.nn.Module, opt: torch.optim.Optimizer, worker: int, t: int) -> None:
    x, y = batch(worker, t)
    torch.nn.functional.mse_loss(model(x), y).backward()
    opt.step()
    opt.zero_grad()


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def once(name: str) -> bool:
    """True for the first worker of the run to ask (a marker file in OUT)."""
    try:
        os.close(os.open(Path(sys.argv[1]) / f"fault-{name}", os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        return False
    return True


def plant(comm: FaultTolerantCommunicator, fault: str, after: int) -> None:
    """SIGKILL this worker at a chosen point of its first round after step ``after``:
    "collective" (the others inside the model average, this worker's data not sent; with
    compression, in its second stage), "serving" (while its state is read for a healing worker) or
    "healing" (its healed state received, before the round)."""
    if fault == "collective":
        allgather = comm.pg.allgather

        def dying_allgather(output, input, opts):  # the others are in the model average already
            if comm._engine is not None and comm._engine.t > after and input[0].numel() > 7:
                _die()
            return allgather(output, input, opts)

        comm.pg.allgather = dying_allgather
    elif fault == "serving":
        save = comm._save

        def dying_save():  # (the first worker asked to serve dies, not a second one)
            if comm._engine.t > after and once("serving"):
                _die()
            return save()

        comm._save = dying_save
    elif fault == "healing":
        load = comm._load

        def dying_load(state):
            load(state)
            _die()

        comm._load = dying_load
    else:
        raise ValueError(fault)


def main() -> None:
    out, worker, workers, lighthouse, method, steps = sys.argv[1:7]
    kill_at = int(os.environ["FT_KILL_AT"]) if "FT_KILL_AT" in os.environ else None
    worker, workers, steps = int(worker), int(workers), int(steps)
    out_dir = Path(out)
    torch.set_num_threads(1)
    rounds = (out_dir / f"rounds-{worker}.jsonl").open("a")

    def on_round(record: dict) -> None:
        rounds.write(json.dumps(record) + "\n")
        rounds.flush()

    if "FT_JOIN_AFTER" in os.environ:  # a worker added to the running job after that many rounds
        rounds_0 = out_dir / "rounds-0.jsonl"
        while not rounds_0.exists() or rounds_0.read_text().count("\n") < int(os.environ["FT_JOIN_AFTER"]):
            time.sleep(0.05)
    startup = float(os.environ.get("FT_STARTUP_TIMEOUT", "30"))
    comm = FaultTolerantCommunicator(
        worker, workers, lighthouse=lighthouse, on_round=on_round, startup_timeout=startup
    )
    fault = os.environ.get("FT_FAULT", "")
    if kill_at is not None and fault:
        plant(comm, fault, kill_at)
        kill_at = None
    schedule, policy = setup(method)
    model = make_model()
    opt = LocalSGD(make_optimizer(model), model, schedule, comm=comm, **policy)
    times = (out_dir / f"steps-{worker}.jsonl").open("a")
    times.write(json.dumps({"event": "joined", "t": opt.t, "time": time.time(), "pid": os.getpid()}) + "\n")
    (out_dir / f"joined-{worker}-{os.getpid()}").touch()
    stop = steps if "FT_UNTIL_READY" not in os.environ else None  # else: the driver says when
    while stop is None or opt.t < stop:
        t = opt.t
        if stop is None and t % 4 == 0 and (out_dir / "ready").exists():
            stop = int((out_dir / "ready").read_text())
            if stop <= t:
                raise SystemExit(f"worker {worker} is at step {t}, past the stop the driver chose ({stop})")
        if t > 100_000:
            raise SystemExit(f"worker {worker}: no stop by step {t}")
        step(model, opt, worker, t)
        times.write(json.dumps({"t": t, "time": time.time()}) + "\n")
        times.flush()
        if kill_at is not None and t == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(float(os.environ.get("FT_STEP_SECONDS", "0.02")))
    opt.flush()  # (an overlapped average sent after the last step)
    torch.save(model.state_dict(), out_dir / f"final-{worker}.pt")
    comm.shutdown()
    rounds.close()
    times.close()
    os._exit(0)  # (gloo's static destructors can abort at exit)


if __name__ == "__main__":
    main()
