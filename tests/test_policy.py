"""``Policy``: one record for the averaging policies, checked at construction; the constructors'
keywords are the same record."""

from __future__ import annotations

from dataclasses import fields
from typing import Any, get_type_hints

import pytest
import torch
from torch.nn import functional as F

from localsgd import LocalSGD, Policy, Schedule, Simulator, diloco
from localsgd.policy import PolicyKeywords
from tests.helpers import batch, mlp, same, sgd


@pytest.mark.parametrize(
    ("keywords", "error", "message"),
    [
        ({"buffers": "sync"}, ValueError, "buffers must be one of 'local', 'average', got 'sync'"),
        (
            {"optimizer_state": "keep"},
            ValueError,
            "optimizer_state must be one of 'local', 'average', 'reset', got 'keep'",
        ),
        ({"bucket_bytes": 0}, ValueError, "bucket_bytes must be a positive integer, got 0"),
        (
            {"compression": "int4"},
            ValueError,
            "compression must be one of bf16, fp16, int8, sign, got 'int4'",
        ),
        (
            {"compression": 8},
            TypeError,
            "compression must be a codec name or a localsgd.compression.Codec, got int",
        ),
        ({"overlap_steps": -1}, ValueError, "overlap_steps (τ) must be an integer >= 0, got -1"),
        ({"overlap_steps": True}, ValueError, "overlap_steps (τ) must be an integer >= 0, got True"),
        (
            {"overlap_steps": 1, "optimizer_state": "average"},
            ValueError,
            "overlap_steps > 0 needs buffers='local' and optimizer_state='local' (delaying their average is not supported)",
        ),
        ({"max_grad_norm": 0}, ValueError, "max_grad_norm must be a number > 0 or None, got 0"),
        ({"max_grad_norm": "1"}, ValueError, "max_grad_norm must be a number > 0 or None, got '1'"),
    ],
)
def test_a_bad_value_is_refused_naming_it_and_what_is_allowed(
    keywords: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error) as caught:
        Policy(**keywords)
    assert str(caught.value) == message
    with pytest.raises(error) as caught:  # the constructors' keywords are the same record
        Simulator(mlp(seed=1), sgd, Schedule.local(4), 2, **keywords)
    assert str(caught.value) == message


def run(sim: Simulator, steps: int = 6) -> list[torch.Tensor]:
    for t in range(steps):
        for k, (model, _) in enumerate(sim.replicas):
            x, y = batch(seed=2, worker=k, t=t)
            F.cross_entropy(model(x), y).backward()
        sim.step()
        sim.zero_grad()
    sim.flush()
    return [t.detach().clone() for m in sim.models for t in (*m.parameters(), *m.buffers())]


@pytest.mark.parametrize(
    "keywords",
    [
        {"buffers": "average", "optimizer_state": "average", "bucket_bytes": 64, "max_grad_norm": 0.5},
        {
            "outer_optimizer": diloco(0.5, 0.5),
            "anchor_device": "cpu",
            "compression": "int8",
            "overlap_steps": 1,
        },
    ],
)
def test_policy_equals_its_keywords(keywords: dict[str, Any]) -> None:
    """The same run with ``policy=`` and with the keywords: identical parameters and buffers, and
    unlike the default policy's (so a policy that were ignored would show)."""
    policy = Policy(**keywords)

    def simulate(**kw: Any) -> tuple[Simulator, list[torch.Tensor]]:
        sim = Simulator(mlp(seed=1), sgd, Schedule.post_local(2, switch_step=2), 2, **kw)
        return sim, run(sim)

    by_record, with_record = simulate(policy=policy)
    by_keywords, with_keywords = simulate(**keywords)
    assert by_record.policy == by_keywords.policy == policy
    assert same(with_record, with_keywords)
    assert not same(with_record, simulate()[1])


def test_localsgd_takes_the_policy_too() -> None:
    """One worker clipping its gradient: ``policy=`` and the keyword give the same model, unlike
    no clipping."""

    def train(**kw: Any) -> list[torch.Tensor]:
        model = mlp(seed=1)
        opt = LocalSGD(sgd(model), model, Schedule.local(2), **kw)
        for t in range(4):
            x, y = batch(seed=2, worker=0, t=t)
            F.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
        return [p.detach().clone() for p in model.parameters()]

    clipped = train(policy=Policy(max_grad_norm=0.01))
    assert same(clipped, train(max_grad_norm=0.01))
    assert not same(clipped, train())


def test_policy_and_its_keywords_together_are_refused() -> None:
    model = mlp(seed=1)
    message = "pass policy= or its keywords, not both: got policy= and buffers=, max_grad_norm="
    with pytest.raises(ValueError) as caught:
        Simulator(model, sgd, Schedule.local(2), 2, policy=Policy(), buffers="average", max_grad_norm=1.0)
    assert str(caught.value) == message
    with pytest.raises(ValueError, match=r"not both: got policy= and overlap_steps=$"):
        LocalSGD(sgd(model), model, Schedule.local(2), policy=Policy(), overlap_steps=0)
    with pytest.raises(
        TypeError, match="unexpected keyword argument 'sync_initial'; the policy keywords are buffers, "
    ):
        Simulator(model, sgd, Schedule.local(2), 2, sync_initial=False)  # LocalSGD's, not the simulator's
    with pytest.raises(TypeError, match=r"policy must be a localsgd\.Policy, got dict"):
        Simulator(model, sgd, Schedule.local(2), 2, policy={"buffers": "average"})


def test_the_keywords_type_mirrors_the_record() -> None:
    """``PolicyKeywords`` (for type checkers) names every field of ``Policy`` with its type."""
    assert get_type_hints(PolicyKeywords) == get_type_hints(Policy)
    assert list(get_type_hints(Policy)) == [f.name for f in fields(Policy)]


def test_the_harness_builds_one_policy_from_the_config() -> None:
    from localsgd.harness.config import Config
    from localsgd.harness.train import build_policy
    from localsgd.outer import SlowMo

    cfg = Config(buffers="average", optimizer_state="reset", max_grad_norm=0.5, outer_optimizer="slowmo",
                 outer_lr=0.5, compress="int8", compress_block=64)  # fmt: skip
    policy = build_policy(cfg)
    assert (policy.buffers, policy.optimizer_state, policy.max_grad_norm) == ("average", "reset", 0.5)
    assert (policy.compression.name, policy.compression.block_size) == ("int8", 64)
    outer = policy.outer_optimizer([torch.zeros(2)])
    assert isinstance(outer, SlowMo) and outer.defaults["lr"] == 0.5
    assert build_policy(Config(overlap_steps=3)).overlap_steps == 3
    assert build_policy(Config()) == Policy()  # the config's defaults are the engine's
