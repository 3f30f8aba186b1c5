"""Streaming DiLoCo (fragments, the mix and delta merge rules) against a second implementation
written here from the Streaming DiLoCo paper and torchft's ``DiLoCo`` (its step hook, fragment
``prepare_sync`` / ``perform_sync`` and ``_merge_parameters``): K workers in one process, every
collective an ordered mean (as the simulator's), bit for bit."""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from localsgd import Schedule, Simulator, diloco
from localsgd.pieces import cut

K = 3
OUTER_LR, OUTER_MOMENTUM = 0.7, 0.9
# The streaming policy the runtimes are compared with (tests/dist_worker.py's "streaming")
STREAMING = {
    "outer_optimizer": diloco(OUTER_LR, OUTER_MOMENTUM), "fragments": 4, "merge": "mix", "alpha": 0.5,
    "overlap_steps": 1, "compression": "int8",
}  # fmt: skip


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 3))


def inner(m: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)


def batch(k: int, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * k + t)
    return torch.randn(5, 6, generator=g), torch.randint(0, 3, (5,), generator=g)


def backward(models: list[nn.Module], t: int, first: int = 0) -> None:
    """Workers first, first + 1, ...'s backward pass on their batch of step ``t``."""
    for k, m in enumerate(models, start=first):
        x, y = batch(k, t)
        F.cross_entropy(m(x), y).backward()


def sending(engine: Any, backward_step: Callable[[int], None], steps: int) -> list[int]:
    """Run ``steps`` steps of ``engine`` (a LocalSGD or a Simulator); the bytes each sync sent."""
    sent = []
    for t in range(steps):
        backward_step(t)
        before = engine.stats["global"].bytes
        engine.step()
        engine.zero_grad()
        if engine.stats["global"].bytes != before:
            sent.append(engine.stats["global"].bytes - before)
    engine.flush()
    return sent


def local_step(models: list[nn.Module], opts: list[torch.optim.Optimizer], t: int) -> None:
    for opt in opts:
        opt.zero_grad()
    backward(models, t)
    for opt in opts:
        opt.step()


def ordered_mean(rows: list[torch.Tensor]) -> torch.Tensor:
    out = rows[0].clone()
    for row in rows[1:]:
        out.add_(row)
    return out.div_(len(rows))


def expected_parts(params: list[torch.Tensor], n: int) -> list[list[tuple[int, int, int]]]:
    """Fragment f holds the elements whose first byte lies in [f/N, (f + 1)/N) of the parameters'
    bytes (in order): per parameter, the run of its elements there, as (index, start, end)."""
    total = sum(p.numel() * p.element_size() for p in params)
    runs: list[list[tuple[int, int, int]]] = [[] for _ in range(n)]
    base = 0
    for i, p in enumerate(params):
        fragment_of = (base + p.element_size() * torch.arange(p.numel())) * n // total
        for f in range(n):
            where = (fragment_of == f).nonzero().flatten()
            if len(where):
                runs[f].append((i, int(where[0]), int(where[-1]) + 1))
        base += p.numel() * p.element_size()
    return runs


