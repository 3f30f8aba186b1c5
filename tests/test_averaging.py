"""Flat, bucketed averaging over the in-process communicator."""

from __future__ import annotations

import pytest
import torch

from localsgd import FlatAverager, Level, SimCommunicator


def worker_tensors(k: int) -> list[torch.Tensor]:
    """Integer-valued tensors (exact means) of three dtypes; one is channels_last."""
    conv = torch.full((4, 3, 2, 2), float(k)).to(memory_format=torch.channels_last)
    conv[0, 1] += torch.arange(4.0).view(2, 2)  # a layout-sensitive pattern
    return [
        torch.arange(5.0) * (k + 1),
        torch.full((2, 3), float(4 * k), dtype=torch.float64),
        conv,
        torch.full((7,), float(2 * k), dtype=torch.bfloat16),
        torch.tensor(float(k)),
    ]


@pytest.mark.parametrize("bucket_bytes", [1, 24, 2**20])
def test_average_is_the_exact_mean_in_place(bucket_bytes: int) -> None:
    comm = SimCommunicator(4)
    tensors = [worker_tensors(k) for k in range(4)]
    expected = [torch.stack(ts).mean(0) for ts in zip(*tensors, strict=True)]
    storage = [[t.data_ptr() for t in ts] for ts in tensors]
    nbytes = FlatAverager(comm, bucket_bytes).average_(Level.GLOBAL, tensors)
    assert nbytes == sum(t.numel() * t.element_size() for t in tensors[0])
    for k in range(4):
        for got, want in zip(tensors[k], expected, strict=True):
            assert got.dtype == want.dtype
            assert torch.equal(got, want)
        assert [t.data_ptr() for t in tensors[k]] == storage[k]  # copied back, never rebound
        assert tensors[k][2].is_contiguous(memory_format=torch.channels_last)


def test_block_level_averages_within_consecutive_blocks() -> None:
    comm = SimCommunicator(4, workers_per_block=2)
    tensors = [[torch.tensor([float(k), 10.0 * k])] for k in range(4)]
    FlatAverager(comm).average_(Level.BLOCK, tensors)
    assert [ts[0].tolist() for ts in tensors] == [[0.5, 5.0], [0.5, 5.0], [2.5, 25.0], [2.5, 25.0]]


def test_buckets_split_by_dtype_and_size() -> None:
    averager = FlatAverager(SimCommunicator(2), bucket_bytes=16)
    ts = [torch.zeros(2), torch.zeros(2, dtype=torch.float64), torch.zeros(2), torch.zeros(3), torch.zeros(9)]
    plan = averager._plan(ts)
    assert [(b.dtype, b.indices) for b in plan] == [
        (torch.float32, [0, 2]),
        (torch.float64, [1]),
        (torch.float32, [3]),
        (torch.float32, [4]),  # larger than a bucket: a bucket of its own
    ]
    assert averager._plan([torch.ones(2), torch.ones(2, dtype=torch.float64), *ts[2:]]) is plan  # reused


def test_broadcast_copies_worker_zero() -> None:
    tensors = [worker_tensors(k) for k in range(3)]
    FlatAverager(SimCommunicator(3)).broadcast_(tensors)
    for k in (1, 2):
        assert all(torch.equal(a, b) for a, b in zip(tensors[0], tensors[k], strict=True))


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="bucket_bytes must be a positive integer, got 0"):
        FlatAverager(SimCommunicator(2), bucket_bytes=0)
    with pytest.raises(ValueError, match=r"workers \(K\) must be an integer >= 1, got 0"):
        SimCommunicator(0)
    with pytest.raises(
        ValueError, match=r"workers_per_block \(K'\) = 3 must divide the number of workers K = 4"
    ):
        SimCommunicator(4, workers_per_block=3)
    with pytest.raises(ValueError, match="no block size is known"):
        SimCommunicator(4).group_size(Level.BLOCK)
