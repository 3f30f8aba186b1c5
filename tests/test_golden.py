"""Golden values of the engine: final parameters, buffers, momentum and counters of short simulated
runs, for every schedule and policy, written once by an earlier version of the engine
(``WRITE_GOLDEN=1 pytest tests/test_golden.py``) and compared exactly.

The simulator-vs-torchrun tests run the current code on both sides, so they cannot see a change
that both sides share; these values can. They are portable across CPUs by construction: every
number in these runs is a dyadic rational (gradients are set by hand from the parameters, learning
rates, momentum, weight decay and every mean are powers of two), so every operation is exact and
no kernel, vector width or summation order can change a bit.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from localsgd import Schedule, Simulator

GOLDEN = Path(__file__).resolve().parent / "golden" / "engine.json"
STEPS = 12


class Dyadic(nn.Module):
    """Two dtypes of parameters, one of them sometimes without a gradient, a float buffer that
    follows the parameters (as BatchNorm statistics do) and an integer buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.arange(6, dtype=torch.float64) - 2)
        self.b = nn.Parameter(torch.tensor([1.0, -3.0, 4.0]))  # float32: integer steps only
        self.c = nn.Parameter(torch.full((2,), 0.5, dtype=torch.float64))
        self.register_buffer("running", torch.zeros(6, dtype=torch.float64))
        self.register_buffer("count", torch.tensor(0))

    @torch.no_grad()
    def local_update(self, worker: int, t: int) -> None:
        """Gradients pulling towards a worker- and step-dependent integer target; ``c`` gets none
        on worker 1 at every third step (the optimizer then skips it there)."""
        target = torch.arange(6, dtype=torch.float64) * (worker + 1) - t % 3
        self.a.grad = (self.a - target) * 0.5
        self.b.grad = torch.tensor([float(worker - t % 2), 1.0, -2.0])
        self.c.grad = None if (worker == 1 and t % 3 == 0) else (self.c - worker) * 0.5
        self.running.mul_(0.5).add_(self.a, alpha=0.5)
        self.count += 1


def optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(
        [
            {"params": [model.a, model.c], "lr": 0.5, "momentum": 0.5, "nesterov": True, "weight_decay": 0.5},
            {"params": [model.b], "lr": 1.0, "momentum": 0.0, "weight_decay": 0.0},
        ],
        lr=0.25,
    )


SCENARIOS: dict[str, dict[str, Any]] = {
    "local H=3": {"schedule": Schedule.local(3)},
    "mini-batch": {"schedule": Schedule.local(1)},
    "post-local H=3 t'=4": {"schedule": Schedule.post_local(3, switch_step=4)},
    "hierarchical H=2 H_b=2 K'=2 t'=3": {
        "schedule": Schedule.hierarchical(2, 2, switch_step=3),
        "workers_per_block": 2,
    },
    "local H=2 buffers=average": {"schedule": Schedule.local(2), "buffers": "average"},
    "post-local H=2 optimizer_state=average": {
        "schedule": Schedule.post_local(2, switch_step=3),
        "optimizer_state": "average",
    },
    "local H=4 optimizer_state=reset": {"schedule": Schedule.local(4), "optimizer_state": "reset"},
}


def run(settings: dict[str, Any]) -> dict[str, Any]:
    """STEPS steps of 4 simulated workers, an average_now mid-way, then everything observable."""
    sim = Simulator(Dyadic(), optimizer, workers=4, **settings)
    for t in range(STEPS):
        for k, m in enumerate(sim.models):
            m.local_update(k, t)
        sim.step()
        sim.zero_grad()
        if t == 6:
            sim.average_now(buffers=True)
    averaged = sim.averaged_model()
    return {
        "workers": [
            {name: v.tolist() for name, v in [*m.named_parameters(), *m.named_buffers()]} for m in sim.models
        ],
        "momentum": [
            [
                opt.state[p]["momentum_buffer"].tolist()
                for p in (m.a, m.c)
                if "momentum_buffer" in opt.state[p]
            ]
            for m, opt in zip(sim.models, sim.optimizers, strict=True)
        ],
        "averaged": {name: v.tolist() for name, v in averaged.state_dict().items()},
        "stats": {level: [s.rounds, s.bytes] for level, s in sim.stats.items()},
    }


def test_every_value_is_exact() -> None:
    """The premise of portability: a value needing more than float64's 53 bits (or float32's 24
    for ``b``) would have been rounded. Dyadic values with few fractional bits are exact."""
    for settings in SCENARIOS.values():
        result = run(settings)
        for worker in result["workers"]:
            for name, values in worker.items():
                bits = 20 if name == "b" else 45
                for v in values if isinstance(values, list) else [values]:
                    assert float(v) * 2**bits == round(float(v) * 2**bits), (name, v)


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_engine_reproduces_its_golden_values(name: str) -> None:
    result = run(SCENARIOS[name])
    if os.environ.get("WRITE_GOLDEN"):
        stored = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
        stored[name] = result
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(stored, indent=1, sort_keys=True) + "\n")
        pytest.skip("golden values written")
    golden = json.loads(GOLDEN.read_text())[name]
    assert result == golden