def reference(
    h: int,
    n: int,
    tau: int,
    merge: str,
    alpha: float,
    steps: int,
    start: tuple | None = None,
    parts: list[list[tuple[int, int, int]]] | None = None,
) -> list[list[torch.Tensor]]:
    """Streaming DiLoCo as torchft runs it (merge "mix"), or localsgd's delta rule: returns each
    worker's parameters after ``steps`` steps (from ``start``: models, optimizers and the step
    index to continue at; default: fresh ones at step 0)."""
    models, opts, first = start or ([copy.deepcopy(model()) for _ in range(K)], None, 0)
    opts = opts or [inner(m) for m in models]
    params = [list(m.parameters()) for m in models]
    parts = parts or expected_parts(params[0], n)

    def fragment_params(k: int, f: int) -> list[torch.Tensor]:  # views of worker k's parameters
        return [params[k][i].detach().view(-1)[start:end] for i, start, end in parts[f]]

    # the global copy of each fragment, which its outer optimizer steps (torchft's original_parameters)
    global_copy = [[p.clone() for p in fragment_params(0, f)] for f in range(n)]
    outers = [torch.optim.SGD(g, lr=OUTER_LR, momentum=OUTER_MOMENTUM, nesterov=True) for g in global_copy]
    sub = h // n
    count, syncs, mean, sent_from = 0, 0, None, None

    def send(f: int) -> None:  # the fragment's pseudo-gradient, global copy minus local, averaged
        nonlocal mean, sent_from
        with torch.no_grad():
            sent_from = [[p.detach().clone() for p in fragment_params(k, f)] for k in range(K)]
            mean = [ordered_mean([g - s[i] for s in sent_from]) for i, g in enumerate(global_copy[f])]

    def apply(f: int) -> None:  # the outer step on the global copy, then the merge
        with torch.no_grad():
            for g, d in zip(global_copy[f], mean, strict=True):
                g.grad = d.clone()
            outers[f].step()
            for k in range(K):
                for p, g, s in zip(fragment_params(k, f), global_copy[f], sent_from[k], strict=True):
                    if merge == "mix":
                        p.copy_(g.clone().lerp_(p, alpha))  # torchft: restore, step, lerp toward local
                    else:
                        p.sub_(s).add_(g)

    pending = None  # (fragment, step it is applied after)
    for t in range(first, first + steps):
        local_step(models, opts, t)
        count += 1
        if merge == "mix":  # torchft: prepare τ steps before the sync point, sync at it
            if count == sub - tau:
                send(syncs % n)
            if count == sub:
                apply(syncs % n)
                syncs, count = syncs + 1, 0
        else:  # delta: send at the sync point, apply τ steps later
            if pending is not None and pending[1] == t:
                apply(pending[0])
                pending = None
            if count == sub:
                send(syncs % n)
                pending = (syncs % n, t + tau)
                syncs, count = syncs + 1, 0
                if tau == 0:
                    apply(pending[0])
                    pending = None
    return [[p.detach().clone() for p in ps] for ps in params]


def streamed(h: int, n: int, tau: int, merge: str, alpha: float, steps: int) -> tuple[list, Simulator]:
    sim = Simulator(
        model(), inner, Schedule.local(h), K, outer_optimizer=diloco(OUTER_LR, OUTER_MOMENTUM),
        fragments=n, merge=merge, alpha=alpha, overlap_steps=tau,
    )  # fmt: skip
    for t in range(steps):
        backward(sim.models, t)
        sim.step()
        sim.zero_grad()
    return [[p.detach().clone() for p in m.parameters()] for m in sim.models], sim


CASES = [
    (n, tau, merge, alpha)
    for n in (2, 4)
    for tau in (0, 1)
    for merge, alpha in (("mix", 0.0), ("mix", 0.5), ("delta", 0.0))
]


@pytest.mark.parametrize(("n", "tau", "merge", "alpha"), CASES)
def test_streaming_equals_the_second_implementation(n: int, tau: int, merge: str, alpha: float) -> None:
    h, steps = 8, 8 * 3 + 3  # three syncs of every fragment, and a part of the next period
    ours, sim = streamed(h, n, tau, merge, alpha, steps)
    theirs = reference(h, n, tau, merge, alpha, steps)
    assert sim._streaming is not None and sim._streaming.parts == expected_parts(
        list(sim.models[0].parameters()), n
    )
    for k in range(K):
        for a, b in zip(ours[k], theirs[k], strict=True):
            assert torch.equal(a, b), (k, (a - b).abs().max().item())
    sends = (steps + tau) // (h // n) if merge == "mix" else steps // (h // n)  # mix sends τ early
    assert sim.stats["global"].rounds == sends


def test_one_fragment_mix_without_delay_is_diloco() -> None:
    """N = 1, τ = 0, alpha = 0: the blocking DiLoCo average, bit for bit."""
    steps = 20
    ours, _ = streamed(4, 1, 0, "mix", 0.0, steps)
    sim = Simulator(model(), inner, Schedule.local(4), K, outer_optimizer=diloco(OUTER_LR, OUTER_MOMENTUM))
    for t in range(steps):
        backward(sim.models, t)
        sim.step()
        sim.zero_grad()
    for a, b in zip(ours[0], sim.models[0].parameters(), strict=True):
        assert torch.equal(a, b)


