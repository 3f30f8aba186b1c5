"""Schedules, step by step (t is the 0-based step index; 'after step s' means t = s - 1)."""

from __future__ import annotations

import pytest

from localsgd import Level, Schedule, Sync

G, B = Level.GLOBAL, Level.BLOCK


def trace(schedule: Schedule, steps: int) -> list[str]:
    """One letter per step: g/b = gradients averaged (global/block), G/B = parameters averaged
    after the step, '.' = a purely local step."""
    out = []
    for t in range(steps):
        s = schedule.sync_at(t)
        letter = {G: "g", B: "b", None: ""}[s.gradients] + {G: "G", B: "B", None: ""}[s.parameters]
        out.append(letter or ".")
    return out


def test_local_sgd_averages_after_every_h_steps() -> None:
    assert "".join(trace(Schedule.local(4), 12)) == "...G...G...G"


def test_h1_is_minibatch_sgd_every_step() -> None:
    assert trace(Schedule.local(1), 3) == ["g", "g", "g"]
    assert Schedule.local(1).sync_at(0) == Sync(gradients=G)


def test_post_local_counts_periods_from_the_switch() -> None:
    # t' = 5 is not a multiple of H = 4: five mini-batch steps, then averages after steps 9, 13.
    assert "".join(trace(Schedule.post_local(4, switch_step=5), 14)) == "ggggg...G...G."
    assert Schedule.post_local(4, switch_step=5).sync_at(4) == Sync(gradients=G)
    assert Schedule.post_local(4, switch_step=5).sync_at(8) == Sync(parameters=G)


def test_post_local_with_h1_stays_minibatch() -> None:
    assert set(trace(Schedule.post_local(1, switch_step=3), 8)) == {"g"}


def test_hierarchical_blocks_every_h_global_every_h_times_hb() -> None:
    assert "".join(trace(Schedule.hierarchical(2, 3), 14)) == ".B.B.G.B.B.G.B"


def test_hierarchical_composes_with_post_local() -> None:
    assert "".join(trace(Schedule.hierarchical(2, 2, switch_step=3), 12)) == "ggg.B.G.B.G."


def test_hierarchical_with_h1_is_minibatch_within_blocks() -> None:
    assert trace(Schedule.hierarchical(1, 3), 6) == ["b", "b", "bG", "b", "b", "bG"]


def test_hierarchical_with_hb1_is_flat() -> None:
    assert trace(Schedule.hierarchical(3, 1), 6) == trace(Schedule.local(3), 6)


def test_schedule_is_a_pure_function_of_t() -> None:
    s = Schedule.post_local(3, switch_step=2)
    forward = [s.sync_at(t) for t in range(20)]
    backward = [s.sync_at(t) for t in reversed(range(20))][::-1]
    assert forward == backward


def test_periods() -> None:
    s = Schedule.hierarchical(4, 8)
    assert (s.period(B), s.period(G)) == (4, 32)
    assert Schedule.local(16).period(G) == 16
    with pytest.raises(ValueError, match="no block level"):
        Schedule.local(16).period(B)


def test_round_trip() -> None:
    s = Schedule.hierarchical(4, 2, switch_step=7)
    assert Schedule.from_dict(s.to_dict()) == s
    assert str(s) == "Schedule(H=4, t'=7, H_b=2)"


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"local_steps": 0}, r"local_steps \(H\) must be an integer >= 1, got 0"),
        ({"local_steps": 2.5}, r"local_steps \(H\) must be an integer >= 1, got 2.5"),
        ({"local_steps": True}, r"local_steps \(H\) must be an integer >= 1, got True"),
        ({"switch_step": -1}, r"switch_step \(t'\) must be an integer >= 0, got -1"),
        ({"block_steps": 0}, r"block_steps \(H_b\) must be an integer >= 1, got 0"),
    ],
)
def test_invalid_values_name_the_value(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Schedule(**kwargs)


def test_negative_step_is_rejected() -> None:
    with pytest.raises(ValueError, match="got -1"):
        Schedule.local(2).sync_at(-1)
