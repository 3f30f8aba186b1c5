"""The simulator's replay of a fault-tolerant run's membership (``localsgd.membership``), against
a hand-written loop; no torchft needed (tests/test_ft.py runs the real thing)."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch

from localsgd import Schedule, Simulator, diloco
from localsgd.membership import merge

K, LR = 3, 0.1


def batch(k: int, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 * k + t)
    return torch.randn(4, 3, generator=g), torch.randn(4, 2, generator=g)


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Linear(3, 2)


def record(t: int, members: list[int], contributors: list[int], heals=(), committed=(0, 1, 2)) -> list[dict]:
    return [
        {"t": t, "kind": "parameters", "members": members, "contributors": contributors,
         "heals": [list(h) for h in heals], "worker": w, "committed": w in committed}
        for w in members
    ]  # fmt: skip


TRACE = [
    *record(2, [0, 1, 2], [0, 1, 2]),
    *record(4, [0, 2], [0, 2]),  # worker 1 is gone
    *record(6, [0, 1, 2], [0, 2], heals=[(1, 0)]),  # it is back, healed from worker 0
    *record(8, [0, 1, 2], [0, 1, 2], committed=()),  # nobody committed: undone
    *record(10, [0, 1, 2], [0, 1, 2]),
]


def by_hand(steps: int, reset: bool) -> list[torch.nn.Module]:
    """The trace above, written out: SGD with momentum, means summed in worker order; with
    ``reset``, every kept round clears the momentum."""
    models = [model() for _ in range(K)]
    opts = [torch.optim.SGD(m.parameters(), lr=LR, momentum=0.9) for m in models]

    def mean_into(members: list[int], contributors: list[int]) -> None:
        with torch.no_grad():
            for ps in zip(*(m.parameters() for m in models), strict=True):
                mean = ps[contributors[0]].clone()
                for w in contributors[1:]:
                    mean.add_(ps[w])
                mean.div_(len(contributors))
                for w in range(K):  # (the dead worker too: the replay's rule, state not used again)
                    ps[w].copy_(mean)
        if reset:
            for opt in opts:
                opt.state.clear()

    return through_trace(steps, models, opts, mean_into)


def through_trace(
    steps: int,
    models: list[torch.nn.Module],
    opts: list[torch.optim.Optimizer],
    average: Callable[[list[int], list[int]], None],
    healed: Callable[[], None] = lambda: None,
) -> list[torch.nn.Module]:
    """TRACE's steps and rounds: ``average(members, contributors)`` at each kept round; at t = 6
    worker 1 first copies worker 0's model and momentum (then ``healed()``)."""
    for t in range(steps):
        for k in range(K):
            x, y = batch(k, t)
            torch.nn.functional.mse_loss(models[k](x), y).backward()
            opts[k].step()
            opts[k].zero_grad()
        if t + 1 in (2, 10):
            average([0, 1, 2], [0, 1, 2])
        elif t + 1 == 4:
            average([0, 2], [0, 2])
        elif t + 1 == 6:
            models[1].load_state_dict(models[0].state_dict())
            opts[1].load_state_dict(copy.deepcopy(opts[0].state_dict()))
            healed()
            average([0, 1, 2], [0, 2])
    return models


def replay(steps: int, trace: list[dict], **policy) -> Simulator:
    make = lambda m: torch.optim.SGD(m.parameters(), lr=LR, momentum=0.9)  # noqa: E731
    sim = Simulator(model(), make, Schedule.local(2), K, membership=merge(trace), **policy)
    for t in range(steps):
        for k, (m, _) in enumerate(sim.replicas):
            x, y = batch(k, t)
            torch.nn.functional.mse_loss(m(x), y).backward()
        sim.step()
        sim.zero_grad()
    return sim


@pytest.mark.parametrize("optimizer_state", ["local", "reset"])
def test_replay_follows_the_trace(optimizer_state: str) -> None:
    """Absence, a heal (model and momentum copied from the source, which alone counts), an undone
    round: bit for bit the hand-written loop. Fails if the healer is counted, the heal copies no
    optimizer state, or the undone round is kept (its momentum reset)."""
    sim = replay(10, TRACE, optimizer_state=optimizer_state)
    for m, ref in zip(sim.models, by_hand(10, optimizer_state == "reset"), strict=True):
        for p, q in zip(m.parameters(), ref.parameters(), strict=True):
            assert torch.equal(p, q)
    assert sim.comm.replayed == [(t, "parameters") for t in (2, 4, 6, 8, 10)]