def test_fragments_are_cut_to_the_element() -> None:
    """Each fragment holds 1/N of the bytes to within an element, whatever the tensors' sizes and
    dtypes; a tensor that is not contiguous stays whole; too many fragments is one line."""
    sizes = [
        (10, torch.float32),
        (3, torch.float32),
        (7, torch.float64),
        (1, torch.float16),
        (64, torch.float32),
    ]
    tensors = [torch.zeros(n, dtype=dtype) for n, dtype in sizes]
    total = sum(t.numel() * t.element_size() for t in tensors)
    for n in (1, 2, 3, 4, 7, 16):
        parts = cut(tensors, n)
        assert parts == expected_parts(tensors, n)
        held = [sum((end - start) * tensors[i].element_size() for i, start, end in part) for part in parts]
        assert sum(held) == total and max(abs(b - total / n) for b in held) <= 8, (n, held)
    strided = [torch.zeros(4), torch.zeros(6, 4).t(), torch.zeros(4)]  # the middle one is not contiguous
    assert cut(strided, 2) == [[(0, 0, 4), (1, 0, 24)], [(2, 0, 4)]]
    with pytest.raises(
        ValueError, match=r"fragments \(N\) = 3: the model's 8 bytes of parameters cannot be cut"
    ):
        cut([torch.zeros(2)], 3)


