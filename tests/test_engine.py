"""The engine in one process: the simulator and LocalSGD with a single worker."""

from __future__ import annotations

import copy
import io
from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from localsgd import Communicator, Level, LocalSGD, Schedule, Simulator
from tests.helpers import batch, minibatch_reference, mlp, sgd


def run(sim: Simulator, steps: int, start: int = 0) -> None:
    for t in range(start, start + steps):
        for k, (model, _) in enumerate(sim.replicas):
            x, y = batch(seed=2, worker=k, t=t)
            F.cross_entropy(model(x), y).backward()
        sim.step()
        sim.zero_grad()


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def test_h1_simulator_equals_minibatch_sgd() -> None:
    sim = Simulator(mlp(seed=1), sgd, Schedule.local(1), workers=4)
    run(sim, 20)
    ref = flat(minibatch_reference(4, 20))
    for model in sim.models:
        assert (flat(model) - ref).abs().max() <= 1e-6
    means = [m[1].running_mean for m in sim.models]
    assert not torch.allclose(means[0], means[1])  # BatchNorm statistics stay per worker


@pytest.mark.parametrize(
    "make_opt",
    [sgd, lambda m: torch.optim.Adam(m.parameters(), lr=1e-2, weight_decay=1e-4)],
    ids=["sgd", "adam"],
)
def test_single_worker_equals_the_plain_optimizer(make_opt) -> None:
    """K = 1: LocalSGD (no torch.distributed) and the simulator are the bare optimizer, bitwise,
    including an LR scheduler driven through the wrapper."""
    plain, wrapped, simulated = mlp(seed=1), mlp(seed=1), mlp(seed=1)
    plain_opt = make_opt(plain)
    opt = LocalSGD(make_opt(wrapped), wrapped, Schedule.post_local(3, switch_step=2))
    sim = Simulator(simulated, make_opt, Schedule.local(1), workers=1)
    schedulers = [torch.optim.lr_scheduler.StepLR(o, 4, 0.5) for o in (plain_opt, opt, sim.optimizers[0])]
    for t in range(10):
        x, y = batch(seed=3, worker=0, t=t)
        for model, o in ((plain, plain_opt), (wrapped, opt), (simulated, sim)):
            o.zero_grad()
            F.cross_entropy(model(x), y).backward()
            o.step()
        for s in schedulers:
            s.step()
    assert torch.equal(flat(plain), flat(wrapped))
    assert torch.equal(flat(plain), flat(simulated))
    assert opt.param_groups[0]["lr"] == plain_opt.param_groups[0]["lr"]
    assert opt.stats["global"].rounds == 0  # a lone worker has nothing to average


class SilentPeer(Communicator):
    """Two workers, this process holding worker 0; worker 1 contributes zeros to every average
    and agrees with every check. A mean is then exactly half of worker 0's values."""

    workers, workers_per_block, local_workers = 2, None, [0]

    def all_reduce_mean_(self, level: Level, flats: list[torch.Tensor]) -> Callable[[], None]:
        flats[0].div_(2)
        return lambda: None

    def broadcast_(self, flats: list[torch.Tensor]) -> Callable[[], None]:
        return lambda: None

    def all_gather_bytes(self, data: list[bytes]) -> list[bytes]:
        return [data[0], data[0]]

    def start_exchange(self, level: Level, chunks: list[list[torch.Tensor]]) -> Callable[[], list]:
        raise NotImplementedError

    def gather(self, level: Level, items: list[torch.Tensor]) -> list[list[torch.Tensor]]:
        raise NotImplementedError


def test_closure_is_evaluated_once_before_averaging() -> None:
    """H = 1 with a peer whose gradients are zero: the optimizer must step with half of the
    closure's gradients. Catches a closure evaluated after the average (the step would use the
    full gradients), evaluated twice (counted), or its loss not returned."""
    model, ref = mlp(seed=1), mlp(seed=1)
    opt = LocalSGD(sgd(model), model, Schedule.local(1), comm=SilentPeer())
    x, y = batch(seed=3, worker=0, t=0)
    calls = []

    def closure() -> torch.Tensor:
        calls.append(1)
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    loss = opt.step(closure)
    ref_loss = F.cross_entropy(ref(x), y)
    ref_loss.backward()
    ref_opt = sgd(ref)
    for p in ref.parameters():
        p.grad.mul_(0.5)  # the mean with a zero gradient, by hand
    ref_opt.step()
    assert len(calls) == 1
    assert torch.equal(loss.detach(), ref_loss.detach())
    assert torch.equal(flat(model), flat(ref))
    assert opt.stats["global"].rounds == 1


