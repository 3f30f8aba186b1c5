"""Compressed averaging: each codec's error against bounds computed here, the two-stage mean
against the exact mean, error feedback, the bytes per worker for K = 2, 4, 8, and the simulator
against real gloo processes."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from localsgd import Schedule, SimCommunicator, Simulator, diloco
from localsgd.compression import CompressedMean, make_codec
from localsgd.schedule import Level
from tests.test_golden import Dyadic, optimizer
from tests.test_outer import drive, params


def vector(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g) * torch.logspace(-3, 1, n)[torch.randperm(n, generator=g)]


@pytest.mark.parametrize("n", [1, 7, 256, 1000, 4099])
def test_codecs_round_trip_within_their_bounds(n: int) -> None:
    """bf16 and fp16 round to 8 and 11 significant bits; int8 is within half a step (max|x| of the
    block / 254); sign gives exactly mean|x| of the block times the sign (numpy, independently)."""
    x = vector(n, seed=n)
    for name, rel in (("bf16", 2**-8), ("fp16", 2**-11)):
        codec = make_codec(name)
        d = codec.decode(codec.encode(x), n)
        big = x.abs() > 1e-4  # fp16 subnormals below ~6e-5 have fewer bits
        assert ((d - x).abs() <= rel * x.abs())[big].all(), name
        assert codec.nbytes(n) == 2 * n == codec.encode(x).numel()
    xs = x.numpy().astype(np.float64)
    for block in (8, 64, 256):
        int8, sign = make_codec("int8", block), make_codec("sign", block)
        assert int8.encode(x).numel() == int8.nbytes(n) == n + 4 * math.ceil(n / block)
        assert sign.encode(x).numel() == sign.nbytes(n) == math.ceil(n / 8) + 4 * math.ceil(n / block)
        d8, ds = int8.decode(int8.encode(x), n).numpy(), sign.decode(sign.encode(x), n).numpy()
        for start in range(0, n, block):
            part = slice(start, start + block)
            step = np.abs(xs[part]).max() / 127
            assert np.all(np.abs(d8[part] - xs[part]) <= step / 2 * (1 + 1e-5) + 1e-30)
            expected = np.abs(xs[part]).mean() * np.where(xs[part] >= 0, 1.0, -1.0)
            assert np.allclose(ds[part], expected, rtol=1e-5, atol=0)
    assert 4 * n / make_codec("int8").nbytes(n) >= (3.5 if n >= 256 else 0)  # >= 3.5x fewer bytes


def compressed_mean(name: str, flats: list[torch.Tensor], rounds: int = 1, feedback: bool = True):
    comm = SimCommunicator(len(flats))
    mean = CompressedMean(make_codec(name, 64))
    outs, nbytes = [], 0
    for _ in range(rounds):
        work = [f.clone() for f in flats]
        nbytes = mean.mean_(comm, Level.GLOBAL, work, key=0)
        assert all(torch.equal(work[0], w) for w in work[1:])  # every worker the same result
        outs.append(work[0])
        if not feedback:
            mean = CompressedMean(make_codec(name, 64))
    return outs, nbytes


@pytest.mark.parametrize("workers", [2, 4, 8])
def test_two_stage_mean_is_near_the_exact_mean_and_bytes_do_not_grow_with_k(workers: int) -> None:
    """int8: each stage is within half a quantisation step of what it encodes, so the result is
    within (max_k max|x_k| + max|mean|) / 254 of the exact mean. Each worker contributes K chunks of
    ceil(n/K) encoded values: about the encoded size of its buffer, whatever K (> 3.5x fewer bytes
    than fp32), where an all-gather of everyone's buffer would cost K - 1 of them."""
    n = 10_000
    flats = [vector(n, seed=k) for k in range(workers)]
    exact = torch.stack(flats).double().mean(0)
    (out,), nbytes = compressed_mean("int8", flats)
    bound = (max(f.abs().max() for f in flats) + exact.abs().max()) / 254
    assert (out.double() - exact).abs().max() <= bound * (1 + 1e-5)
    c = math.ceil(n / workers)
    assert nbytes == workers * (c + 4 * math.ceil(c / 64))
    assert nbytes <= make_codec("int8", 64).nbytes(n) + 4 * workers and 4 * n / nbytes > 3.5


