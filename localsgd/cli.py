"""The ``localsgd`` command."""

from __future__ import annotations

import argparse
import os
import sys


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="localsgd", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo",
        help="compare mini-batch, local, post-local and hierarchical local SGD on a synthetic task",
        description="Runs in the simulator, or one worker per process under torchrun "
        "(torchrun --nproc-per-node 4 -m localsgd demo).",
    )
    demo.add_argument("--workers", type=positive_int, default=8, help="K (simulator only; default 8)")
    demo.add_argument("--epochs", type=positive_int, default=6, help="epochs (default 6)")
    demo.add_argument("--local-steps", type=positive_int, default=16, help="H (default 16)")
    demo.add_argument("--local-batch-size", type=positive_int, default=32, help="B_loc (default 32)")
    demo.add_argument("--seed", type=int, default=0)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "demo":
        import torch
        import torch.distributed as dist

        from localsgd.harness import demo

        torch.set_num_threads(1 if "WORLD_SIZE" in os.environ else torch.get_num_threads())
        if "WORLD_SIZE" in os.environ:
            dist.init_process_group("gloo")
        try:
            demo.main(args.workers, args.epochs, args.local_steps, args.local_batch_size, args.seed)
            if dist.is_initialized():
                dist.barrier()  # no rank tears its connections down while a peer still uses them
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