def test_named_fragments_sync_whole_parameters_in_the_order_given() -> None:
    """Fragments named by module or parameter (torchft's list of modules): the last layer first,
    then the first layer with the middle one's bias, then the middle weight; against the second
    implementation with those parameters as the fragments, bit for bit."""
    h, steps, names = 6, 6 * 3 + 2, [["4"], ["0", "2.bias"], "2.weight"]
    sim = Simulator(
        model(), inner, Schedule.local(h), K, outer_optimizer=diloco(OUTER_LR, OUTER_MOMENTUM),
        fragments=names, merge="mix", alpha=0.5, overlap_steps=1,
    )  # fmt: skip
    for t in range(steps):
        backward(sim.models, t)
        sim.step()
        sim.zero_grad()
    sizes = [p.numel() for p in sim.models[0].parameters()]  # 0.weight, 0.bias, 2.weight, 2.bias, 4.*
    parts = [[(4, 0, sizes[4]), (5, 0, sizes[5])], [(0, 0, sizes[0]), (1, 0, sizes[1]), (3, 0, sizes[3])],
             [(2, 0, sizes[2])]]  # fmt: skip
    assert sim._streaming is not None and sim._streaming.parts == parts
    theirs = reference(h, 3, 1, "mix", 0.5, steps, parts=parts)
    for k in range(K):
        for a, b in zip(sim.models[k].parameters(), theirs[k], strict=True):
            assert torch.equal(a, b)
    for bad, message in [
        ([["0", "2"]], "parameter '4.weight' is in no fragment (2 are not)"),
        ([["0", "2"], ["4", "0.bias"]], "parameter '0.bias' is in fragments 0 and 1"),
        ([["0", "2"], ["4", "6"]], "fragment 1's name '6' is no module or parameter of the model"),
        ([["0"], []], "fragments must be a number N or a list of module or parameter names"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            Simulator(model(), inner, Schedule.local(4), K, outer_optimizer=diloco(), fragments=bad)


def aligned_model() -> nn.Module:
    """Parameters of 16 floats' multiples: packed, they touch (no alignment gaps)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16))


def test_the_outer_step_runs_on_flat_views_and_saves_its_state_per_piece() -> None:
    """On packed parameters a fragment's outer step holds one flat tensor (not one per parameter),
    and its state is saved per piece of a parameter (whole ones shaped like it), so it loads into
    an outer step that holds the parameters separately: the same anchor, momentum and next step."""
    sim = Simulator(aligned_model(), inner, Schedule.local(4), 2, outer_optimizer=diloco(), fragments=4)
    assert sim._streaming is not None and sim._streaming.parts == [
        [(0, 0, 136)],
        [(0, 136, 256), (1, 0, 16)],
        [(2, 0, 136)],
        [(2, 136, 256), (3, 0, 16)],
    ]
    assert [[tuple(a.shape) for a in o.anchor] for o in sim._streaming.outers] == [[(136,)]] * 4
    blocking = Simulator(aligned_model(), inner, Schedule.local(4), 2, outer_optimizer=diloco())
    assert blocking._outer is not None and [tuple(a.shape) for a in blocking._outer.anchor] == [(544,)]

    for t in range(9):  # two outer steps: momentum
        x = torch.randn(4, 16, generator=torch.Generator().manual_seed(t))
        for m in blocking.models:
            m(x).square().mean().backward()
        blocking.step()
        blocking.zero_grad()
    saved = blocking.state_dict()["outer"]
    assert [tuple(a.shape) for a in saved["anchor"]] == [(16, 16), (16,), (16, 16), (16,)]
    momentum = saved["optimizer"]["state"][0]["momentum_buffer"]
    assert momentum.shape == (16, 16) and momentum.abs().sum() > 0

    from localsgd.outer import OuterStep
    from localsgd.pieces import Selection, whole

    plain = aligned_model()
    separate = Selection(whole(list(plain.parameters())), join=False)
    other = OuterStep(separate(plain), diloco(), layout=separate.layout)
    other.load_state_dict(saved)
    joined = blocking._outer
    assert [tuple(a.shape) for a in other.anchor] == [(16, 16), (16,), (16, 16), (16,)]
    assert torch.equal(torch.cat([a.flatten() for a in other.anchor]), joined.anchor[0])
    delta = torch.randn(544, generator=torch.Generator().manual_seed(99))
    joined.advance_([delta.clone()], inner_lr=0.1)
    other.advance_(
        [d.clone().view(a.shape) for d, a in zip(delta.split([256, 16, 256, 16]), other.anchor, strict=True)],
        0.1,
    )
    assert torch.equal(torch.cat([a.flatten() for a in other.anchor]), joined.anchor[0])
    with pytest.raises(ValueError, match="does not fit this run's 4 pieces of parameters"):
        joined.load_state_dict({**saved, "anchor": saved["anchor"][:3]})


def test_post_local_streaming_starts_its_fragments_at_the_switch() -> None:
    """Post-local SGD into Streaming DiLoCo: the anchors are the workers' (equal) parameters at t',
    and the sub-periods count from t' (here t' = 5, not a multiple of H / N = 2)."""
    switch, h, n, tau, steps = 5, 8, 4, 1, 5 + 8 * 2 + 1
    sim = Simulator(
        model(), inner, Schedule.post_local(h, switch_step=switch), K,
        outer_optimizer=diloco(OUTER_LR, OUTER_MOMENTUM), fragments=n, merge="mix", alpha=0.5, overlap_steps=tau,
    )  # fmt: skip
    for t in range(steps):
        backward(sim.models, t)
        sim.step()
        sim.zero_grad()
    # the reference: the mini-batch phase by hand, then streaming from the switch's parameters
    models = [copy.deepcopy(model()) for _ in range(K)]
    opts = [inner(m) for m in models]
    for t in range(switch):
        for opt in opts:
            opt.zero_grad()
        backward(models, t)
        with torch.no_grad():
            for ps in zip(*(m.parameters() for m in models), strict=True):
                mean = ordered_mean([p.grad for p in ps])
                for p in ps:
                    p.grad = mean.clone()
        for opt in opts:
            opt.step()
    theirs = reference(h, n, tau, "mix", 0.5, steps - switch, start=(models, opts, switch))
    for k in range(K):
        for a, b in zip(sim.models[k].parameters(), theirs[k], strict=True):
            assert torch.equal(a, b)


def test_resume_with_a_fragment_in_flight_is_bit_for_bit() -> None:
    """A simulator's state after 4 steps (fragment 1's average in flight: sent after step 3 with
    τ = 1, applied after step 4) loaded into a new simulator continues exactly, int8 residuals
    and all."""
    h, n, tau, steps, cut = 8, 4, 1, 8 * 2 + 3, 4

    def make() -> Simulator:
        return Simulator(
            model(), inner, Schedule.local(h), K, outer_optimizer=diloco(OUTER_LR, OUTER_MOMENTUM),
            fragments=n, merge="delta", overlap_steps=tau, compression="int8",
        )  # fmt: skip

    def run(sim: Simulator, steps: range) -> None:
        for t in steps:
            backward(sim.models, t)
            sim.step()
            sim.zero_grad()

    whole = make()
    run(whole, range(steps))
    first = make()
    run(first, range(cut))
    assert first._streaming is not None and first._streaming.pending() != []  # in flight
    state = copy.deepcopy(first.state_dict())
    second = make()
    second.load_state_dict(state)
    run(second, range(cut, steps))
    for a, b in zip(whole.models[1].parameters(), second.models[1].parameters(), strict=True):
        assert torch.equal(a, b)
    assert [o.anchor[0].sum() for o in whole._streaming.outers] == [
        o.anchor[0].sum() for o in second._streaming.outers
    ]


@pytest.mark.parametrize("workers", [2, 4])
def test_torchrun_processes_stream_as_the_simulator(tmp_path: Path, workers: int) -> None:
    """N = 4 fragments with int8 (each fragment its own residuals), τ = 1 and the mix rule: real
    gloo processes averaging in worker order take exactly the simulator's steps, and every sync
    sends about 1/N of the model's int8 bytes."""
    from tests.helpers import torchrun

    torchrun(workers, "streaming", tmp_path)
    sim = Simulator(model(), inner, Schedule.local(8), workers, **STREAMING)
    sent = sending(sim, lambda t: backward(sim.models, t), 27)
    for r in range(workers):
        got = torch.load(tmp_path / f"rank{r}.pt", weights_only=True)
        for a, b in zip(got["params"], sim.models[r].parameters(), strict=True):
            assert torch.equal(a, b), r
        assert got["sent"] == sent
    assert sim._streaming is not None
    assert len(sent) == (27 + 1) // 2  # a fragment every H / N = 2 steps, sent τ = 1 early
    assert sent[:4] == sent[4:8] == sent[8:12]  # the fragments in turn, each its own bytes
    assert max(sent) < sum(sent[:4])  # no sync carries the whole model