@pytest.mark.parametrize("name", ["sign", "int8", "bf16"])
def test_error_feedback_makes_the_average_of_the_means_converge(name: str) -> None:
    """The same inputs averaged again and again: with error feedback the running average of the
    decoded means approaches the exact mean like 1/rounds (4x the rounds: at least 3x closer, until
    float32 rounding); without it, the error stays where one round puts it (for sign, about the
    size of the signal)."""
    flats = [vector(512, seed=10 + k) for k in range(4)]
    exact = torch.stack(flats).mean(0)
    with_ef, _ = compressed_mean(name, flats, rounds=400)
    without, _ = compressed_mean(name, flats, rounds=100, feedback=False)

    def error(outs: list[torch.Tensor]) -> float:
        return float((torch.stack(outs).mean(0) - exact).norm() / exact.norm())

    first = error(with_ef[:1])
    assert error(with_ef) < first / 15
    if error(with_ef[:100]) > 1e-4:
        assert error(with_ef) <= error(with_ef[:100]) / 3
    assert error(without) > first / 2


def run(workers: int, compression: str, steps: int = 14, outer=None) -> Simulator:
    sim = Simulator(Dyadic(), optimizer, Schedule.post_local(2, switch_step=3), workers,
                    outer_optimizer=outer, compression=compression)  # fmt: skip
    return drive(sim, 0, steps)


def test_compressed_training_stays_near_plain_averaging() -> None:
    """bf16 deltas: after 14 steps the workers are where plain averaging puts them to bf16
    precision of the deltas; the counters count half of fp32's bytes at global rounds."""
    plain, compressed = run(4, None), run(4, "bf16")
    for a, b in zip(plain.models, compressed.models, strict=True):
        for p, q in zip(a.parameters(), b.parameters(), strict=True):
            assert torch.allclose(p.double(), q.double(), rtol=0, atol=0.05), (p, q)
    assert params(plain.models) != params(compressed.models)
    (sp,), (sc,) = plain.stats.values(), compressed.stats.values()
    assert sp.rounds == sc.rounds
    assert sc.bytes < sp.bytes  # gradient rounds before t' are not compressed


def test_compressed_outer_state_resumes_bit_for_bit() -> None:
    """Residuals, anchor and outer momentum are in state_dict: resuming mid-period gives the
    uninterrupted run's bits."""
    full = run(2, "sign", steps=14, outer=diloco(0.5, 0.5))
    first = run(2, "sign", steps=8, outer=diloco(0.5, 0.5))
    state = copy.deepcopy(first.state_dict())
    assert state["compression"]["sent"]
    resumed = Simulator(Dyadic(), optimizer, Schedule.post_local(2, switch_step=3), 2,
                        outer_optimizer=diloco(0.5, 0.5), compression="sign")  # fmt: skip
    resumed.load_state_dict(state)
    drive(resumed, 8, 14)
    assert params(resumed.models) == params(full.models)


@pytest.mark.parametrize("compression", ["int8", "sign"])
def test_torchrun_sends_the_compressed_bytes_and_matches_the_simulator(
    tmp_path: Path, compression: str
) -> None:
    """4 gloo processes with DiLoCo and compression against the simulator: bit for bit; each rank
    sent only uint8 payloads at the global rounds (all-to-all, then all-gather), as many bytes as
    the counters say, and no all-reduce of parameters."""
    from tests.helpers import torchrun

    torchrun(4, "compressed", tmp_path, compression)
    sim = run(4, compression, outer=diloco(0.5, 0.5))
    for r in range(4):
        got = torch.load(tmp_path / f"rank{r}.pt", weights_only=True)
        assert [p.tolist() for p in got["params"]] == [p.tolist() for p in sim.models[r].parameters()]
        stats = got["stats"]["global"]
        assert (stats["rounds"], stats["bytes"]) == (sim.stats["global"].rounds, sim.stats["global"].bytes)
        # what was handed to the collectives in the local phase: uint8 only; the all-to-all took
        # each rank's whole encoded buffer (the bytes counted), the all-gather its own chunk (1/K)
        assert got["dtypes"] == {"torch.uint8"}
        assert got["a2a"] == got["compressed_bytes"] > 0 and got["gather"] * 4 == got["a2a"]
