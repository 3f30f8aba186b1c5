"""The cost model (localsgd.cost_model): bounds, limits, monotonicity, post-local mixing, bad inputs;
the `localsgd plan` command (localsgd.harness.planning)."""

from __future__ import annotations

import itertools
import json
import math

import pytest

from localsgd import cost_model
from localsgd.cost_model import Network, allreduce_seconds, predict
from localsgd.harness import planning

RESNET20 = 1_089_896  # bytes of ResNet-20's parameters in fp32
MBIT100 = cost_model.parse_rate("100mbit")


def by_label(rows: list[cost_model.Prediction]) -> dict[str, cost_model.Prediction]:
    return {r.label: r for r in rows}


def epochs(rows: list[cost_model.Prediction]) -> list[float]:
    return [r.seconds_per_epoch for r in rows]


@pytest.fixture
def slow_net() -> Network:
    return Network(latency=1e-3, bandwidth=MBIT100, overhead=0.5e-3)


def test_rates_and_sizes_parse() -> None:
    assert cost_model.parse_rate("100mbit") == 12.5e6
    assert cost_model.parse_rate("1gbit") == cost_model.parse_rate("1000mbit") == 125e6
    assert cost_model.parse_rate("inf") == math.inf
    assert cost_model.parse_size("1089896") == RESNET20
    assert cost_model.parse_size("1.5MB") == 1_500_000
    assert cost_model.parse_size("1MiB") == 2**20


def test_ring_segments_follow_gloo() -> None:
    assert cost_model.ring_segments(RESNET20, 2) == 4  # 2K segments below 2K MiB
    assert cost_model.ring_segments(RESNET20, 16) == 32
    assert cost_model.ring_segments(5 * 2**20, 2) == 6  # 5 segments of 1 MiB, rounded up to a multiple of K
    assert cost_model.ring_segments(100 * 2**20, 4) == 100


def test_allreduce_without_latency_is_the_ring_bandwidth_bound() -> None:
    for k in (2, 4, 16):
        for size in (2**16, RESNET20, 50 * 2**20):
            expected = 2 * (k - 1) / k * size / MBIT100
            assert allreduce_seconds(size, k, Network(bandwidth=MBIT100)) == pytest.approx(expected)


def test_allreduce_without_bandwidth_limit_costs_two_latencies_per_round() -> None:
    # m = 2 segments per worker: (K-1) rounds per phase, each an announcement and the data (2d).
    for k in (2, 4, 8):
        assert allreduce_seconds(RESNET20, k, Network(latency=1e-3)) == pytest.approx(4 * (k - 1) * 1e-3)


def test_allreduce_latency_bound_and_link_bound_regimes(slow_net: Network) -> None:
    # K=2, ResNet-20 at 100 Mbit/s: segments of S/4 take 21.8 ms > 2d, so the link is the bottleneck.
    x = RESNET20 / 4 / MBIT100
    assert allreduce_seconds(RESNET20, 2, slow_net) == pytest.approx(2 * (2 * x + 2e-3) + 0.5e-3)
    # Faster link than latency: each phase is 2d + x, then the second segment x later.
    fast = Network(latency=5e-3, bandwidth=cost_model.parse_rate("1gbit"))
    x = RESNET20 / 4 / fast.bandwidth
    assert allreduce_seconds(RESNET20, 2, fast) == pytest.approx(2 * (2 * 5e-3 + 2 * x))


def test_allreduce_grows_with_size_workers_latency_and_falls_with_bandwidth(slow_net: Network) -> None:
    base = allreduce_seconds(RESNET20, 4, slow_net)
    assert allreduce_seconds(2 * RESNET20, 4, slow_net) > base
    assert allreduce_seconds(RESNET20, 8, slow_net) > base
    assert allreduce_seconds(RESNET20, 4, Network(2e-3, MBIT100, 0.5e-3)) > base
    assert allreduce_seconds(RESNET20, 4, Network(1e-3, 10 * MBIT100, 0.5e-3)) < base


