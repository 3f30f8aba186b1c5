"""Outer optimizers (DiLoCo, SlowMo) against a second, plain implementation written here from the
formulas, on the exact dyadic model of the golden tests: every value is exact, so the engine and
the reference must agree bit for bit, on any CPU."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from localsgd import Schedule, Simulator, SlowMo, diloco, slowmo
from tests.test_golden import Dyadic, optimizer

Update = Callable[[list[torch.Tensor], list[torch.Tensor], dict[str, Any], float], None]


def sgd_update(lr: float) -> Update:
    """θ̄ ← θ̄ − lr·Δ."""

    def update(anchor: list[torch.Tensor], delta: list[torch.Tensor], state: dict, inner_lr: float) -> None:
        for a, d in zip(anchor, delta, strict=True):
            a -= lr * d

    return update


def nesterov_update(lr: float, mu: float) -> Update:
    """DiLoCo: b ← μ·b + Δ (b = Δ at the first round), θ̄ ← θ̄ − lr·(Δ + μ·b)."""

    def update(anchor: list[torch.Tensor], delta: list[torch.Tensor], state: dict, inner_lr: float) -> None:
        if "b" not in state:
            state["b"] = [d.clone() for d in delta]
        else:
            for b, d in zip(state["b"], delta, strict=True):
                b.mul_(mu).add_(d)
        bufs = state["b"]
        for a, d, b in zip(anchor, delta, bufs, strict=True):
            a -= lr * (d + mu * b)

    return update


def slowmo_update(alpha: float, beta: float) -> Update:
    """SlowMo: u ← β·u + Δ/γ, θ̄ ← θ̄ − α·γ·u."""

    def update(anchor: list[torch.Tensor], delta: list[torch.Tensor], state: dict, inner_lr: float) -> None:
        us = state.setdefault("u", [torch.zeros_like(d) for d in delta])
        for a, d, u in zip(anchor, delta, us, strict=True):
            u.mul_(beta).add_(d / inner_lr)
            a -= alpha * inner_lr * u

    return update


def inner_lr_at(t: int) -> float:
    return 0.5 if t < 8 else 0.25  # a decay mid-run (SlowMo's momentum must follow it)


def average_gradients(models: list[nn.Module]) -> None:
    """Mini-batch SGD by hand: every worker gets the mean gradient, a missing one counted as zero
    (None where no worker has one)."""
    for ps in zip(*(list(m.parameters()) for m in models), strict=True):
        grads = [p.grad for p in ps]
        if any(g is not None for g in grads):
            mean = sum(g if g is not None else torch.zeros_like(ps[0]) for g in grads) / len(models)
            for p in ps:
                p.grad = mean.clone()


def inner_step(
    models: list[nn.Module], opts: list[torch.optim.Optimizer], t: int, switch: int
) -> list[torch.Tensor] | None:
    """Step t of every worker (gradients averaged before t'); returns the anchor at t = t'."""
    for opt in opts:
        opt.param_groups[0]["lr"] = inner_lr_at(t)
    for k, m in enumerate(models):
        m.local_update(k, t)
    if t < switch:
        average_gradients(models)
    anchor = [p.detach().clone() for p in models[0].parameters()] if t == switch else None
    for opt in opts:
        opt.step()
    return anchor


def reference(
    workers: int,
    local_steps: int,
    switch: int,
    update: Update,
    steps: int,
    block: tuple[int, int] | None = None,
) -> list[nn.Module]:
    """K plain models and optimizers: mini-batch SGD (gradients averaged, a missing one as zero)
    before t', then local steps; every H·H_b local steps the outer update on the anchor, which is
    set at the switch; with ``block = (H_b, K')``, plain block averages every H local steps."""
    models = [Dyadic() for _ in range(workers)]
    opts = [optimizer(m) for m in models]
    anchor: list[torch.Tensor] = []
    state: dict[str, Any] = {}
    hb, kb = block or (1, workers)
    for t in range(steps):
        anchor = inner_step(models, opts, t, switch) or anchor
        u = t + 1 - switch
        if t < switch or u % local_steps:
            continue
        with torch.no_grad():
            if u % (local_steps * hb) == 0:  # global: the outer step
                params = [list(m.parameters()) for m in models]
                delta = [sum(a - ps[i] for ps in params) / workers for i, a in enumerate(anchor)]
                update(anchor, delta, state, inner_lr_at(t))
                for ps in params:
                    for p, a in zip(ps, anchor, strict=True):
                        p.copy_(a)
            else:  # a block: plain average of K' workers
                for start in range(0, workers, kb):
                    group = [list(m.parameters()) for m in models[start : start + kb]]
                    for ps in zip(*group, strict=True):
                        mean = sum(ps) / kb
                        for p in ps:
                            p.copy_(mean)
    return models


def drive(sim: Simulator, start: int, stop: int) -> Simulator:
    """Steps ``start`` to ``stop`` - 1 of the dyadic workers, with the inner LR schedule."""
    for t in range(start, stop):
        for opt in sim.optimizers:
            opt.param_groups[0]["lr"] = inner_lr_at(t)
        for k, m in enumerate(sim.models):
            m.local_update(k, t)
        sim.step()
        sim.zero_grad()
    return sim


def engine_run(
    workers: int, schedule: Schedule, outer: Any, steps: int, workers_per_block: int | None = None
) -> Simulator:
    sim = Simulator(
        Dyadic(), optimizer, schedule, workers, workers_per_block=workers_per_block, outer_optimizer=outer
    )
    return drive(sim, 0, steps)


def params(models: list[nn.Module]) -> list[list[list[float]]]:
    return [[p.tolist() for p in m.parameters()] for m in models]


CASES = {
    "SGD lr 0.5 (K=4, local H=3)": (4, Schedule.local(3), lambda a: torch.optim.SGD(a, lr=0.5), sgd_update(0.5)),
    "Lookahead: K=1, SGD lr 0.5": (1, Schedule.local(3), lambda a: torch.optim.SGD(a, lr=0.5), sgd_update(0.5)),
    "DiLoCo lr 0.5 mu 0.5, post-local t'=4": (
        4, Schedule.post_local(2, switch_step=4), diloco(lr=0.5, momentum=0.5), nesterov_update(0.5, 0.5),
    ),
    "SlowMo alpha 1 beta 0.5, LR decay": (2, Schedule.local(2), slowmo(lr=1.0, momentum=0.5), slowmo_update(1.0, 0.5)),
    "DiLoCo, K=1 (Lookahead with Nesterov)": (1, Schedule.local(4), diloco(0.5, 0.5), nesterov_update(0.5, 0.5)),
}  # fmt: skip


@pytest.mark.parametrize("name", list(CASES))
def test_outer_step_matches_the_formula_bit_for_bit(name: str) -> None:
    """The anchor is the parameters at the switch, the pseudo-gradient is the mean of θ̄ − θ_k, the
    outer optimizer steps with it and every worker continues from the new anchor. Catches an
    anchor not reset after the mini-batch phase, Δ with the wrong sign or not averaged, SlowMo
    without the inner LR, an outer step skipped when K = 1."""
    workers, schedule, outer, update = CASES[name]
    sim = engine_run(workers, schedule, outer, steps=14)
    ref = reference(workers, schedule.local_steps, schedule.switch_step, update, steps=14)
    assert params(sim.models) == params(ref)
    assert params(ref) != params(
        reference(workers, schedule.local_steps, schedule.switch_step, sgd_update(1.0), 14)
    )


def test_hierarchical_outer_step_is_global_only() -> None:
    """Blocks of K' = 2 average plainly every H = 2 steps; all K = 4 take the outer step every
    H·H_b = 4 steps."""
    schedule = Schedule.hierarchical(2, 2)
    sim = engine_run(4, schedule, diloco(0.5, 0.5), steps=14, workers_per_block=2)
    ref = reference(4, 2, 0, nesterov_update(0.5, 0.5), steps=14, block=(2, 2))
    assert params(sim.models) == params(ref)
    assert sim.stats["global"].rounds == 3 and sim.stats["block"].rounds == 4


@pytest.mark.parametrize(
    "schedule,workers_per_block",
    [(Schedule.local(3), None), (Schedule.post_local(2, switch_step=5), None), (Schedule.hierarchical(2, 2, 3), 2)],
)  # fmt: skip
def test_outer_sgd_with_lr_1_and_no_momentum_is_plain_averaging(
    schedule: Schedule, workers_per_block: int | None
) -> None:
    """θ̄ − 1·(θ̄ − mean θ_k) = mean θ_k: bit for bit here (exact values), every worker, buffers,
    momentum and counters as without an outer optimizer."""
    runs = [
        engine_run(4, schedule, outer, steps=14, workers_per_block=workers_per_block)
        for outer in (None, lambda a: torch.optim.SGD(a, lr=1.0))
    ]
    assert params(runs[0].models) == params(runs[1].models)
    for a, b in zip(runs[0].models, runs[1].models, strict=True):
        assert a.running.tolist() == b.running.tolist()
    assert {k: (s.rounds, s.bytes) for k, s in runs[0].stats.items()} == {
        k: (s.rounds, s.bytes) for k, s in runs[1].stats.items()
    }


def test_outer_state_resumes_mid_period_bit_for_bit() -> None:
    """state_dict after 9 steps (mid-period, outer momentum non-zero), loaded into a fresh
    simulator: the next 7 steps give what an uninterrupted run gives."""
    schedule, outer = Schedule.post_local(3, switch_step=2), diloco(0.5, 0.5)
    full = engine_run(2, schedule, outer, steps=16)
    first = engine_run(2, schedule, outer, steps=9)
    state = copy.deepcopy(first.state_dict())
    assert "outer" in state and state["outer"]["optimizer"]["state"]  # the momentum is in it
    resumed = Simulator(Dyadic(), optimizer, schedule, 2, outer_optimizer=outer)
    resumed.load_state_dict(state)
    drive(resumed, 9, 16)
    assert params(resumed.models) == params(full.models)
    plain = Simulator(Dyadic(), optimizer, schedule, 2)
    with pytest.raises(ValueError, match="written with an outer optimizer, but this run has no"):
        plain.load_state_dict(state)


def test_anchor_device_and_memory() -> None:
    """The anchor holds one copy of the parameters where asked; the result does not depend on it."""
    a = engine_run(2, Schedule.local(2), diloco(0.5, 0.5), steps=6)
    sim = Simulator(
        Dyadic(), optimizer, Schedule.local(2), 2, outer_optimizer=diloco(0.5, 0.5), anchor_device="cpu"
    )
    assert [t.device.type for t in sim._outer.anchor] == ["cpu"] * 3
    assert sum(t.numel() for t in sim._outer.anchor) == sum(p.numel() for p in sim.models[0].parameters())
    assert params(a.models) != params(engine_run(2, Schedule.local(2), None, steps=6).models)


def test_bad_outer_settings_are_clear() -> None:
    with pytest.raises(ValueError, match=r"outer lr must be a number > 0, got 0"):
        diloco(lr=0)
    with pytest.raises(ValueError, match=r"outer momentum must be a number in \[0, 1\), got 1.5"):
        slowmo(momentum=1.5)
    with pytest.raises(TypeError, match=r"must return a torch\.optim\.Optimizer, got list"):
        Simulator(Dyadic(), optimizer, Schedule.local(2), 2, outer_optimizer=lambda a: list(a))
    opt = SlowMo([torch.zeros(2, requires_grad=True)])
    opt.param_groups[0]["params"][0].grad = torch.ones(2)
    with pytest.raises(ValueError, match="SlowMo needs the inner learning rate"):
        opt.step()


@pytest.mark.parametrize("name", ["diloco", "slowmo", "diloco overlapped", "diloco overlapped int8"])
def test_torchrun_processes_take_the_simulators_outer_steps(tmp_path: Path, name: str) -> None:
    """4 gloo processes, one LocalSGD each, against the simulator: bit for bit (the values are
    exact, so the order of the all-reduce's sums cannot matter). DiLoCo after a mini-batch phase;
    SlowMo on a hierarchical schedule (blocks of 2 plain, the outer step global); DiLoCo with each
    global average in flight (async gloo work) for τ = 2 local steps, also with int8 compression
    (the all-to-all in flight, the all-gather when applied)."""
    from tests.helpers import torchrun

    schedule, outer, tau, codec = {
        "diloco": (Schedule.post_local(2, switch_step=4), diloco(0.5, 0.5), 0, None),
        "slowmo": (Schedule.hierarchical(2, 2, switch_step=1), slowmo(1.0, 0.5), 0, None),
        "diloco overlapped": (Schedule.post_local(3, switch_step=2), diloco(0.5, 0.5), 2, None),
        "diloco overlapped int8": (Schedule.post_local(3, switch_step=2), diloco(0.5, 0.5), 2, "int8"),
    }[name]
    torchrun(4, "outer", tmp_path, name)
    if tau:
        sim = overlapped(4, schedule, outer, tau, steps=14, compression=codec)
    else:
        sim = engine_run(4, schedule, outer, steps=14, workers_per_block=2)
    for r in range(4):
        got = torch.load(tmp_path / f"rank{r}.pt", weights_only=True)
        assert [p.tolist() for p in got["params"]] == [p.tolist() for p in sim.models[r].parameters()]
        assert {k: s["rounds"] for k, s in got["stats"].items()} == {
            k: s.rounds for k, s in sim.stats.items()
        }


def delayed_reference(
    workers: int, local_steps: int, switch: int, tau: int, update: Update, steps: int, mean_of=None
) -> list[nn.Module]:
    """The delayed-update rule by hand: after step t (a global average), s_k = θ_k; after step
    t + τ, Δ = mean_k(θ̄ − s_k), θ̄ ← outer(θ̄, Δ), θ_k ← θ̄ + (θ_k − s_k). ``mean_of(anchor,
    snapshots, state, inner_lr)`` replaces the exact mean Δ."""
    models = [Dyadic() for _ in range(workers)]
    opts = [optimizer(m) for m in models]
    anchor: list[torch.Tensor] = []
    state: dict[str, Any] = {}
    pending: tuple[int, list[list[torch.Tensor]]] | None = None
    for t in range(steps):
        anchor = inner_step(models, opts, t, switch) or anchor
        with torch.no_grad():
            if pending is not None and pending[0] == t:
                snaps = pending[1]
                delta = [sum(a - s[i] for s in snaps) / workers for i, a in enumerate(anchor)]
                if mean_of is not None:
                    delta = mean_of(anchor, snaps, state, inner_lr_at(t))
                update(anchor, delta, state, inner_lr_at(t))
                for m, s in zip(models, snaps, strict=True):
                    for p, si, a in zip(m.parameters(), s, anchor, strict=True):
                        p.copy_(a + (p - si))
                pending = None
            if t >= switch and (t + 1 - switch) % local_steps == 0:
                pending = (t + tau, [[p.detach().clone() for p in m.parameters()] for m in models])
    return models


def overlapped(workers: int, schedule: Schedule, outer: Any, tau: int, steps: int, start: int = 0,
               state: dict | None = None, compression: str | None = None) -> Simulator:  # fmt: skip
    sim = Simulator(Dyadic(), optimizer, schedule, workers, outer_optimizer=outer, overlap_steps=tau,
                    compression=compression)  # fmt: skip
    if state is not None:
        sim.load_state_dict(state)
    return drive(sim, start, steps)


@pytest.mark.parametrize("tau", [1, 2])
@pytest.mark.parametrize("outer", ["sgd lr 1", "diloco"])
def test_overlapped_average_follows_the_delayed_rule(tau: int, outer: str) -> None:
    """τ = 1, 2 with H = 3 after a mini-batch phase: bit for bit the rule computed by hand, not the
    blocking result; the same number of rounds as blocking."""
    make, update = {
        "sgd lr 1": (lambda a: torch.optim.SGD(a, lr=1.0), sgd_update(1.0)),
        "diloco": (diloco(0.5, 0.5), nesterov_update(0.5, 0.5)),
    }[outer]
    schedule = Schedule.post_local(3, switch_step=2)
    sim = overlapped(4, schedule, make, tau, steps=14)
    assert params(sim.models) == params(delayed_reference(4, 3, 2, tau, update, 14))
    blocking = engine_run(4, schedule, make, steps=14)
    assert params(sim.models) != params(blocking.models)
    assert sim.stats["global"].rounds == blocking.stats["global"].rounds == 2 + 4
    assert params(overlapped(4, schedule, make, 0, steps=14).models) == params(blocking.models)  # τ = 0


@pytest.mark.parametrize("codec", [None, "int8", "sign"])
def test_overlapped_average_resumes_with_one_in_flight(codec: str | None) -> None:
    """state_dict one step after an average was started (its result not applied yet): the resumed
    run sends it again and ends with the uninterrupted run's bits. With compression (all three on:
    outer momentum, error feedback, an average in flight) the residuals from before the send are
    what it resends with: the ones after it would count the encoding error twice."""
    schedule = Schedule.post_local(3, switch_step=2)
    full = overlapped(2, schedule, diloco(0.5, 0.5), 2, steps=14, compression=codec)
    # the second average (started after step 7, due after 9) in flight: the first one left residuals
    first = overlapped(2, schedule, diloco(0.5, 0.5), 2, steps=9, compression=codec)
    state = copy.deepcopy(first.state_dict())
    assert state["delayed"] is not None and state["delayed"]["due"] == 9
    if codec:
        before, after = state["delayed"]["residuals"]["sent"][0], state["compression"]["sent"][0]
        assert any(not torch.equal(b, a) for b, a in zip(before, after, strict=True))
    resumed = overlapped(2, schedule, diloco(0.5, 0.5), 2, steps=14, start=9, state=state, compression=codec)
    assert params(resumed.models) == params(full.models)


@pytest.mark.parametrize("codec", ["int8", "sign"])
def test_compressed_overlapped_average_is_the_delayed_compressed_mean(codec: str) -> None:
    """τ = 2 with compression: the delayed rule by hand, its mean Δ the blocking compressed mean
    of the snapshots' pseudo-gradients (one error-feedback state carried across rounds). Catches
    compression skipped in flight, residuals lost between overlapped rounds, and the delay's
    bookkeeping applied to the wrong values."""
    from localsgd import SimCommunicator
    from localsgd.averaging import FlatAverager
    from localsgd.compression import CompressedMean, make_codec
    from localsgd.schedule import Level

    mean = CompressedMean(make_codec(codec))
    averager = FlatAverager(SimCommunicator(4))
    deltas = [[torch.zeros_like(p) for p in Dyadic().parameters()] for _ in range(4)]
    assert averager.pack_(deltas)

    def compressed_update(anchor, snaps, state, inner_lr) -> list[torch.Tensor]:
        for d, s in zip(deltas, snaps, strict=True):
            for di, a, si in zip(d, anchor, s, strict=True):
                di.copy_(a - si)
        averager.average_(Level.GLOBAL, deltas, mean)
        return [d.clone() for d in deltas[0]]

    schedule = Schedule.post_local(3, switch_step=2)
    sim = overlapped(4, schedule, diloco(0.5, 0.5), 2, steps=14, compression=codec)
    reference = delayed_reference(4, 3, 2, 2, nesterov_update(0.5, 0.5), 14, mean_of=compressed_update)
    assert params(sim.models) == params(reference)
    exact = overlapped(4, schedule, diloco(0.5, 0.5), 2, steps=14)
    assert params(sim.models) != params(exact.models)


def test_overlap_settings_are_checked() -> None:
    def build(**kw: Any) -> None:
        Simulator(Dyadic(), optimizer, Schedule.local(4), 2, **kw)

    with pytest.raises(
        ValueError, match=r"overlap_steps \(τ\) = 4 must be less than the global period H·H_b = 4"
    ):
        build(overlap_steps=4)
    with pytest.raises(ValueError, match="needs buffers='local' and optimizer_state='local'"):
        build(overlap_steps=1, buffers="average")
    with pytest.raises(ValueError, match=r"overlap_steps \(τ\) must be an integer >= 0, got -1"):
        build(overlap_steps=-1)