def test_counters_count_rounds_and_bytes() -> None:
    sim = Simulator(mlp(seed=1), sgd, Schedule.post_local(4, switch_step=3), workers=2)
    run(sim, 3 + 16)
    param_bytes = sum(p.numel() * 4 for p in sim.models[0].parameters())
    stats = sim.stats["global"]
    assert stats.rounds == 3 + 4
    # mini-batch rounds carry the gradients plus one float32 flag per parameter; averages the parameters
    assert stats.bytes == 3 * (param_bytes + 4 * 6) + 4 * param_bytes
    assert stats.seconds > 0


def test_state_dict_mid_period_continues_bitwise() -> None:
    schedule = Schedule.hierarchical(2, 2, switch_step=1)
    full = Simulator(mlp(seed=1), sgd, schedule, workers=4, workers_per_block=2)
    run(full, 12)
    part = Simulator(mlp(seed=1), sgd, schedule, workers=4, workers_per_block=2)
    run(part, 6)  # u = 5: mid-way through a block period
    buf = io.BytesIO()
    torch.save(part.state_dict(), buf)
    buf.seek(0)
    resumed = Simulator(mlp(seed=5), lambda m: sgd(m, lr=1.0), schedule, workers=4, workers_per_block=2)
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    assert resumed.t == 6
    run(resumed, 6, start=6)
    for a, b in zip(full.models, resumed.models, strict=True):
        assert all(
            torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
        )
    assert full.stats["global"].rounds == resumed.stats["global"].rounds
    assert full.stats["block"].bytes == resumed.stats["block"].bytes


def test_the_wrapper_follows_the_wrapped_optimizer_after_load_state_dict() -> None:
    """torch.optim.Optimizer.load_state_dict replaces its param_groups list (Accelerate's prepare
    loads every optimizer's state back into it): an LR scheduler given the wrapper afterwards must
    still set the learning rate the wrapped optimizer steps with."""
    model = mlp(seed=1)
    inner = sgd(model, lr=0.1)
    opt = LocalSGD(inner, model, Schedule.local(2))
    opt.load_state_dict(opt.state_dict())
    assert opt.param_groups is inner.param_groups and opt.defaults is inner.defaults
    scheduler = torch.optim.lr_scheduler.StepLR(opt, 1, 0.5)
    x, y = batch(seed=3, worker=0, t=0)
    F.cross_entropy(model(x), y).backward()
    opt.step()
    scheduler.step()
    assert inner.param_groups[0]["lr"] == 0.05


def momentum(sim: Simulator) -> list[torch.Tensor]:
    return [
        torch.cat([o.state[p]["momentum_buffer"].reshape(-1) for p in m.parameters()])
        for m, o in sim.replicas
    ]


def test_optimizer_state_policies() -> None:
    for policy in ("local", "average", "reset"):
        sim = Simulator(mlp(seed=1), sgd, Schedule.local(3), workers=2, optimizer_state=policy)
        run(sim, 2)
        before = momentum(sim)
        assert not torch.equal(before[0], before[1])
        run(sim, 1, start=2)  # the third step averages
        if policy == "reset":
            assert all(len(o.state) == 0 for o in sim.optimizers)
            continue
        after = momentum(sim)
        assert torch.equal(after[0], after[1]) == (policy == "average")


def test_buffer_policies_and_integer_buffers() -> None:
    for policy in ("local", "average"):
        sim = Simulator(mlp(seed=1), sgd, Schedule.local(2), workers=2, buffers=policy)
        sim.models[1][1].num_batches_tracked += 100  # integer buffers are never averaged
        run(sim, 2)
        bn = [m[1] for m in sim.models]
        assert torch.equal(bn[0].running_var, bn[1].running_var) == (policy == "average")
        assert bn[1].num_batches_tracked - bn[0].num_batches_tracked == 100


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Linear(6, 3)
        self.branch = nn.Linear(6, 3)
        self.unused = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor, use_branch: bool) -> torch.Tensor:
        return self.trunk(x) + (self.branch(x) if use_branch else 0)


