"""Shared by the tests and by the torchrun worker script (tests/dist_worker.py)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch import nn
from torch.nn import functional as F

HERE = Path(__file__).resolve().parent


def mlp(seed: int, extra: bool = False) -> nn.Module:
    """A small model with BatchNorm (per-worker statistics matter)."""
    torch.manual_seed(seed)
    layers = [nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3)]
    if extra:
        layers.append(nn.Linear(3, 3))
    return nn.Sequential(*layers)


def sgd(model: nn.Module, lr: float = 0.05) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=1e-4)


def batch(seed: int, worker: int, t: int, size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Worker ``worker``'s mini-batch at step ``t``: the same in every runtime."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + worker * 10_007 + t)
    x = torch.randn(size, 6, generator=g)
    y = torch.randint(0, 3, (size,), generator=g)
    return x, y


def minibatch_reference(workers: int, steps: int) -> nn.Module:
    """Mini-batch SGD on one model over all workers' batches, BatchNorm statistics per worker batch."""
    model = mlp(seed=1)
    opt = sgd(model)
    for t in range(steps):
        opt.zero_grad()
        loss = sum(F.cross_entropy(model(x), y) for x, y in (batch(2, k, t) for k in range(workers)))
        (loss / workers).backward()
        opt.step()
    return model


class Toy(nn.Module):
    """Parameters of two dtypes, a float buffer and an integer buffer, all set to a worker value."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.full((3,), value))
        self.b = nn.Parameter(torch.full((2,), value, dtype=torch.float64))
        self.register_buffer("running", torch.full((2,), value))
        self.register_buffer("count", torch.tensor(0, dtype=torch.int64))

    def local_update(self, worker: int) -> None:
        """Gradients that make SGD(lr=1) add worker+1; buffers change as BN statistics would."""
        self.a.grad = torch.full_like(self.a, -(worker + 1.0))
        self.b.grad = torch.full_like(self.b, -(worker + 1.0))
        with torch.no_grad():
            self.running += worker + 1.0
            self.count += 1

    def values(self) -> torch.Tensor:
        return torch.cat([self.a.detach(), self.b.detach().float(), self.running, self.count.float()[None]])


def exit_worker() -> NoReturn:
    """End a torchrun worker once its results are written: wait for the other ranks, then leave
    without C++ teardown (torch 2.13's gloo backend sometimes aborts in static destructors after
    Python has finished, "terminate called without an active exception", and torchrun would report
    the run as failed)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def free_port() -> int:
    """A port that was free a moment ago: another process may take it before it is used, so every
    caller retries on a collision (``port_collision``)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_collision(log: str) -> bool:
    """Whether a launch failed because its port was taken meanwhile."""
    return "address already in use" in log.lower() or "EADDRINUSE" in log


def launch(
    nproc: int,
    program: list[str],
    nodes: int = 1,
    timeout: float = 180,
    options: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> tuple[float, str]:
    """Start ``program`` (a script path or ``-m module``, with its arguments) under torchrun with
    real gloo processes (in ``cwd``, default this one); returns the seconds taken and the output.

    With ``nodes > 1``, starts that many torchrun agents (each with ``nproc`` workers) that meet
    through a c10d rendezvous on localhost, as separate machines would. ``options`` go to torchrun,
    ``env`` is added to the workers' environment.
    """
    for attempt in range(3):  # a rendezvous port taken between free_port() and its use: again
        try:
            return _launch(nproc, program, nodes, timeout, options, env, cwd)
        except AssertionError as e:
            if nodes == 1 or attempt == 2 or not port_collision(str(e)):
                raise
    raise AssertionError("unreachable")


def _launch(
    nproc: int,
    program: list[str],
    nodes: int,
    timeout: float,
    options: tuple[str, ...],
    env: dict[str, str] | None,
    cwd: Path | None = None,
) -> tuple[float, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent), **(env or {})}
    if nodes == 1:
        launch = [["--standalone"]]  # torchrun picks a free port itself
    else:
        endpoint = f"127.0.0.1:{free_port()}"
        launch = [
            [f"--nnodes={nodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}", "--rdzv-id=test"]
        ] * nodes
    start = time.perf_counter()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                *opts,
                *options,
                f"--nproc-per-node={nproc}",
                *program,
            ],
            env=env,
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for opts in launch
    ]
    try:
        logs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, log in zip(procs, logs, strict=True):
        if p.returncode != 0:
            raise AssertionError(f"torchrun failed ({p.returncode}):\n{log}")
    return time.perf_counter() - start, "".join(logs)


def torchrun(nproc: int, scenario: str, out: Path, *args: str, nodes: int = 1) -> float:
    """Run a scenario of tests/dist_worker.py; each rank writes out/rank{r}.pt."""
    return launch(nproc, [str(HERE / "dist_worker.py"), scenario, str(out), *args], nodes=nodes)[0]


# torch.distributed's collectives, as the integration tests count them
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "broadcast",
               "broadcast_object_list", "gather", "gather_object", "reduce", "reduce_scatter",
               "reduce_scatter_tensor", "all_to_all_single", "barrier")  # fmt: skip
ENGINE_MUTATIONS = ("no_average", "ddp_on")


@contextmanager
def recording_collectives(record: Callable[[str], None], outside_step: bool = False) -> Iterator[None]:
    """Call ``record(name)`` before each torch.distributed collective Python issues (DDP's own
    all-reduce runs in C++ and is not seen). With ``outside_step``, only those issued outside
    localsgd's step; a closure the step runs (the caller's forward and backward) counts as outside."""
    import torch.distributed as dist

    from localsgd.engine import Engine

    saved = {name: getattr(dist, name) for name in COLLECTIVES}
    engine_step = Engine.step
    inside = [False]

    def counted(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            if not inside[0]:
                record(name)
            return fn(*args, **kwargs)

        return call

    def as_caller(closure: Callable[[], Any]) -> Callable[[], Any]:
        def run() -> Any:
            inside[0] = False
            try:
                return closure()
            finally:
                inside[0] = True

        return run

    def step(engine: Engine, closure: Callable[[], Any] | None = None) -> Any:
        inside[0] = True
        try:
            return engine_step(engine, None if closure is None else as_caller(closure))
        finally:
            inside[0] = False

    for name, fn in saved.items():
        setattr(dist, name, counted(name, fn))
    if outside_step:
        Engine.step = step  # type: ignore[method-assign]
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(dist, name, fn)
        Engine.step = engine_step  # type: ignore[method-assign]


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x.double() - y.double()).abs().max().item() for x, y in zip(a, b, strict=True))


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    """Equal to the last bit, tensor by tensor."""
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@contextmanager
def broken_engine(name: str | None) -> Iterator[None]:
    """Break the engine on purpose for an integration test to notice: ``no_average`` leaves the
    averaging out, ``ddp_on`` leaves DDP's gradient all-reduce on in every step (local ones too);
    any other name leaves it whole."""
    from localsgd.ddp import DDPArming
    from localsgd.engine import Engine

    saved = Engine._average_model, DDPArming.arm
    if name == "no_average":
        Engine._average_model = lambda self, *a, **k: None  # type: ignore[method-assign]
    elif name == "ddp_on":

        def always_on(self: DDPArming, level: object) -> None:
            for ddp in self.wrappers:
                if ddp is not None:
                    ddp.require_backward_grad_sync = True

        DDPArming.arm = always_on  # type: ignore[method-assign]
    try:
        yield
    finally:
        Engine._average_model, DDPArming.arm = saved  # type: ignore[method-assign]