def test_streaming_settings_are_checked() -> None:
    from localsgd.harness.config import Config, ConfigError

    bad = {
        "fragments (N) = 3 must divide the global period H·H_b = 16": {"fragments": 3, "local_steps": 16},
        "overlap_steps (τ) = 4 must be less than H·H_b / N = 4: one fragment in flight at a time": {
            "fragments": 4, "local_steps": 16, "overlap_steps": 4,
        },
        "fragments = 4 needs local steps": {"fragments": 4},
        "alpha must be a number in [0, 1], got 2.0": {"merge": "mix", "alpha": 2.0, "local_steps": 4},
        "alpha = 0.5 weighs the 'mix' rule; merge='delta' uses none": {"alpha": 0.5, "local_steps": 4},
        "fragments > 1 and merge='mix' need buffers='local'": {"fragments": 2, "local_steps": 4, "buffers": "average"},
    }  # fmt: skip
    for message, settings in bad.items():
        with pytest.raises(ConfigError, match="^" + re.escape(message)):
            Config(**settings).validate()
    with pytest.raises(ValueError, match=r"^fragments and merge='mix' are not supported with hierarchical"):
        Simulator(model(), inner, Schedule.hierarchical(4, 2), 4, workers_per_block=2, fragments=2)
    Config(fragments=4, local_steps=16, overlap_steps=3, merge="mix", alpha=0.5).validate()  # fits


def test_cost_model_spreads_each_period_over_n_smaller_syncs() -> None:
    """A period of H steps holds N all-reduces of S/N bytes (written out from the ring model), τ
    steps of each hidden; the link carries S/N per sync."""
    from localsgd.cost_model import Network, allreduce_seconds, predict

    net = Network(latency=0.005, bandwidth=100e6 / 8, overhead=0.0)
    c, s, k, n = 0.05, 13_400_000, 2, 196
    for frags, tau in ((1, 0), (4, 0), (4, 1)):
        rows = predict(c, s, k, net, n, local_steps=(16,), overlap_steps=tau, fragments=frags)
        sync = max(0.0, allreduce_seconds(-(-s // frags), k, net) - tau * c)
        assert rows[0].seconds_per_step == pytest.approx(c + frags * sync / 16, rel=1e-12)
        assert rows[0].bytes_per_sync == -(-s // frags)
    with pytest.raises(ValueError, match=r"fragments \(N\) = 3 must divide every H > 1, got H = 16"):
        predict(c, s, k, net, n, local_steps=(1, 16), fragments=3)
    with pytest.raises(ValueError, match=r"overlap_steps \(τ\) = 4 must be less than every H / N \(N = 4\)"):
        predict(c, s, k, net, n, local_steps=(16,), fragments=4, overlap_steps=4)
