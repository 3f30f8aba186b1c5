"""Cost model: seconds per epoch of local SGD on a given network, and the speed-up of averaging
every H steps over mini-batch SGD (H = 1).

A step of one worker costs its compute time c (forward, backward and optimizer step on B_loc
samples) plus, every H-th step, one average over the K workers (nothing overlaps: LocalSGD waits
for each average). With A the time of one average and N steps per epoch,

    epoch(H) = N * c + (N / H) * A,        speed-up(H) = epoch(1) / epoch(H) <= 1 + A / c.

Post-local SGD runs the first t' steps with H = 1 and the rest with H. H = 1 averages gradients
and H > 1 parameters; both are one flat buffer of the model's size S, so both cost A.

One average is one all-reduce of S bytes plus a local overhead (flattening the tensors into the
buffer, copying the mean back). The all-reduce is modelled as gloo runs it on CPU (the ring
algorithm of ``gloo/allreduce.cc`` over its TCP transport):

* The buffer is cut into n = roundup(max(ceil(S / 1 MiB), 2K), K) segments of s = S / n bytes,
  m = n / K per worker. A reduce-scatter and then an all-gather each send (K - 1) * m segments per
  worker to its ring neighbour, two in flight at a time: (K - 1) * m / 2 rounds per phase.
* gloo's transport sends a segment only once the receiver has announced the matching receive,
  and a worker posts a round's receives only after the previous round's segments arrived. A
  round therefore takes a = 2d (the announcement, then the data; d the one-way latency) plus the
  transmission time x = s / beta of a segment, unless the link is the bottleneck: rounds start
  x + max(a, x) apart, and a phase of R rounds takes R (x + max(a, x)) + a + x - max(a, x).
* Without latency this is the classic ring bound 2 (K - 1) / K * S / beta; without bandwidth
  limit it is 4 (K - 1) d for m = 2 (S up to 2K MiB, which includes ResNet-20).

A fixed per-call ``overhead`` (software cost of one collective, measured on loopback) is added.
The model ignores TCP slow start, packet loss and competing traffic.

Two options change what a global parameter average (H > 1) costs; gradient averages (H = 1, and
post-local SGD before t') stay fp32 all-reduces:

* **Compression** (``localsgd.compression``): the pseudo-gradient is encoded and averaged in two
  collectives, an all-to-all and an all-gather, each sending K − 1 chunks of b = encoded / K bytes
  per worker. The all-to-all sends to all peers at once through the worker's one link:
  (K − 1) b / beta + 2d; the all-gather is a ring of K − 1 rounds of one chunk: (K − 1)(b / beta
  + 2d). Each is one call (``overhead``); encoding and decoding cost CPU time, a measured
  ``codec_overhead`` per average.
* **Overlap** (``overlap_steps`` τ): the average starts after its step and is waited for τ steps
  later, so only what the network needs beyond τ local steps shows: max(0, A − τ c), plus the
  local overhead (copies, encoding), which runs on the worker's own thread. Compressed, only the
  all-to-all is in flight; the all-gather runs when the average is applied. The model assumes the
  communication does not slow the computation down (the CPU time of the transport is spare); the
  measurements in ``benchmarks/network.py`` show what that is worth.
* **Fragments** (``fragments`` N, Streaming DiLoCo, ``localsgd.streaming``): each global period of H
  steps holds N syncs of S/N bytes, one every H/N steps, each modelled as above (all-reduce or
  compressed mean of S/N bytes, τ steps of it hidden when overlapped, the local overhead split in
  N). The link then carries S/N per sync: ``bytes_per_sync`` of a row is the payload of its largest
  collective (gradient averages: S).

Everything here is a pure function of its arguments (no I/O, no printing); the ``localsgd plan``
command, which reads them from the command line and prints the table, is ``localsgd.harness.planning``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from localsgd._validate import check_int, check_number, is_number

GLOO_MAX_SEGMENT_BYTES = 2**20  # gloo's AllreduceOptions::kMaxSegmentSize

_RATE_UNITS = {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "tbit": 1e12}
_SIZE_UNITS = {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_rate(text: str) -> float:
    """A link rate in tc's notation (``100mbit``, ``1gbit``, ``inf``) as bytes per second."""
    if str(text).strip().lower() in ("inf", "unlimited"):
        return math.inf
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z]*)\s*", str(text).lower())
    if match is None or match.group(2) not in _RATE_UNITS or float(match.group(1)) <= 0:
        raise ValueError(
            f"bandwidth must be a positive rate such as 100mbit, 1gbit or inf "
            f"(units: {', '.join(_RATE_UNITS)}), got {text!r}"
        )
    return float(match.group(1)) * _RATE_UNITS[match.group(2)] / 8


