"""The ``localsgd plan`` command: the cost model of ``localsgd.cost_model`` on the command line.

Its arguments (in milliseconds, tc rates and sizes with units; CIFAR-10's training set by default),
the checks that keep a prediction meaningful, and the table or JSON it prints.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import asdict

from localsgd._validate import check_number
from localsgd.cost_model import Network, Prediction, parse_rate, parse_size, predict, steps_per_epoch
from localsgd.harness.tables import Column, render

CIFAR10_TRAIN_SAMPLES = 50_000


def table(rows: Sequence[Prediction]) -> str:
    """The predictions as a text table."""
    columns = [
        Column("schedule", 34, lambda r: r.label, left=True),
        Column("s/step", 8, lambda r: f"{r.seconds_per_step:.4f}"),
        Column("s/epoch", 9, lambda r: f"{r.seconds_per_epoch:.1f}"),
        Column("comm", 6, lambda r: f"{100 * r.communication_share:.1f}%"),
        Column("speed-up", 8, lambda r: f"{r.speedup:.2f}x"),
        Column("MB/sync", 8, lambda r: f"{r.bytes_per_sync / 1e6:.3f}"),
    ]
    return render(columns, rows, rule=False)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``localsgd plan`` (shared by ``main`` and the ``localsgd`` command)."""
    add = p.add_argument
    add("--compute-ms", type=float, required=True, metavar="C",
        help="measured compute time of one local step of one worker (B_loc samples), ms")  # fmt: skip
    add("--workers", type=int, required=True, metavar="K", help="number of workers K")
    add("--model-bytes", default="1089896", metavar="S",
        help="bytes per average: 1089896, 1.09MB, 1.04MiB (default: ResNet-20, fp32)")  # fmt: skip
    add("--latency-ms", type=float, default=0.0, metavar="D",
        help="one-way latency d, ms (a round trip is 2d; default 0)")  # fmt: skip
    add("--bandwidth", default="inf", metavar="RATE",
        help="each worker's link rate per direction: 100mbit, 1gbit, inf (default inf)")  # fmt: skip
    add("--local-steps", type=int, nargs="+", default=[1, 4, 16, 64], metavar="H",
        help="averaging periods H of local SGD to compare (default 1 4 16 64)")  # fmt: skip
    add("--post-local", type=int, metavar="H", help="also post-local SGD with this H after t'")
    add("--epochs", type=float, default=300.0, help="run length in epochs (default 300)")
    add("--switch-epoch", type=float, metavar="EPOCH",
        help="t' of post-local SGD in epochs (default: half of --epochs)")  # fmt: skip
    add("--local-batch-size", type=int, default=128, metavar="B_LOC",
        help="samples per worker and step (default 128)")  # fmt: skip
    add("--train-samples", type=int, default=CIFAR10_TRAIN_SAMPLES,
        help="training set size (default 50000, CIFAR-10)")  # fmt: skip
    add("--overhead-ms", type=float, default=0.0,
        help="fixed cost of one all-reduce call, ms (measured on loopback; default 0)")  # fmt: skip
    add("--average-overhead-ms", type=float, default=0.0,
        help="cost of one average besides the all-reduce (flatten, copy back), ms (default 0)")  # fmt: skip
    add("--compress", metavar="CODEC",
        help="codec of the global parameter averages: bf16, fp16, int8, sign (default: fp32)")  # fmt: skip
    add("--compress-block", type=int, metavar="N", help="int8/sign block size (default 256)")
    add("--codec-overhead-ms", type=float,
        help="encoding and decoding time of one compressed average, ms (default 0)")  # fmt: skip
    add("--overlap-steps", type=int, default=0, metavar="TAU",
        help="apply each parameter average TAU steps after it starts (default 0: blocking)")  # fmt: skip
    add("--fragments", type=int, default=1, metavar="N",
        help="Streaming DiLoCo: N fragments, one synced every H/N steps (default 1)")  # fmt: skip
    add("--json", action="store_true", help="print JSON instead of a table")


