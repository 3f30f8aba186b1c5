"""Averaged gradients live in flat buffers (localsgd.gradients): no copies, and the same training
as the copied path, including which gradients are None at the optimizer step."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import localsgd.averaging
from localsgd import Schedule, Simulator
from tests.helpers import batch, mlp, sgd


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Linear(6, 3)
        self.branch = nn.Linear(6, 3)
        self.unused = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor, use_branch: bool) -> torch.Tensor:
        return self.trunk(x) + (self.branch(x) if use_branch else 0)


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


ZERO_GRAD: dict[str, Callable[[Simulator], None]] = {
    "engine, set_to_none": lambda sim: sim.zero_grad(),
    "engine, zeros": lambda sim: sim.zero_grad(set_to_none=False),
    "wrapped optimizers": lambda sim: [opt.zero_grad() for opt in sim.optimizers],
}


def train(sim: Simulator, steps: int, zero_grad: Callable[[Simulator], None], freeze_at: int = -1) -> list:
    """Worker k uses the branch at steps t with (t + k) % 3 == 0 (at t % 3 == 1 no worker does);
    ``unused`` never gets a gradient. Returns, per step, which gradients were None at the step."""
    nones, seen = [], []
    for opt in sim.optimizers:  # what each optimizer step sees
        opt.register_step_pre_hook(
            lambda o, *_: seen.append([p.grad is None for p in o.param_groups[0]["params"]])
        )
    for t in range(steps):
        if t == freeze_at:
            for model in sim.models:
                model.trunk.bias.requires_grad_(False)
        for k, (model, _) in enumerate(sim.replicas):
            x, y = batch(seed=5, worker=k, t=t)
            F.cross_entropy(model(x, use_branch=(t + k) % 3 == 0), y).backward()
        sim.step()
        nones.append(list(seen))
        seen.clear()
        zero_grad(sim)
    return nones


def pair() -> tuple[Simulator, Simulator]:
    """The same run with gradient windows and with the copied path."""
    schedule = Schedule.post_local(2, switch_step=4)
    packed, copied = (Simulator(Branchy(), sgd, schedule, workers=2) for _ in range(2))
    copied._gradient_average.pack = False  # the copied path
    return packed, copied


@pytest.mark.parametrize("how", list(ZERO_GRAD))
def test_gradient_windows_train_exactly_like_the_copied_path(how: str) -> None:
    packed, copied = pair()
    nones = [train(sim, 10, ZERO_GRAD[how]) for sim in (packed, copied)]
    assert nones[0] == nones[1]  # the optimizers saw None exactly where the copied path has None
    if how != "engine, zeros":
        assert any(any(step) for worker in nones[0] for step in worker)  # ... and there were some
    for a, b in zip(packed.models, copied.models, strict=True):
        assert torch.equal(flat(a), flat(b))
    for a, b in zip(packed.optimizers, copied.optimizers, strict=True):
        for p, q in zip(a.param_groups[0]["params"], b.param_groups[0]["params"], strict=True):
            assert (p in a.state) == (q in b.state)
            if p in a.state:
                assert torch.equal(a.state[p]["momentum_buffer"], b.state[q]["momentum_buffer"])
    assert packed._gradient_average.packed is not None and copied._gradient_average.packed is None


def test_changed_requires_grad_falls_back_to_copying() -> None:
    packed, copied = pair()
    for sim in (packed, copied):
        train(sim, 6, ZERO_GRAD["engine, set_to_none"], freeze_at=2)
    for a, b in zip(packed.models, copied.models, strict=True):
        assert torch.equal(flat(a), flat(b))


def test_averaged_gradients_are_windows_of_one_buffer_one_collective_no_copies(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sim = Simulator(mlp(seed=1), sgd, Schedule.local(1), workers=3)

    def step(t: int) -> None:
        for k, (model, _) in enumerate(sim.replicas):
            x, y = batch(seed=2, worker=k, t=t)
            F.cross_entropy(model(x), y).backward()
        sim.step()
        sim.zero_grad()

    step(0)  # the first average copies the gradients autograd allocated into the windows
    copied: list[int] = []
    copy = localsgd.averaging._copy_
    monkeypatch.setattr(
        localsgd.averaging, "_copy_", lambda d, s: (copied.extend(t.numel() for t in s), copy(d, s))
    )
    calls: list[int] = []
    reduce = sim.comm.all_reduce_mean_
    monkeypatch.setattr(
        sim.comm, "all_reduce_mean_", lambda level, flats: (calls.append(1), reduce(level, flats))[1]
    )
    for t in range(1, 4):
        step(t)
    assert len(calls) == 3  # one collective per gradient average, the flags included
    params = [[p for p in m.parameters()] for m in sim.models]
    assert sum(copied) == 0  # gradients and their flags are averaged where they live
    assert sim._gradient_average.packed is not None and sim._gradient_average.packed.averager.packed(
        [
            [*ws, f]
            for ws, f in zip(
                sim._gradient_average.packed.windows, sim._gradient_average.packed.flags, strict=True
            )
        ]
    )
    for ps, windows in zip(params, sim._gradient_average.packed.windows, strict=True):
        assert all(p.grad is w for p, w in zip(ps, windows, strict=True))
    grads = [p.grad for p in params[0]]
    for g, nxt in itertools.pairwise(grads):  # contiguous, in model order, 64-byte aligned
        gap = nxt.data_ptr() - (g.data_ptr() + g.numel() * g.element_size())
        assert 0 <= gap < 64 and nxt.data_ptr() % 64 == 0