def parse_size(text: str) -> int:
    """A size in bytes: ``1089896``, ``1.09MB`` (10^6), ``1.04MiB`` (2^20)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z]*)\s*", str(text).lower())
    if match is None or (match.group(2) or "b") not in _SIZE_UNITS or float(match.group(1)) <= 0:
        raise ValueError(
            f"model size must be a positive number of bytes such as 1089896, 1.09MB or 1.04MiB "
            f"(units: {', '.join(_SIZE_UNITS)}), got {text!r}"
        )
    return round(float(match.group(1)) * _SIZE_UNITS[match.group(2) or "b"])


def steps_per_epoch(train_samples: int, workers: int, local_batch_size: int) -> int:
    """N: steps per epoch when K workers share ``train_samples`` in batches of B_loc (the training
    harness's rule: ceil((samples // K) / B_loc), the last batch may be short)."""
    check_int("train_samples", train_samples, 1)
    check_int("workers (K)", workers, 1)
    check_int("local_batch_size (B_loc)", local_batch_size, 1)
    if train_samples < workers:
        raise ValueError(f"train_samples must be at least workers (K) = {workers}, got {train_samples}")
    if local_batch_size > train_samples // workers:
        raise ValueError(
            f"local_batch_size (B_loc) must be at most each worker's shard of {train_samples // workers} "
            f"samples ({train_samples} / workers (K) = {workers}), got {local_batch_size}"
        )
    return math.ceil(train_samples // workers / local_batch_size)


@dataclass(frozen=True)
class Network:
    """The link of every worker to the others (all alike; full duplex).

    Args:
        latency: d, one-way latency in seconds (a round trip is 2d).
        bandwidth: beta, bytes per second in each direction (``math.inf``: no limit).
        overhead: fixed seconds per all-reduce call (software cost; measured on loopback).
    """

    latency: float = 0.0
    bandwidth: float = math.inf
    overhead: float = 0.0

    def __post_init__(self) -> None:
        check_number("latency", self.latency)
        if not (is_number(self.bandwidth) and self.bandwidth > 0):
            raise ValueError(f"bandwidth must be a number of bytes/s > 0 or inf, got {self.bandwidth!r}")
        check_number("overhead", self.overhead)


def ring_segments(nbytes: int, workers: int) -> int:
    """n: how many segments gloo's ring all-reduce cuts ``nbytes`` into for K workers."""
    n = max(math.ceil(nbytes / GLOO_MAX_SEGMENT_BYTES), 2 * workers)
    return math.ceil(n / workers) * workers


def allreduce_seconds(nbytes: int, workers: int, network: Network) -> float:
    """Seconds of one gloo ring all-reduce of ``nbytes`` (S) over K = ``workers`` (see the module
    docstring for the model)."""
    check_int("nbytes (S)", nbytes, 0)
    check_int("workers (K)", workers, 1)
    if workers == 1 or nbytes == 0:
        return 0.0
    n = ring_segments(nbytes, workers)
    rounds = (workers - 1) * (n // workers) / 2  # per phase; two segments in flight
    x = nbytes / n / network.bandwidth  # transmission time of one segment
    a = 2 * network.latency  # receive announcement, then the data
    gap = max(a, x)  # the latency chain, or the link, whichever is slower
    phase = rounds * (x + gap) + a + x - gap
    return 2 * phase + network.overhead


def encoded_bytes(model_bytes: int, workers: int, codec: str, block_size: int = 256) -> int:
    """Bytes each worker contributes to one compressed average of an fp32 model of ``model_bytes``
    (what ``CompressedMean.mean_`` returns): K chunks of the encoded buffer."""
    from localsgd.compression import make_codec

    numel = math.ceil(check_int("model_bytes (S)", model_bytes, 0) / 4)
    k = check_int("workers (K)", workers, 1)
    return k * make_codec(codec, block_size).nbytes(math.ceil(numel / k))


def compressed_stages(encoded: int, workers: int, network: Network) -> tuple[float, float]:
    """Seconds of the two collectives of one compressed mean whose encoded buffer is ``encoded``
    bytes per worker: (the all-to-all, the ring all-gather), each of K − 1 chunks of encoded / K
    bytes (see the module docstring). Encoding and decoding are not included."""
    check_int("encoded bytes", encoded, 0)
    k = check_int("workers (K)", workers, 1)
    if k == 1 or encoded == 0:
        return 0.0, 0.0
    x = encoded / k / network.bandwidth  # one chunk on the link
    a = 2 * network.latency
    return (k - 1) * x + a + network.overhead, (k - 1) * (x + a) + network.overhead


def compressed_mean_seconds(encoded: int, workers: int, network: Network) -> float:
    """Seconds of one compressed mean's two collectives (``compressed_stages``), one after the other."""
    return sum(compressed_stages(encoded, workers, network))


def hierarchical_seconds_per_step(
    compute_seconds: float,
    model_bytes: int,
    workers: int,
    workers_per_block: int,
    inner: Network,
    outer: Network,
    local_steps: int,
    block_steps: int,
    average_overhead: float = 0.0,
) -> float:
    """Seconds per step of hierarchical local SGD: blocks of K' workers average over their
    ``inner`` links every H steps, and all K every H·H_b steps over the ``outer`` links between
    blocks (that average replaces the block average of its step). A ring over all K workers is as
    slow as its slowest hop, the outer link; with two blocks each direction of a block's uplink
    carries one hop of the ring, so the global average costs ``allreduce_seconds`` on ``outer``."""
    c = check_number("compute_seconds (c)", compute_seconds)
    k, kb = check_int("workers (K)", workers, 1), check_int("workers_per_block (K')", workers_per_block, 1)
    if k % kb:
        raise ValueError(f"workers_per_block (K') = {kb} must divide workers (K) = {k}")
    h, hb = check_int("local_steps (H)", local_steps, 1), check_int("block_steps (H_b)", block_steps, 1)
    local = check_number("average_overhead", average_overhead)
    block = allreduce_seconds(model_bytes, kb, inner) + local if kb > 1 else 0.0
    whole = allreduce_seconds(model_bytes, k, outer) + local if k > 1 else 0.0
    return c + ((hb - 1) * block + whole) / (h * hb)


@dataclass(frozen=True)
class Prediction:
    """One schedule's predicted cost. ``local_steps`` is None for the compute-only bound (H = inf)."""

    label: str
    local_steps: int | None
    switch_epochs: float
    seconds_per_step: float
    seconds_per_epoch: float
    communication_share: float
    speedup: float
    bytes_per_sync: int = 0  # payload of one collective per worker (0: never communicates)


def predict(
    compute_seconds: float,
    model_bytes: int,
    workers: int,
    network: Network,
    steps_per_epoch: int,
    local_steps: Sequence[int] = (1, 4, 16, 64),
    post_local: int | None = None,
    switch_epoch: float = 0.0,
    epochs: float = 1.0,
    average_overhead: float = 0.0,
    compression: str | None = None,
    block_size: int = 256,
    codec_overhead: float = 0.0,
    overlap_steps: int = 0,
    fragments: int = 1,
) -> list[Prediction]:
    """Predicted seconds per epoch of each schedule and its speed-up over mini-batch SGD (H = 1).

    Args:
        compute_seconds: c, seconds of one local step (B_loc samples) without any averaging.
        model_bytes: S, bytes of one model average (the parameters, fp32: 4 bytes each).
        workers: K.
        network: latency d, bandwidth beta and per-call overhead.
        steps_per_epoch: N (see ``steps_per_epoch()``).
        local_steps: the H values of local SGD (averaging every H steps from the start).
        post_local: H of post-local SGD after the switch (None: no post-local row).
        switch_epoch: t' in epochs (t' = switch_epoch * N steps) for post-local SGD.
        epochs: length of the run; post-local's seconds per epoch are the mean over it.
        average_overhead: seconds per average spent outside the all-reduce (flatten, copy back).
        compression: codec of the global parameter averages (``bf16``, ``fp16``, ``int8``,
            ``sign``; None: fp32 all-reduce). Gradient averages (H = 1) are not compressed.
        block_size: the int8 and sign codecs' block.
        codec_overhead: seconds per compressed average spent encoding and decoding.
        overlap_steps: τ; a parameter average shows only where it takes longer than τ steps.
            Must be less than every H > 1 (and post-local's H) divided by ``fragments``.
        fragments: N, Streaming DiLoCo: every H > 1 holds N syncs of S/N bytes (N must divide it).

    The last row is the compute-only bound (H = inf).
    """
    c = check_number("compute_seconds (c)", compute_seconds)
    s = check_int("model_bytes (S)", model_bytes, 1)
    k = check_int("workers (K)", workers, 1)
    n = check_int("steps_per_epoch (N)", steps_per_epoch, 1)
    if not isinstance(network, Network):
        raise ValueError(f"network must be a localsgd.cost_model.Network, got {type(network).__name__}")
    if isinstance(local_steps, int | str) or not local_steps:
        raise ValueError(f"local_steps must be a non-empty list of integers H >= 1, got {local_steps!r}")
    hs = [check_int("local_steps (H)", h, 1) for h in local_steps]
    if post_local is not None:
        check_int("post_local (H after the switch)", post_local, 1)
    total_epochs = check_number("epochs", epochs)
    if total_epochs == 0:
        raise ValueError("epochs must be a number > 0, got 0")
    switch = check_number("switch_epoch (t' in epochs)", switch_epoch)
    if switch > total_epochs:
        raise ValueError(f"switch_epoch (t') must be at most epochs = {total_epochs:g}, got {switch:g}")
    local = check_number("average_overhead", average_overhead)
    tau = check_int("overlap_steps (τ)", overlap_steps, 0)
    frags = check_int("fragments (N)", fragments, 1)
    periods = [h for h in [*hs, post_local or 1] if h > 1]
    undivided = [h for h in periods if h % frags]
    if undivided:
        raise ValueError(f"fragments (N) = {frags} must divide every H > 1, got H = {undivided[0]}")
    too_short = [h for h in periods if h // frags <= tau]
    if too_short:
        bound = "every H > 1" if frags == 1 else f"every H / N (N = {frags})"
        raise ValueError(f"overlap_steps (τ) = {tau} must be less than {bound}, got H = {too_short[0]}")
    codec = check_number("codec_overhead", codec_overhead)
    average = allreduce_seconds(s, k, network) + local if k > 1 else 0.0  # a lone worker never averages
    # A parameter average: CPU work on the worker's own thread (copies, encoding), which shows
    # whole, and time on the network, of which τ steps' worth is hidden when overlapped. A
    # compressed average in flight has only its all-to-all in flight; the all-gather shows.
    # With N fragments a parameter average is N syncs of S/N bytes (the same local costs, split).
    part = math.ceil(s / frags)
    if k == 1:
        exposed = 0.0
    elif compression is None:
        exposed = local / frags + max(0.0, allreduce_seconds(part, k, network) - tau * c)
    else:
        exchange, gather = compressed_stages(encoded_bytes(part, k, compression, block_size), k, network)
        exposed = (local + codec) / frags + max(0.0, exchange - tau * c) + gather
    sync_bytes = part if compression is None else encoded_bytes(part, k, compression, block_size)

    def per_average(h: int) -> float:
        return average if h == 1 else frags * exposed

    def epoch(h: int) -> float:
        return n * c + n / h * per_average(h)

    minibatch = epoch(1)

    def row(
        label: str, h: int | None, seconds: float, switch_epochs: float = 0.0, largest: int = 0
    ) -> Prediction:
        comm = (seconds - n * c) / seconds if seconds > 0 else 0.0
        speedup = minibatch / seconds if seconds > 0 else 1.0 if minibatch == 0 else math.inf
        largest = largest if k > 1 else 0  # a lone worker sends nothing
        return Prediction(label, h, switch_epochs, seconds / n, seconds, comm, speedup, largest)

    rows = [
        row(
            "mini-batch SGD" if h == 1 else f"local SGD H={h}",
            h,
            epoch(h),
            largest=s if h == 1 else sync_bytes,
        )
        for h in hs
    ]
    if post_local is not None:
        # Exact counts over the run: t' mini-batch steps, then one average per H local steps.
        total_steps = round(total_epochs * n)
        t_switch = round(switch * n)
        local_rounds = (total_steps - t_switch) // post_local
        seconds = total_steps * c + t_switch * average + local_rounds * per_average(post_local)
        seconds /= total_epochs
        label = f"post-local H={post_local}, t'={switch:g}/{total_epochs:g} ep"
        rows.append(row(label, post_local, seconds, switch, largest=s if t_switch else sync_bytes))
    rows.append(row("compute only (H=inf)", None, n * c))
    return rows