def test_lone_worker_and_empty_buffer_cost_nothing(slow_net: Network) -> None:
    assert allreduce_seconds(RESNET20, 1, slow_net) == 0.0
    assert allreduce_seconds(0, 4, slow_net) == 0.0
    rows = predict(0.1, RESNET20, 1, slow_net, steps_per_epoch=100, average_overhead=1e-3)
    assert epochs(rows) == pytest.approx([10.0] * len(rows))


def test_ideal_network_gives_compute_time() -> None:
    rows = predict(0.13, RESNET20, 16, Network(0.0, math.inf), steps_per_epoch=25, local_steps=[1, 4, 64])
    for r in rows:
        assert r.seconds_per_epoch == pytest.approx(25 * 0.13)
        assert r.speedup == pytest.approx(1.0)
        assert r.communication_share == pytest.approx(0.0)


def test_every_h_lies_between_minibatch_and_compute_only(slow_net: Network) -> None:
    rows = predict(0.13, RESNET20, 4, slow_net, steps_per_epoch=391, local_steps=[1, 2, 4, 16, 64, 1000])
    minibatch, bound = rows[0], rows[-1]
    assert minibatch.local_steps == 1 and minibatch.speedup == 1.0
    assert bound.local_steps is None and bound.seconds_per_epoch == pytest.approx(391 * 0.13)
    average = allreduce_seconds(RESNET20, 4, slow_net)
    assert bound.speedup == pytest.approx(1 + average / 0.13)  # the most any H can gain
    for r in rows:
        assert bound.seconds_per_epoch <= r.seconds_per_epoch <= minibatch.seconds_per_epoch
        assert 1.0 <= r.speedup <= bound.speedup


def test_monotonic_in_h(slow_net: Network) -> None:
    rows = predict(0.05, RESNET20, 8, slow_net, steps_per_epoch=100, local_steps=list(range(1, 70)))[:-1]
    times = epochs(rows)
    assert times == sorted(times, reverse=True)
    assert all(a.speedup < b.speedup for a, b in itertools.pairwise(rows))


def test_epoch_is_compute_plus_one_average_per_h_steps(slow_net: Network) -> None:
    average = allreduce_seconds(RESNET20, 4, slow_net) + 2e-3
    rows = by_label(predict(0.1, RESNET20, 4, slow_net, 200, [1, 16], average_overhead=2e-3))
    assert rows["mini-batch SGD"].seconds_per_epoch == pytest.approx(200 * (0.1 + average))
    assert rows["local SGD H=16"].seconds_per_epoch == pytest.approx(200 * 0.1 + 200 / 16 * average)
    assert rows["local SGD H=16"].seconds_per_step == pytest.approx(0.1 + average / 16)


def test_post_local_mixes_the_two_phases(slow_net: Network) -> None:
    def post(switch: float) -> cost_model.Prediction:
        rows = predict(
            0.1, RESNET20, 4, slow_net, 160, [1, 16], post_local=16, switch_epoch=switch, epochs=300
        )
        return next(r for r in rows if r.label.startswith("post-local"))

    rows = by_label(predict(0.1, RESNET20, 4, slow_net, 160, [1, 16]))
    minibatch, local = rows["mini-batch SGD"].seconds_per_epoch, rows["local SGD H=16"].seconds_per_epoch
    assert post(0).seconds_per_epoch == pytest.approx(local)
    assert post(300).seconds_per_epoch == pytest.approx(minibatch)
    assert post(150).seconds_per_epoch == pytest.approx((minibatch + local) / 2)
    assert post(75).seconds_per_epoch == pytest.approx((minibatch + 3 * local) / 4)
    assert post(150).switch_epochs == 150 and post(150).local_steps == 16