def test_full_membership_is_the_plain_simulator() -> None:
    """Fails if a compressed round routes chunks among its members otherwise than the plain
    two-stage mean does."""
    full = [r for t in range(1, 7) for r in record(t, [0, 1, 2], [0, 1, 2])]  # (two fragments: every step)
    streaming = {"outer_optimizer": diloco(), "fragments": 2, "compression": "int8"}
    for policy in ({}, {"outer_optimizer": diloco()}, {"compression": "int8"}, streaming):
        sim = replay(6, full, **policy)
        make = lambda m: torch.optim.SGD(m.parameters(), lr=LR, momentum=0.9)  # noqa: E731
        plain = Simulator(model(), make, Schedule.local(2), K, **policy)
        for t in range(6):
            for k, (m, _) in enumerate(plain.replicas):
                x, y = batch(k, t)
                torch.nn.functional.mse_loss(m(x), y).backward()
            plain.step()
            plain.zero_grad()
        for a, b in zip(sim.models, plain.models, strict=True):
            assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def test_records_that_disagree_are_refused() -> None:
    bad = [*record(2, [0, 1, 2], [0, 1, 2])[:1], *record(2, [0, 2], [0, 2])[:1]]
    with pytest.raises(ValueError, match=r"t=2 \(parameters\) disagree on who took part"):
        merge(bad)


def test_a_replay_with_blocks_is_one_line() -> None:
    make = lambda m: torch.optim.SGD(m.parameters(), lr=LR)  # noqa: E731
    with pytest.raises(ValueError, match=r"^a fault-tolerant run's membership is replayed without blocks"):
        Simulator(model(), make, Schedule.local(2), K, workers_per_block=1, membership=merge(TRACE))


def test_an_evaluation_average_is_a_round_of_its_own() -> None:
    """averaged_model() of a fault-tolerant run is a round of kind ``average``: the mean over its
    contributors (a worker healed in it copies its source first and adds nothing), the workers left
    as they are; not committed, it is one line and changes nothing. Fails if the healer is counted,
    if the heal is not applied, or if the mean is over every worker."""
    from localsgd.engine import CommunicationError

    trace = [*record(2, [0, 1, 2], [0, 1, 2]), *record(4, [0, 2], [0, 2])]
    trace += [{**r, "kind": "average"} for r in record(5, [0, 1, 2], [0, 2], heals=[(1, 0)])]
    trace += [{**r, "kind": "average"} for r in record(6, [0, 1, 2], [0, 1, 2], committed=())]
    sim = replay(5, trace)
    before = [[p.detach().clone() for p in m.parameters()] for m in sim.models]
    mean = sim.averaged_model()
    assert sim.comm.replayed[-1] == (5, "average")
    for p, p0, p2 in zip(mean.parameters(), before[0], before[2], strict=True):
        assert torch.equal(p, (p0.clone().add_(p2)).div_(2))
    for k, source in ((0, 0), (1, 0), (2, 2)):  # worker 1 healed from worker 0; nobody averaged
        assert all(torch.equal(p, q) for p, q in zip(sim.models[k].parameters(), before[source], strict=True))
    sim.step()  # (no gradients: the step changes nothing) to t = 6
    with pytest.raises(CommunicationError, match=r"^the average at step 6 was not committed"):
        sim.averaged_model()


