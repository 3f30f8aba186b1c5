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
    plan = averager._plan([ts, ts])
    assert [(b.dtype, b.indices) for b in plan] == [
        (torch.float32, [0, 2]),
        (torch.float64, [1]),
        (torch.float32, [3]),
        (torch.float32, [4]),  # larger than a bucket: a bucket of its own
    ]
    again = [torch.ones(2), torch.ones(2, dtype=torch.float64), *ts[2:]]
    assert averager._plan([again, again]) is plan  # reused


def as_parameters(ts: list[torch.Tensor]) -> list[torch.Tensor]:
    return [torch.nn.Parameter(t.clone(), requires_grad=t.is_floating_point()) for t in ts]


@pytest.mark.parametrize("bucket_bytes", [1, 24, 2**20])
def test_packed_tensors_are_averaged_in_place_with_the_copied_path_result(bucket_bytes: int) -> None:
    comm = SimCommunicator(4)
    copied = [worker_tensors(k) for k in range(4)]
    params = [as_parameters(worker_tensors(k)) for k in range(4)]
    extra = [[torch.full((3,), float(k))] for k in range(4)]  # after the packed prefix: copied
    averager = FlatAverager(comm, bucket_bytes)
    assert averager.pack_(params)
    # one buffer per dtype whatever bucket_bytes (it applies to copied tensors)
    assert [b.dtype for b in averager._pack.plan] == [torch.float32, torch.float64, torch.bfloat16]
    objects = [[id(p) for p in ps] for ps in params]
    addresses = [[p.data_ptr() for p in ps] for ps in params]
    flats = {b.flats[k].data_ptr(): b.flats[k] for b in averager._pack.plan for k in range(4)}
    for ps in params:
        for p in ps:  # a view into one of the flat buffers, on a 64-byte boundary
            assert p.untyped_storage().data_ptr() in flats
            assert p.data_ptr() % 64 == 0
        assert ps[2].is_contiguous()  # one element order on every worker, whatever their strides

    copied_extra = [[torch.full((3,), float(k))] for k in range(4)]
    FlatAverager(comm, bucket_bytes).average_(
        Level.GLOBAL, [c + e for c, e in zip(copied, copied_extra, strict=True)]
    )
    nbytes = averager.average_(Level.GLOBAL, [p + e for p, e in zip(params, extra, strict=True)])

    assert nbytes == sum(t.numel() * t.element_size() for t in [*params[0], *extra[0]])
    for k in range(4):
        assert [id(p) for p in params[k]] == objects[k]
        assert [p.data_ptr() for p in params[k]] == addresses[k]  # averaged where they live
        for got, want in zip(params[k], copied[k], strict=True):
            assert torch.equal(got, want)
        assert extra[k][0].tolist() == [1.5] * 3
    assert averager.packed(params)


def test_a_replaced_parameter_is_packed_again_at_the_next_average() -> None:
    comm = SimCommunicator(2)
    params = [as_parameters(worker_tensors(k)) for k in range(2)]
    averager = FlatAverager(comm)
    averager.pack_(params)
    params[1][2].data = params[1][2].data.contiguous()  # e.g. model.to(memory_format=...)
    params[0][0].data = params[0][0].data.clone()
    assert not averager.packed(params)
    expected = [torch.stack(ts).mean(0) for ts in zip(*[worker_tensors(k) for k in range(2)], strict=True)]
    averager.average_(Level.GLOBAL, params)
    assert averager.packed(params)
    for k in range(2):
        for got, want in zip(params[k], expected, strict=True):
            assert torch.equal(got, want)


def test_workers_with_different_strides_average_element_by_element() -> None:
    comm = SimCommunicator(2)
    tensors = [worker_tensors(k) for k in range(2)]
    tensors[1][2] = tensors[1][2].contiguous()  # worker 0 channels_last, worker 1 not
    expected = [torch.stack(ts).mean(0) for ts in zip(*tensors, strict=True)]
    FlatAverager(comm).average_(Level.GLOBAL, tensors)
    for k in range(2):
        for got, want in zip(tensors[k], expected, strict=True):
            assert torch.equal(got, want)


def test_tensors_that_share_storage_or_are_not_dense_are_copied_not_packed() -> None:
    comm = SimCommunicator(2)
    for make in (lambda w: [w, w[:2]], lambda w: [w[:, ::2]]):
        tensors = [make(torch.arange(8.0).view(2, 4) * (k + 1)) for k in range(2)]
        expected = [torch.stack(ts).mean(0) for ts in zip(*tensors, strict=True)]
        averager = FlatAverager(comm)
        assert not averager.pack_(tensors)
        averager.average_(Level.GLOBAL, tensors)
        for k in range(2):
            for got, want in zip(tensors[k], expected, strict=True):
                assert torch.equal(got, want)


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