def test_post_local_counts_whole_periods_after_the_switch() -> None:
    net = Network(latency=1.0)  # one average costs 4 s at K=2; no compute
    rows = predict(0.0, 1000, 2, net, steps_per_epoch=10, local_steps=[1], post_local=4, switch_epoch=0.3)
    post = next(r for r in rows if r.label.startswith("post-local"))
    assert post.seconds_per_epoch == pytest.approx((3 + 7 // 4) * 4.0)  # 3 gradient averages, then 1


def test_encoded_bytes_by_hand() -> None:
    # 1000 fp32 values over K = 2: chunks of 500 values; blocks of 256 give 2 scales per chunk
    assert cost_model.encoded_bytes(4000, 2, "bf16") == 2 * 500 * 2
    assert cost_model.encoded_bytes(4000, 2, "int8") == 2 * (500 + 2 * 4)
    assert cost_model.encoded_bytes(4000, 2, "sign") == 2 * (63 + 2 * 4)  # ceil(500 / 8) bytes of signs
    assert cost_model.encoded_bytes(4000, 3, "int8", block_size=64) == 3 * (334 + 6 * 4)  # 334 = ceil(1000/3)


def test_compressed_mean_costs_by_hand() -> None:
    # K = 2, no latency: each stage sends one chunk of encoded / 2 bytes; one call each
    net = Network(bandwidth=100.0, overhead=0.5)
    assert cost_model.compressed_mean_seconds(1000, 2, net) == pytest.approx(1000 / 2 / 100 * 2 + 2 * 0.5)
    # K = 4, latency only: the all-to-all is one exchange (2d), the ring all-gather 3 rounds (3 * 2d)
    assert cost_model.compressed_mean_seconds(1000, 4, Network(latency=1.0)) == pytest.approx(2.0 + 6.0)
    # K = 4, bandwidth only: 3 chunks of 250 bytes in each stage
    assert cost_model.compressed_mean_seconds(1000, 4, Network(bandwidth=10.0)) == pytest.approx(2 * 3 * 25.0)
    assert cost_model.compressed_mean_seconds(1000, 1, net) == 0.0


def test_compression_changes_only_the_parameter_averages(slow_net: Network) -> None:
    encoded = cost_model.encoded_bytes(RESNET20, 4, "int8")
    wire = cost_model.compressed_mean_seconds(encoded, 4, slow_net)
    plain = by_label(predict(0.1, RESNET20, 4, slow_net, 160, [1, 16]))
    rows = by_label(
        predict(0.1, RESNET20, 4, slow_net, 160, [1, 16], compression="int8", codec_overhead=0.01)
    )
    assert rows["mini-batch SGD"] == plain["mini-batch SGD"]  # gradients travel as fp32
    assert rows["local SGD H=16"].seconds_per_step == pytest.approx(0.1 + (wire + 0.01) / 16)
    assert encoded < RESNET20 / 3.9


def test_overlap_hides_what_fits_in_tau_steps() -> None:
    net = Network(bandwidth=1000.0)  # a K = 2 all-reduce of 100 bytes: 0.1 s
    rows = by_label(predict(0.03, 100, 2, net, 64, [1, 4, 16], overlap_steps=2, average_overhead=0.001))
    assert rows["mini-batch SGD"].seconds_per_step == pytest.approx(0.03 + 0.101)  # not overlapped
    # the copies are the worker's own work: they show whole
    assert rows["local SGD H=4"].seconds_per_step == pytest.approx(0.03 + (0.001 + 0.1 - 2 * 0.03) / 4)
    rows = by_label(predict(0.06, 100, 2, net, 64, [1, 4, 16], overlap_steps=2))
    assert rows["local SGD H=16"].seconds_per_step == pytest.approx(0.06)  # hidden entirely
    post = predict(0.03, 100, 2, net, 64, [1], post_local=4, switch_epoch=0.5, overlap_steps=3)[-2]
    assert post.seconds_per_epoch == pytest.approx(64 * 0.03 + 32 * 0.1 + 8 * (0.1 - 3 * 0.03))


def test_compressed_overlap_hides_the_all_to_all_only() -> None:
    """K = 2, 1000 B/s, 100 B per chunk of int8 (2 x 100 encoded): each stage 0.1 s."""
    net = Network(bandwidth=1000.0)
    encoded = cost_model.encoded_bytes(4 * 192, 2, "int8", block_size=96)  # 2 chunks of 96 + one scale
    assert encoded == 2 * (96 + 4) and cost_model.compressed_stages(encoded, 2, net) == pytest.approx(
        (0.1, 0.1)
    )
    rows = predict(0.03, 4 * 192, 2, net, 64, [8], compression="int8", block_size=96,
                   codec_overhead=0.005, overlap_steps=2)  # fmt: skip
    # the all-to-all less two steps of compute, the all-gather whole, encoding whole
    assert rows[0].seconds_per_step == pytest.approx(0.03 + (0.005 + (0.1 - 0.06) + 0.1) / 8)


def test_hierarchical_step_by_hand() -> None:
    inner, outer = Network(latency=0.5), Network(latency=2.0)  # no bandwidth limit: 2d per round
    # K' = 2: one round per phase, 2 * 2d = 2 s; K = 4 over the outer link: 4 (K - 1) d = 24 s
    seconds = cost_model.hierarchical_seconds_per_step(
        0.1, 1000, 4, 2, inner, outer, 4, 3, average_overhead=0.5
    )
    assert seconds == pytest.approx(0.1 + (2 * (2.0 + 0.5) + (24.0 + 0.5)) / 12)
    # H_b = 1 is flat local SGD on the outer link
    flat = by_label(predict(0.1, 1000, 4, outer, 10, [4]))["local SGD H=4"].seconds_per_step
    assert cost_model.hierarchical_seconds_per_step(0.1, 1000, 4, 2, inner, outer, 4, 1) == pytest.approx(
        flat
    )
    with pytest.raises(ValueError, match=r"^workers_per_block \(K'\) = 3 must divide"):
        cost_model.hierarchical_seconds_per_step(0.1, 1000, 4, 3, inner, outer, 4, 3)


@pytest.mark.parametrize(
    ("call", "named"),
    [
        (lambda n: predict(-0.1, RESNET20, 4, n, 100), "compute_seconds (c)"),
        (lambda n: predict(math.nan, RESNET20, 4, n, 100), "compute_seconds (c)"),
        (lambda n: predict(0.1, 0, 4, n, 100), "model_bytes (S)"),
        (lambda n: predict(0.1, RESNET20, 0, n, 100), "workers (K)"),
        (lambda n: predict(0.1, RESNET20, True, n, 100), "workers (K)"),
        (lambda n: predict(0.1, RESNET20, 4, n, 0), "steps_per_epoch (N)"),
        (lambda n: predict(0.1, RESNET20, 4, n, 100, local_steps=[1, 0]), "local_steps (H)"),
        (lambda n: predict(0.1, RESNET20, 4, n, 100, local_steps=[2.5]), "local_steps (H)"),
        (lambda n: predict(0.1, RESNET20, 4, n, 100, local_steps=[]), "local_steps"),
        (lambda n: predict(0.1, RESNET20, 4, n, 100, local_steps=4), "local_steps"),
        (lambda n: predict(0.1, RESNET20, 4, n, 100, post_local=0), "post_local"),
        (
            lambda n: predict(0.1, RESNET20, 4, n, 100, post_local=16, switch_epoch=400, epochs=300),
            "switch_epoch",
        ),
        (lambda n: predict(0.1, RESNET20, 4, n, 100, epochs=0), "epochs"),
        (lambda n: predict(0.1, RESNET20, 4, n, 100, average_overhead=-1), "average_overhead"),
        (lambda n: predict(0.1, RESNET20, 4, "fast", 100), "network"),
        (lambda n: predict(0.1, RESNET20, 4, n, 100, [1, 4], overlap_steps=4), "overlap_steps"),
        (lambda n: predict(0.1, RESNET20, 4, n, 100, overlap_steps=-1), "overlap_steps"),
        (lambda n: predict(0.1, RESNET20, 4, n, 100, compression="zip"), "compression"),
        (
            lambda n: predict(0.1, RESNET20, 4, n, 100, compression="int8", codec_overhead=-1),
            "codec_overhead",
        ),
        (lambda n: Network(latency=-1e-3), "latency"),
        (lambda n: Network(bandwidth=0), "bandwidth"),
        (lambda n: Network(overhead=math.inf), "overhead"),
        (lambda n: cost_model.parse_rate("fast"), "bandwidth"),
        (lambda n: cost_model.parse_rate("-100mbit"), "bandwidth"),
        (lambda n: cost_model.parse_rate("100mbps"), "bandwidth"),
        (lambda n: cost_model.parse_size("1.09 parsecs"), "model size"),
        (lambda n: cost_model.steps_per_epoch(50_000, 4, 0), "local_batch_size (B_loc)"),
        (lambda n: cost_model.steps_per_epoch(3, 4, 32), "train_samples"),
        (lambda n: cost_model.steps_per_epoch(100, 4, 32), "local_batch_size (B_loc)"),
    ],
)
def test_bad_input_is_one_clear_line(call, named: str, slow_net: Network) -> None:
    with pytest.raises(ValueError) as info:
        call(slow_net)
    message = str(info.value)
    assert "\n" not in message and message.startswith(named)
    assert "got" in message or "must be" in message


def test_steps_per_epoch_matches_the_training_harness() -> None:
    from localsgd.harness.config import Config
    from localsgd.harness.tasks import shard_steps

    for k, b in [(2, 32), (4, 64), (16, 128), (3, 100)]:
        harness = shard_steps(Config(workers=k, local_batch_size=b), 50_000)
        assert cost_model.steps_per_epoch(50_000, k, b) == harness


def test_command_line_table_and_json(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--compute-ms", "130", "--workers", "4", "--local-batch-size", "32", "--latency-ms", "1"]
    args += ["--bandwidth", "100mbit", "--post-local", "16", "--epochs", "300"]
    assert planning.main(args) == 0
    out = capsys.readouterr().out
    assert "N=391 steps/epoch" in out and "local SGD H=64" in out and "post-local H=16, t'=150/300" in out
    assert planning.main([*args, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["steps_per_epoch"] == 391
    assert [r["local_steps"] for r in data["rows"]] == [1, 4, 16, 64, 16, None]


def test_command_line_bad_value_prints_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert planning.main(["--compute-ms", "130", "--workers", "4", "--bandwidth", "fast"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "bandwidth" in err and "'fast'" in err
    assert planning.main(["--compute-ms", "-1", "--workers", "4"]) == 2
    assert "--compute-ms" in capsys.readouterr().err


PLAN = ["--compute-ms", "130", "--workers", "4"]
MEANINGLESS = [
    (["--compute-ms", "0", "--workers", "4"], "--compute-ms must be a local step's measured time, a number > 0 (ms), got 0"),
    ([*PLAN, "--switch-epoch", "10"], "--switch-epoch 10 needs --post-local H"),
    ([*PLAN, "--compress-block", "64"], "--compress-block 64 needs --compress int8 or sign"),
    ([*PLAN, "--compress", "bf16", "--compress-block", "64"], "--compress-block 64 needs --compress int8 or sign"),
    ([*PLAN, "--codec-overhead-ms", "1"], "--codec-overhead-ms 1 needs --compress"),
    ([*PLAN, "--compress", "int8", "--compress-block", "1000000"],
     "--compress-block 1000000 exceeds the model's 272474 parameters (--model-bytes / 4)"),
    ([*PLAN, "--local-batch-size", "20000"],
     "local_batch_size (B_loc) must be at most each worker's shard of 12500 samples (50000 / workers (K) = 4), "
     "got 20000"),
]  # fmt: skip


@pytest.mark.parametrize("args,message", MEANINGLESS, ids=[" ".join(a) for a, _ in MEANINGLESS])
def test_command_line_inputs_that_make_the_model_meaningless_are_one_line(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """No measured compute time, an option nothing reads (silently ignored before), a block larger
    than the model, a batch larger than a worker's shard (the training harness refuses it too)."""
    assert planning.main(args) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith(f"localsgd plan: error: {message}")
    assert captured.err.count("\n") == 1