def test_parameters_without_gradient_on_some_workers() -> None:
    """Mini-batch phase: a parameter used by one worker gets the mean gradient on all (as if zero
    where unused); one used by no worker keeps grad None, so all optimizer states stay identical."""
    torch.manual_seed(0)
    sim = Simulator(
        Branchy(), lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9), Schedule.local(1), 2
    )
    for t in range(3):
        for k, (model, _) in enumerate(sim.replicas):
            x, y = batch(seed=4, worker=k, t=t)
            F.cross_entropy(model(x, use_branch=k == 0), y).backward()
        sim.step()
        assert sim.models[0].unused.weight.grad is None
        assert torch.equal(sim.models[0].branch.weight.grad, sim.models[1].branch.weight.grad)
        sim.zero_grad()
    assert torch.equal(flat(sim.models[0]), flat(sim.models[1]))


def test_average_now_makes_models_equal() -> None:
    sim = Simulator(mlp(seed=1), sgd, Schedule.local(100), workers=3, buffers="average")
    run(sim, 5)
    assert not torch.equal(flat(sim.models[0]), flat(sim.models[2]))
    sim.average_now()
    assert torch.equal(flat(sim.models[0]), flat(sim.models[2]))
    assert torch.equal(sim.models[0][1].running_mean, sim.models[2][1].running_mean)


def test_parameters_live_in_the_averagers_buffers_and_a_replaced_one_is_averaged_exactly() -> None:
    sim = Simulator(mlp(seed=1), sgd, Schedule.local(100), workers=3)
    params = [list(m.parameters()) for m in sim.models]
    assert sim._averager.packed(params)
    run(sim, 3)
    # A user replaces one worker's parameter storage after construction (as model.to(...) does).
    weight = sim.models[1][0].weight
    weight.data = weight.data.t().contiguous().t()  # same values, other strides and storage
    f0, f1, f2 = (flat(m) for m in sim.models)
    expected = (f0 + f1 + f2) / 3  # the simulator sums in worker order
    sim.average_now()
    for model in sim.models:
        assert torch.equal(flat(model), expected)
    assert sim._averager.packed(params)  # packed again
    run(sim, 2)  # and the optimizers still update the very same parameters
    assert not torch.equal(flat(sim.models[0]), expected)


def test_bad_arguments_fail_before_any_work(monkeypatch: pytest.MonkeyPatch) -> None:
    model = mlp(seed=1)
    cases = [
        (
            lambda: Simulator(model, sgd, Schedule.local(2), 2, buffers="sync"),
            "buffers must be one of 'local', 'average', got 'sync'",
        ),
        (
            lambda: Simulator(model, sgd, Schedule.local(2), 2, optimizer_state="keep"),
            "optimizer_state must be one of 'local', 'average', 'reset', got 'keep'",
        ),
        (lambda: Simulator(model, sgd, Schedule.hierarchical(2, 2), 4), "no block size is known"),
        (
            lambda: Simulator(model, sgd, Schedule.hierarchical(2, 2), 4, workers_per_block=3),
            r"workers_per_block \(K'\) = 3 must divide",
        ),
        (
            lambda: Simulator(model, sgd, Schedule.local(2), 0),
            r"workers \(K\) must be an integer >= 1, got 0",
        ),
        (lambda: LocalSGD(sgd(mlp(seed=2)), model, Schedule.local(2)), "not a parameter of the model"),
    ]
    for make, message in cases:
        with pytest.raises(ValueError, match=message):
            make()
    with pytest.raises(TypeError, match=r"schedule must be a localsgd\.Schedule, got int"):
        LocalSGD(sgd(model), model, 4)
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(RuntimeError, match=r"WORLD_SIZE=4: .* call torch\.distributed\.init_process_group"):
        LocalSGD(sgd(model), model, Schedule.local(2))


