"""Sharded workers: what each rank holds and sends at S = 1, 2, 4 ranks per worker (W = 4 gloo
processes, K = W / S workers), DiLoCo (AdamW inside, Nesterov outside) on a GPT of a few hundred MB.

    python benchmarks/sharded.py                      # GPT d=512, 8 blocks (25.8M parameters)
    python benchmarks/sharded.py --width 128 --depth 2 --steps 4   # a quick look
    python benchmarks/sharded.py --device cuda --world 4           # on 4 GPUs (NCCL)

Per rank, counted from the tensors themselves (exact, in MB of 2^20 bytes): the parameters it holds
(its shards), the inner optimizer's state, localsgd's state (anchor and outer momentum, for its
shards) and localsgd's averaging buffers held between averages; the flat copy of this rank's shards
that a sharded average allocates while it runs, and frees (unsharded parameters are packed in
place and averaged without one), is shown apart. Sent: the payload
bytes of one global average, per rank (``LocalSGD.stats``). Peak RSS: the process's high-water
mark, which also holds PyTorch itself, the activations and the gathered parameters of one block
(on CUDA also the device's peak allocated memory, in the JSON).
S = 1 is today's unsharded path (no mesh). Writes benchmarks/results/sharded.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

from common import write_result

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MB = 2**20


def tensor_bytes(tensors) -> int:
    from localsgd.sharding import local

    return sum(local(t).numel() * t.element_size() for t in tensors if hasattr(t, "element_size"))


def worker(args: argparse.Namespace) -> None:
    """One rank under torchrun: build, train ``--steps`` steps (every second one averages), count."""
    import torch
    import torch.distributed as dist
    from torch.nn import functional as F

    from localsgd import LocalSGD, Schedule, diloco
    from localsgd.harness.language import GPT

    torch.set_num_threads(1)
    cuda = args.device == "cuda"
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world, (shards,) = dist.get_rank(), dist.get_world_size(), args.shards
    torch.manual_seed(0)
    model = GPT(256, args.width, args.depth, args.heads, args.context).to(device)
    mesh = None
    if shards > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        shape = (world // shards, shards)
        mesh = init_device_mesh(device.type, shape, mesh_dim_names=("replicate", "shard"))
        for block in model.blocks:
            fully_shard(block, mesh=mesh["shard"])
        fully_shard(model, mesh=mesh["shard"])
    inner = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt = LocalSGD(inner, model, Schedule.local(2), mesh=mesh, outer_optimizer=diloco())
    g = torch.Generator().manual_seed(rank)
    for _ in range(args.steps):
        tokens = torch.randint(0, 256, (args.batch, args.context + 1), generator=g).to(device)
        loss = F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
    (outer,) = opt._outer_steps()
    buckets = [b for plan in opt._averager._plans.values() for b in plan]
    stats = opt.stats["global"]
    row = {
        "rank": rank,
        "shards": shards,
        "workers": world // shards,
        "parameters": tensor_bytes(model.parameters()),
        "inner_state": tensor_bytes(v for s in inner.state.values() for k, v in s.items() if k != "step"),
        "localsgd_state": tensor_bytes(outer.anchor)
        + tensor_bytes(v for s in outer.optimizer.state.values() for v in s.values()),
        "averaging_buffers": tensor_bytes(f for b in buckets for f in b.flats),  # held between averages
        "averaging_copy": sum(b.nbytes for b in buckets),  # allocated during an average
        "sent_per_average": stats.bytes // max(1, stats.rounds),
        "rounds": stats.rounds,
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "peak_device": torch.cuda.max_memory_allocated(device) if cuda else None,
    }
    Path(args.out, f"S{shards}-rank{rank}.json").write_text(json.dumps(row))
    dist.destroy_process_group()
    os._exit(0)  # skip gloo's C++ teardown, which can abort at exit (see localsgd/harness/cli.py: finish)


def launch(args: argparse.Namespace, shards: int, out: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={args.world}", __file__, "--worker", "--shards", str(shards),
               "--out", out, "--width", str(args.width),
               "--depth", str(args.depth), "--heads", str(args.heads), "--context", str(args.context),
               "--batch", str(args.batch), "--steps", str(args.steps), "--device", args.device]  # fmt: skip
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=int, default=4, help="processes W (default 4)")
    parser.add_argument("--shards", type=int, nargs="+", default=[1, 2, 4], help="S values (default 1 2 4)")
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4, help="steps per run (every 2nd averages)")
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="cuda: NCCL, one GPU per process (--world at most the GPUs)",
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/sharded.json"))
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    for s in args.shards:
        if args.world % s:
            parser.error(f"--shards {s} does not divide --world {args.world}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for s in args.shards:
            print(f"S = {s}: {args.world // s} workers x {s} ranks ...", flush=True)
            launch(args, s, tmp)
            rows += [json.loads(Path(tmp, f"S{s}-rank{r}.json").read_text()) for r in range(args.world)]
    print("\nper rank, MB (2^20 bytes), mean over ranks; held between averages, then the copy an average")
    print("allocates while it runs, the bytes one average sends, and the process's peak RSS")
    print(f"{'S':>2} {'K':>2} | {'params':>7} {'inner':>7} {'localsgd':>8} {'buffers':>7} {'total':>7} "
          f"{'x S=1':>6} | {'copy':>6} {'sent/avg':>8} {'peak RSS':>8}")  # fmt: skip
    base = None
    for s in args.shards:
        mine = [r for r in rows if r["shards"] == s]

        def mean(key: str, mine=mine) -> float:
            return sum(r[key] for r in mine) / len(mine) / MB

        total = mean("parameters") + mean("inner_state") + mean("localsgd_state") + mean("averaging_buffers")
        base = base or total
        print(f"{s:>2} {args.world // s:>2} | {mean('parameters'):7.1f} {mean('inner_state'):7.1f} "
              f"{mean('localsgd_state'):8.1f} {mean('averaging_buffers'):7.1f} {total:7.1f} "
              f"{total / base:6.3f} | {mean('averaging_copy'):6.1f} {mean('sent_per_average'):8.2f} "
              f"{mean('peak_rss'):8.0f}")  # fmt: skip
    write_result(args.out, {"model": vars(args) | {"worker": None}, "rows": rows})
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