def check_command(args: argparse.Namespace) -> None:
    """What makes ``localsgd plan``'s prediction meaningless: no measured compute time, an option
    nothing reads, a block larger than the model. ValueError, one line."""
    if args.compute_ms <= 0:  # (NaN and inf: check_number)
        raise ValueError(
            f"--compute-ms must be a local step's measured time, a number > 0 (ms), got {args.compute_ms:g}"
        )
    if args.switch_epoch is not None and args.post_local is None:
        raise ValueError(f"--switch-epoch {args.switch_epoch:g} needs --post-local H (t' is post-local's)")
    if args.compress_block is not None and args.compress not in ("int8", "sign"):
        raise ValueError(f"--compress-block {args.compress_block} needs --compress int8 or sign")
    if args.codec_overhead_ms is not None and args.compress is None:
        raise ValueError(f"--codec-overhead-ms {args.codec_overhead_ms:g} needs --compress")
    if args.compress_block is not None:
        parameters = math.ceil(parse_size(args.model_bytes) / 4)
        if args.compress_block > parameters:
            raise ValueError(
                f"--compress-block {args.compress_block} exceeds the model's {parameters} parameters "
                f"(--model-bytes / 4): a block holds at most every parameter"
            )


def run(args: argparse.Namespace) -> int:
    """Run ``localsgd plan`` on parsed arguments; a bad value prints one line and returns 2."""
    try:
        check_command(args)
        n = steps_per_epoch(args.train_samples, args.workers, args.local_batch_size)
        network = Network(
            latency=check_number("--latency-ms", args.latency_ms) / 1e3,
            bandwidth=parse_rate(args.bandwidth),
            overhead=check_number("--overhead-ms", args.overhead_ms) / 1e3,
        )
        switch = args.epochs / 2 if args.switch_epoch is None else args.switch_epoch
        rows = predict(
            compute_seconds=check_number("--compute-ms", args.compute_ms) / 1e3,
            model_bytes=parse_size(args.model_bytes),
            workers=args.workers,
            network=network,
            steps_per_epoch=n,
            local_steps=args.local_steps,
            post_local=args.post_local,
            switch_epoch=switch if args.post_local is not None else 0.0,
            epochs=args.epochs,
            average_overhead=check_number("--average-overhead-ms", args.average_overhead_ms) / 1e3,
            compression=args.compress,
            block_size=args.compress_block or 256,
            codec_overhead=check_number("--codec-overhead-ms", args.codec_overhead_ms or 0.0) / 1e3,
            overlap_steps=args.overlap_steps,
            fragments=args.fragments,
        )
    except ValueError as e:
        print(f"localsgd plan: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        rows_json = [asdict(r) for r in rows]
        print(json.dumps({"steps_per_epoch": n, "network": asdict(network), "rows": rows_json}))
    else:
        bits = network.bandwidth * 8
        bw = f"{bits / 1e9:g} Gbit/s" if bits >= 1e9 else f"{bits / 1e6:g} Mbit/s"
        bw = "unlimited" if math.isinf(bits) else bw
        print(
            f"K={args.workers}, B_loc={args.local_batch_size}, N={n} steps/epoch, c={args.compute_ms:g} ms, "
            f"S={parse_size(args.model_bytes)} B, d={args.latency_ms:g} ms, {bw}"
            + (f", {args.compress} averages" if args.compress else "")
            + (f", overlap τ={args.overlap_steps}" if args.overlap_steps else "")
            + (f", {args.fragments} fragments" if args.fragments > 1 else "")
        )
        print(table(rows))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``localsgd plan`` on its own (``python -m localsgd.harness.planning``)."""
    p = argparse.ArgumentParser(
        prog="localsgd plan",
        description="Predict seconds per epoch and the speed-up of local SGD (H) over mini-batch SGD.",
    )
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
