"""Fault tolerance on torchft (``localsgd.ft``): a lighthouse and three worker processes
(``tests/ft_worker.py``) on this CPU; workers are SIGKILLed at chosen points and restarted.

Every test compares the workers' final models with the simulator: without faults the plain
simulator (which equals torchrun/gloo runs, ``test_dist``), with faults its replay of the
membership the workers recorded (``localsgd.membership``). The models are compared bit for bit:
the same process computes both sides' arithmetic on the same CPU (the ordered mean).
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("torchft")

from localsgd import Simulator
from localsgd.membership import ReplayCommunicator, merge
from tests import ft_worker as W

ROOT = Path(__file__).resolve().parents[1]
K = 3


def launch(
    out: Path,
    method: str,
    steps: int,
    incarnations: dict[int, list[dict[str, str]]] | None = None,
    kills: int | None = None,
    step_seconds: float = 0.03,
    timeout: float = 240.0,
) -> tuple[int, dict[int, int]]:
    """Run K workers against a fresh lighthouse. ``incarnations[k]`` lists the environments of
    worker k's successive processes (FT_KILL_AT, FT_FAULT); a worker killed by SIGKILL is started
    again with the next (or a plain one). With ``kills``, the workers train until that many have
    died, every worker's newest process has joined and all have passed ``steps``; they then stop
    together a few rounds later. Returns the number of steps and how often each worker started."""
    incarnations = incarnations or {}
    port = free_port()
    lighthouse = subprocess.Popen(
        [str(Path(sys.executable).parent / "torchft_lighthouse"), "--bind", f"127.0.0.1:{port}",
         "--min_replicas", "1", "--join_timeout_ms", "1000", "--quorum_tick_ms", "10",
         "--heartbeat_timeout_ms", "1000"],
        stdout=(out / "lighthouse.txt").open("w"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    address = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
    env.update(PYTHONPATH=str(ROOT), FT_STEP_SECONDS=str(step_seconds), OMP_NUM_THREADS="1")
    if kills is not None:
        env["FT_UNTIL_READY"] = "1"
    stop = steps
    started = dict.fromkeys(range(K), 0)

    def start(k: int) -> subprocess.Popen:
        plan = incarnations.get(k, [])
        extra = plan[started[k]] if started[k] < len(plan) else {}
        started[k] += 1
        log = (out / f"log-{k}-{started[k]}.txt").open("w")
        args = [sys.executable, "-m", "tests.ft_worker", str(out), str(k), str(K), address]
        return subprocess.Popen([*args, method, str(steps)], env={**env, **extra}, stdout=log, stderr=log)

    try:
        procs = {k: start(k) for k in range(K)}
        deadline, last_death = time.monotonic() + timeout, time.monotonic()
        while procs:
            assert time.monotonic() < deadline, f"the run did not finish in {timeout} s"
            for k, p in list(procs.items()):
                rc = p.poll()
                if rc is None:
                    continue
                del procs[k]
                if rc == -9:
                    procs[k], last_death = start(k), time.monotonic()
                elif rc != 0:
                    tail = (out / f"log-{k}-{started[k]}.txt").read_text()[-3000:]
                    raise AssertionError(f"worker {k} exited with {rc}:\n{tail}")
            back = {int(f.name.split("-")[2]) for f in out.glob("joined-*")} >= {
                p.pid for p in procs.values()
            }
            ready = out / "ready"
            deaths = sum(started.values()) - K
            if kills is not None and deaths >= kills and back and time.monotonic() - last_death > 1:
                at = [latest_step(out, k) for k in procs]
                if not ready.exists() and min(at) >= steps:
                    stop = (max(at) // 4 + 3) * 4  # two or three rounds on
                    ready.write_text(str(stop))
            time.sleep(0.05)
    finally:
        for p in procs.values():
            p.kill()
        lighthouse.kill()
        lighthouse.wait()
    return stop, started


def latest_step(out: Path, k: int) -> int:
    lines = (out / f"steps-{k}.jsonl").read_text().splitlines()
    return json.loads(lines[-1]).get("t", -1) if lines else -1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def records(out: Path) -> list[dict]:
    return [
        json.loads(line) for f in sorted(out.glob("rounds-*.jsonl")) for line in f.read_text().splitlines()
    ]


def simulate(method: str, steps: int, membership=None) -> Simulator:
    torch.set_num_threads(1)
    schedule, policy = W.setup(method)
    sim = Simulator(W.make_model(), W.make_optimizer, schedule, K, membership=membership, **policy)
    for t in range(steps):
        for k, (model, _) in enumerate(sim.replicas):
            x, y = W.batch(k, t)
            torch.nn.functional.mse_loss(model(x), y).backward()
        sim.step()
        sim.zero_grad()
    sim.flush()  # (an overlapped average sent after the last step, as the workers do)
    return sim


def assert_models_equal(out: Path, sim: Simulator) -> None:
    for k in range(K):
        final = torch.load(out / f"final-{k}.pt")
        for name, p in sim.models[k].state_dict().items():
            assert torch.equal(final[name], p), f"worker {k}: {name} differs from the simulator"


@pytest.mark.parametrize("method", ["post-local", "diloco", "diloco-int8", "streaming", "overlap"])
def test_no_faults_equals_the_plain_run(tmp_path: Path, method: str) -> None:
    """Post-local SGD (gradient rounds, then model rounds), DiLoCo, DiLoCo with int8-compressed
    pseudo-gradients, Streaming DiLoCo (two fragments, each sync a round), overlapped DiLoCo (each
    round open from the send to the average's arrival a step later): all K in every round, the
    models bit for bit the simulator's (so torchrun's with ordered averaging)."""
    steps, _ = launch(tmp_path, method, 40)
    rows = records(tmp_path)
    assert rows and all(r["members"] == r["contributors"] == [0, 1, 2] and r["committed"] for r in rows)
    kinds = {(r["kind"]) for r in rows}
    assert kinds == ({"gradients", "parameters"} if method == "post-local" else {"parameters"})
    assert_models_equal(tmp_path, simulate(method, steps))


@pytest.mark.parametrize(
    ("method", "seed"),
    [("diloco", 1), ("post-local-late", 2), ("diloco-int8", 3), ("streaming", 4), ("overlap", 5)],
)
def test_a_killed_worker_heals_and_the_replay_matches(tmp_path: Path, method: str, seed: int) -> None:
    """Worker 1 is SIGKILLed at a seeded step and restarted: the survivors never stop, it heals from
    a live worker (in a model round for DiLoCo, in a gradient round of the mini-batch phase for the
    late post-local schedule), all end equal, and the simulator's replay gives the same models.
    Compressed: the compressed means of two members, then of three with the healed one adding
    nothing, and the error-feedback residuals across them, as the replay computes them. Streaming:
    the healed worker receives every fragment's anchor and outer state. Overlapped: it heals when
    an average is sent and applies it a step later with the others."""
    kill_at = random.Random(seed).randint(5, 40)
    steps, started = launch(tmp_path, method, 60, {1: [{"FT_KILL_AT": str(kill_at)}]}, kills=1)
    assert started == {0: 1, 1: 2, 2: 1}
    trace = merge(records(tmp_path))
    absent = [key for key, r in trace.items() if r.members == [0, 2]]
    healed = [key for key, r in trace.items() if r.heals]
    assert absent and all(t > kill_at for t, _ in absent), "the survivors went on without worker 1"
    assert len(healed) == 1 and trace[healed[0]].heals[0][0] == 1 and trace[healed[0]].contributors == [0, 2]
    if method == "post-local-late":
        assert healed[0][1] == "gradients"
    for w in (0, 2):  # the survivors: one process each, every step
        times = [json.loads(line) for line in (tmp_path / f"steps-{w}.jsonl").read_text().splitlines()]
        assert [r["t"] for r in times if "t" in r and "event" not in r] == list(range(steps))
    sim = simulate(method, steps, trace)
    assert_models_equal(tmp_path, sim)
    final = [torch.load(tmp_path / f"final-{k}.pt") for k in range(K)]
    # (streaming: the fragment synced two steps before the end has moved apart again since)
    synced = ["2.weight", "2.bias"] if method == "streaming" else list(final[0])
    assert all(torch.equal(final[0][n], final[k][n]) for k in (1, 2) for n in synced)
    assert isinstance(sim.comm, ReplayCommunicator)


def test_a_worker_added_later_joins_the_running_job(tmp_path: Path) -> None:
    """K = 3, but workers 0 and 1 start alone (after a 2 s wait for the third); worker 2 is started
    once they had 5 rounds (to step 20): it heals at their next round, adds nothing to it, and
    trains with them from there; all end equal, and the replay (worker 2 present from the start,
    healed at that round) gives the same models."""
    alone = {"FT_STARTUP_TIMEOUT": "2"}
    steps, started = launch(tmp_path, "diloco", 60, {0: [alone], 1: [alone], 2: [{"FT_JOIN_AFTER": "5"}]})
    assert started == {0: 1, 1: 1, 2: 1}
    trace = merge(records(tmp_path))
    first = min(trace)
    assert trace[first].members == [0, 1], "the run started without worker 2"
    healed = [key for key, r in trace.items() if r.heals]
    assert len(healed) == 1 and healed[0][0] > 20 and trace[healed[0]].heals[0][0] == 2
    assert trace[healed[0]].contributors == [0, 1]
    assert all(r.members == [0, 1, 2] for key, r in trace.items() if key > healed[0])
    assert_models_equal(tmp_path, simulate("diloco", steps, trace))
    final = [torch.load(tmp_path / f"final-{k}.pt") for k in range(K)]
    assert all(torch.equal(final[0][n], final[k][n]) for k in (1, 2) for n in final[0])


@pytest.mark.parametrize(
    ("fault", "method", "incarnations", "kills"),
    [
        ("collective", "diloco", {1: [{"FT_KILL_AT": "20", "FT_FAULT": "collective"}]}, 1),
        ("collective", "diloco-int8", {1: [{"FT_KILL_AT": "20", "FT_FAULT": "collective"}]}, 1),
        ("collective", "overlap", {1: [{"FT_KILL_AT": "20", "FT_FAULT": "collective"}]}, 1),
        ("healing", "diloco", {1: [{"FT_KILL_AT": "20"}, {"FT_KILL_AT": "0", "FT_FAULT": "healing"}]}, 2),
        (
            "serving",
            "diloco",
            {1: [{"FT_KILL_AT": "20"}], **{w: [{"FT_KILL_AT": "20", "FT_FAULT": "serving"}] for w in (0, 2)}},
            2,
        ),
    ],
)
def test_faults_in_a_round(tmp_path: Path, fault: str, method: str, incarnations: dict, kills: int) -> None:
    """A worker killed inside a model average (the others discard the round and go on; compressed,
    between its two stages, the residuals of the first then restored), a restarted worker killed
    once its healing state arrived, and the worker serving the heal killed: the run finishes, every
    worker ends equal, and the replay gives the same models."""
    steps, _ = launch(tmp_path, method, 60, incarnations, kills=kills)
    rows = records(tmp_path)
    if fault == "collective":  # the round worker 1 died in: the survivors did not commit it
        assert any(not r["committed"] and r["worker"] in (0, 2) for r in rows)
    trace = merge(rows)
    assert_models_equal(tmp_path, simulate(method, steps, trace))
    final = [torch.load(tmp_path / f"final-{k}.pt") for k in range(K)]
    assert all(torch.equal(final[0][n], final[k][n]) for k in (1, 2) for n in final[0])


@pytest.mark.parametrize("worker", [3, -1, 1.0])
def test_a_bad_worker_id_is_one_line(worker: object) -> None:
    from localsgd.ft import FaultTolerantCommunicator

    with pytest.raises(ValueError, match=r"a worker id must be an integer in \[0, K\) = \[0, 3\)"):
        FaultTolerantCommunicator(worker, 3)  # type: ignore[arg-type]


def test_a_lone_worker_runs_and_averages_alone(tmp_path: Path) -> None:
    """K = 2, one worker started, in this process: after the start-up wait, its rounds have one
    member; averaged_model() is a round of its own (its model, alone), average_now() one line."""
    from localsgd import LocalSGD, Schedule
    from localsgd.ft import FaultTolerantCommunicator

    port = free_port()
    lighthouse = subprocess.Popen(
        [str(Path(sys.executable).parent / "torchft_lighthouse"), "--bind", f"127.0.0.1:{port}", "--min_replicas", "1"],
        stdout=(tmp_path / "lighthouse.txt").open("w"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        seen: list[dict] = []
        comm = FaultTolerantCommunicator(
            0, 2, lighthouse=f"http://127.0.0.1:{port}", on_round=seen.append, startup_timeout=1.0
        )
        model = W.make_model()
        opt = LocalSGD(W.make_optimizer(model), model, Schedule.local(2), comm=comm)
        for t in range(4):
            W.step(model, opt, 0, t)
        mean = opt.averaged_model()
        assert all(torch.equal(p, q) for p, q in zip(mean.parameters(), model.parameters(), strict=True))
        assert [(r["t"], r["kind"], r["members"], r["contributors"], r["committed"]) for r in seen] == [
            (2, "parameters", [0], [0], True),
            (4, "parameters", [0], [0], True),
            (4, "average", [0], [0], True),
        ]
        with pytest.raises(RuntimeError, match=r"^a fault-tolerant run changes its workers' models only in"):
            opt.average_now()
        comm.shutdown()
    finally:
        lighthouse.kill()
        lighthouse.wait()


class _Network:
    """Three ranks' all-to-alls and all-gathers, done once every rank has sent (a stand-in for the
    process group, to route a round among members whose ranks are not in worker order)."""

    def __init__(self) -> None:
        self.sent: dict[int, torch.Tensor] = {}

    def group(self, rank: int) -> object:
        net = self

        class Work:
            def __init__(self, done) -> None:
                self.wait = done

        class Group:
            def alltoall_base(self, out, send, out_splits, in_splits, opts):
                net.sent[rank] = send

                def done() -> None:
                    n = len(net.sent)
                    out.copy_(torch.cat([net.sent[r].view(n, -1)[rank] for r in range(n)]))

                return Work(done)

            def allgather(self, outs, ins, opts):
                net.sent[rank] = ins[0]

                def done() -> None:
                    for r, o in enumerate(outs[0]):
                        o.copy_(net.sent[r])

                return Work(done)

        return Group()


def test_a_compressed_round_routes_by_rank() -> None:
    """torchft ranks a round's members by their replica ids as strings ("localsgd_10" before
    "localsgd_2"); the exchange routes chunks by rank and hands them back in worker order. Members
    2, 10, 11 of K = 12 at ranks 2, 0, 1: each receives chunk j of member j, in worker order, and
    gathers the members' items in worker order. Fails if the chunks are routed by worker order."""
    from localsgd.ft import FaultTolerantCommunicator
    from localsgd.schedule import Level

    members, rank = [2, 10, 11], {10: 0, 11: 1, 2: 2}
    net, comms = _Network(), {}
    for w in members:
        comm = FaultTolerantCommunicator.__new__(FaultTolerantCommunicator)
        comm.worker, comm.workers, comm.pg, comm._failure = w, 12, net.group(rank[w]), None
        comm._round, comm._rank = {"members": members, "contributors": members}, rank
        comms[w] = comm
    chunk = lambda src, dst: torch.full((3,), 100.0 * src + dst)  # noqa: E731
    waits = {w: comms[w].start_exchange(Level.GLOBAL, [[chunk(w, d) for d in members]]) for w in members}
    for w in members:
        (received,) = waits[w]()
        assert [r.tolist() for r in received] == [chunk(src, w).tolist() for src in members]
    net.sent.clear()
    for w in members:  # (gather waits inside: every rank's item is registered first)
        net.sent[rank[w]] = torch.tensor([float(w)])
    for w in members:
        assert [x.item() for x in comms[w].gather(Level.GLOBAL, [torch.tensor([float(w)])])[0]] == members