def test_checkpoint_from_another_configuration_is_refused() -> None:
    sim = Simulator(mlp(seed=1), sgd, Schedule.local(4), workers=2)
    state = sim.state_dict()
    other = Simulator(mlp(seed=1), sgd, Schedule.local(8), workers=2)
    with pytest.raises(ValueError, match=r"written with schedule=\{.*'local_steps': 4.*but this run has"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="holds 2 workers, but this simulator has K=3"):
        Simulator(mlp(seed=1), sgd, Schedule.local(4), workers=3).load_state_dict(state)
    model = copy.deepcopy(sim.models[0])
    opt = LocalSGD(sgd(model), model, Schedule.local(4), buffers="average")
    with pytest.raises(ValueError, match="buffers='local', but this run has buffers='average'"):
        opt.load_state_dict({**state, "optimizer": {}})


def test_gradient_clipping_composes_with_local_and_minibatch_steps() -> None:
    """max_grad_norm clips the averaged gradient in the mini-batch phase (t < t' = 3) and each
    worker's own gradient in local steps (H = 2), against the rule written out with plain tensors
    (a linear model in float64, no momentum). Catches clipping before the gradient average (each
    worker's own, then averaged: a different update, checked below) and clipping skipped."""
    torch.manual_seed(0)
    workers, lr, clip, switch = 3, 0.5, 0.05, 3
    xs = [[torch.randn(8, 5, dtype=torch.float64) for _ in range(7)] for _ in range(workers)]
    ys = [[torch.randint(0, 3, (8,)) for _ in range(7)] for _ in range(workers)]
    model = nn.Linear(5, 3).double()
    start = [model.weight.detach().clone(), model.bias.detach().clone()]
    sim = Simulator(model, lambda m: torch.optim.SGD(m.parameters(), lr=lr), Schedule.post_local(2, switch),
                    workers, max_grad_norm=clip)  # fmt: skip

    def grads(w: torch.Tensor, b: torch.Tensor, k: int, t: int) -> list[torch.Tensor]:
        w, b = w.clone().requires_grad_(), b.clone().requires_grad_()
        F.cross_entropy(xs[k][t] @ w.T + b, ys[k][t]).backward()
        return [w.grad, b.grad]

    def clipped(g: list[torch.Tensor]) -> list[torch.Tensor]:
        norm = torch.sqrt(sum((x**2).sum() for x in g))
        return [x * min(1.0, clip / (float(norm) + 1e-6)) for x in g]

    def run(clip_then_average: bool) -> list[list[torch.Tensor]]:
        params = [[p.clone() for p in start] for _ in range(workers)]
        for t in range(7):
            g = [grads(*params[k], k, t) for k in range(workers)]
            if t < switch:
                if clip_then_average:
                    g = [clipped(gk) for gk in g]
                mean = [sum(gk[i] for gk in g) / workers for i in range(2)]
                g = [mean for _ in range(workers)] if clip_then_average else [clipped(mean)] * workers
            else:
                g = [clipped(gk) for gk in g]
            params = [
                [p - lr * gi for p, gi in zip(pk, gk, strict=True)] for pk, gk in zip(params, g, strict=True)
            ]
            if t >= switch and (t + 1 - switch) % 2 == 0:
                mean = [sum(pk[i] for pk in params) / workers for i in range(2)]
                params = [[m.clone() for m in mean] for _ in range(workers)]
        return params

    for t in range(7):
        for k, (m, _) in enumerate(sim.replicas):
            F.cross_entropy(m(xs[k][t]), ys[k][t]).backward()
        sim.step()
        sim.zero_grad()
    expected, wrong = run(clip_then_average=False), run(clip_then_average=True)
    for k, m in enumerate(sim.models):
        for p, e in zip(m.parameters(), expected[k], strict=True):
            torch.testing.assert_close(p.detach(), e, rtol=0, atol=1e-12)
    assert max((a - b).abs().max() for a, b in zip(expected[0], wrong[0], strict=True)) > 1e-4
    with pytest.raises(ValueError, match="max_grad_norm must be a number > 0 or None, got 0"):
        Simulator(
            model, lambda m: torch.optim.SGD(m.parameters(), lr=lr), Schedule.local(2), 2, max_grad_norm=0
        )