def compressed_by_hand(steps: int) -> list[torch.nn.Module]:
    """TRACE with bf16-compressed averages and the plain outer step, written out element by element
    (a cast is elementwise, so the chunks the two stages cut do not matter): each contributor sends
    bf16(θ̄ − θ_k + e_k) and keeps what the cast lost in e_k; the mean over the contributors, plus
    the residual r of the second stage, is cast again and r keeps what that lost; r starts from zero
    when the members change. A healed worker copies its source's model and momentum, not e."""
    models = [model() for _ in range(K)]
    opts = [torch.optim.SGD(m.parameters(), lr=LR, momentum=0.9) for m in models]
    anchor = [p.detach().clone() for p in models[0].parameters()]
    e = [[torch.zeros_like(p) for p in anchor] for _ in range(K)]
    state: dict = {"r": [torch.zeros_like(p) for p in anchor], "members": None}

    def bf16(x: torch.Tensor) -> torch.Tensor:
        return x.bfloat16().float()

    def compressed_round(members: list[int], contributors: list[int]) -> None:
        if members != state["members"]:
            state["r"], state["members"] = [torch.zeros_like(p) for p in anchor], members
        sent = []
        for k in contributors:
            v = [a - p.detach() + ek for a, p, ek in zip(anchor, models[k].parameters(), e[k], strict=True)]
            sent.append([bf16(x) for x in v])
            e[k] = [x - y for x, y in zip(v, sent[-1], strict=True)]
        mean = [x.clone() for x in sent[0]]
        for s in sent[1:]:
            for m, x in zip(mean, s, strict=True):
                m.add_(x)
        v2 = [m.div_(len(sent)).add_(r) for m, r in zip(mean, state["r"], strict=True)]
        state["r"] = [x - bf16(x) for x in v2]
        with torch.no_grad():
            for a, x in zip(anchor, v2, strict=True):
                a.sub_(bf16(x))
            for m in models:  # (the dead worker too: the replay's rule)
                for p, a in zip(m.parameters(), anchor, strict=True):
                    p.copy_(a)

    def healed() -> None:
        e[1] = [torch.zeros_like(p) for p in anchor]

    return through_trace(steps, models, opts, compressed_round, healed)


def test_a_compressed_round_is_over_its_members() -> None:
    """The replay of TRACE with compressed averages: bit for bit the elementwise loop above. Fails
    if the mean divides by the members rather than the contributors, if a healed worker keeps an
    error-feedback residual, if the second stage's residual is not reset when the members change,
    or if the undone round at t = 8 leaves its residuals behind."""
    sim = replay(10, TRACE, compression="bf16")
    for k, (m, ref) in enumerate(zip(sim.models, compressed_by_hand(10), strict=True)):
        for p, q in zip(m.parameters(), ref.parameters(), strict=True):
            assert torch.equal(p, q), f"worker {k}"


def test_a_discarded_overlapped_round_restores_its_residuals() -> None:
    """Overlapped (τ = 1), int8: the round sent after step 3 is committed by nobody; when it
    arrives after step 4 it is forgotten: the error-feedback residuals are those before its send
    and the anchor is unchanged. Fails if the discarded send's residuals are kept (the
    fault-tolerant run and its replay share that code, so tests/test_ft.py cannot see it)."""
    trace = [*record(2, [0, 1, 2], [0, 1, 2]), *record(4, [0, 1, 2], [0, 1, 2], committed=())]
    make = lambda m: torch.optim.SGD(m.parameters(), lr=LR, momentum=0.9)  # noqa: E731
    policy = {"outer_optimizer": diloco(), "overlap_steps": 1, "compression": "int8"}
    sim = Simulator(model(), make, Schedule.local(2), K, membership=merge(trace), **policy)
    (fragment,) = sim._streaming.fragments

    def residuals() -> list[torch.Tensor]:
        state = fragment.compressed.state_dict()
        return [r.clone() for key in ("sent", "owned") for rs in state[key].values() for r in rs]

    for t in range(5):
        if t == 3:  # after the first average arrived, before the second is sent
            before, anchor = residuals(), [a.clone() for a in fragment.outer.anchor]
        for k, (m, _) in enumerate(sim.replicas):
            x, y = batch(k, t)
            torch.nn.functional.mse_loss(m(x), y).backward()
        sim.step()
        sim.zero_grad()
        if t == 3:  # sent: the residuals moved
            assert fragment.pending is not None
            assert not all(torch.equal(a, b) for a, b in zip(before, residuals(), strict=True))
    assert fragment.pending is None and sim.comm.replayed[-1] == (4, "parameters")
    assert all(torch.equal(a, b) for a, b in zip(before, residuals(), strict=True))
    assert all(torch.equal(a, b) for a, b in zip(anchor, fragment.outer.anchor, strict=True))
