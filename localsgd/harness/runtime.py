"""Where a run's workers live, decided once for ``train``, ``demo`` and the CLI: K workers simulated
in this process, or one worker per process under torchrun (``WORLD_SIZE`` > 1); and on which
device (``auto``: CUDA if available)."""

from __future__ import annotations

import dataclasses
import os
from datetime import timedelta

import torch
import torch.distributed as dist

from localsgd.comm import init_process_group
from localsgd.engine import CommunicationError, first_line
from localsgd.harness.config import DEFAULT_WORKERS, DEVICES, Config, ConfigError


def launched_processes() -> int | None:
    """How many processes torchrun (or another ``env://`` launcher) started; None outside one."""
    text = os.environ.get("WORLD_SIZE")
    return int(text) if text else None


def is_distributed() -> bool:
    """Whether this process is one of several workers (otherwise the simulator holds all K)."""
    return (launched_processes() or 1) > 1


def resolve_workers(cfg: Config) -> Config:
    """``cfg`` with K decided: the number of torchrun processes unless the user set ``workers``
    (a flag, a config file or a preset that sets it), and 16 outside torchrun. An explicit K that
    differs from the number of processes is an error. A fault-tolerant worker (one process) takes
    its id and the lighthouse from the environment unless set."""
    world = launched_processes()
    if cfg.fault_tolerant:
        if world is not None and world > 1:
            raise ConfigError(
                f"fault_tolerant runs one worker per job, but torchrun started {world} processes: start "
                "each worker on its own (python -m localsgd train ..., or torchrun --nproc-per-node 1)"
            )
        replica = os.environ.get("REPLICA_GROUP_ID")
        worker = cfg.worker
        if worker is None and replica is not None:
            worker = int(replica) if replica.isdigit() else replica
        lighthouse = cfg.lighthouse or os.environ.get("TORCHFT_LIGHTHOUSE")
        return dataclasses.replace(cfg, worker=worker, lighthouse=lighthouse)
    shards = cfg.shard_size
    if shards != 1:
        if not is_distributed():
            raise ConfigError(f"shard_size (S) = {shards} needs torchrun (S processes per worker)")
        assert world is not None
        if world % shards:
            raise ConfigError(
                f"torchrun started {world} processes, which shard_size (S) = {shards} does not divide: "
                "start K * S processes"
            )
        world //= shards
    if cfg.block_steps is not None and cfg.workers_per_block is None and not is_distributed():
        raise ConfigError(
            f"block_steps (H_b) = {cfg.block_steps!r} needs workers_per_block (K') in the simulator "
            "(under torchrun K' defaults to the processes of a node)"
        )
    if cfg.workers is None:
        return dataclasses.replace(cfg, workers=world or DEFAULT_WORKERS)
    if world is not None and world * shards > 1 and cfg.workers != world:
        started, per = f"{world * shards} processes", ""
        if shards > 1:
            started, per = f"{started} ({world} workers of S = {shards})", " / S"
        raise ConfigError(
            f"workers (K) = {cfg.workers} but torchrun started {started}; start {cfg.workers * shards} "
            f"processes or pass --workers {world} (K is the number of processes{per} "
            "unless a flag, config file or preset sets it)"
        )
    return cfg


def pick_device(name: str, distributed: bool) -> torch.device:
    """``cpu``, ``cuda`` (an error without CUDA) or ``auto`` (CUDA if available). Under torchrun a
    process takes GPU ``LOCAL_RANK``."""
    if name not in DEVICES:
        raise ConfigError(f"device must be one of {', '.join(DEVICES)}; got {name!r}")
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        if name == "cuda":
            raise ConfigError(
                "device = cuda but torch.cuda.is_available() is False; use device = cpu or auto"
            )
        return torch.device("cpu")
    index = int(os.environ.get("LOCAL_RANK", "0")) if distributed else torch.cuda.current_device()
    if index >= torch.cuda.device_count():
        raise ConfigError(
            f"LOCAL_RANK = {index} but this node has {torch.cuda.device_count()} CUDA device(s): start at "
            "most one process per GPU, or use device = cpu"
        )
    return torch.device("cuda", index)


def bf16_supported(device: torch.device) -> bool:
    """Whether bfloat16 autocast runs on native kernels (on CPU: oneDNN with AVX-512 BF16 or AMX)."""
    if device.type == "cuda":
        try:  # without the argument, GPUs before Ampere report their slow emulation as support
            return torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # torch before 2.4 has no emulation to report
            return torch.cuda.is_bf16_supported()
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


class Runtime:
    """This process's place among the K workers (simulator: all K here; torchrun: one rank;
    fault-tolerant: one worker, its own job) and its device. ``cfg.workers`` must be resolved
    (``resolve_workers``)."""

    def __init__(self, cfg: Config) -> None:
        self.distributed = is_distributed()
        self.fault_tolerant = cfg.fault_tolerant  # one worker of several, each its own job
        self.device = pick_device(cfg.device, self.distributed)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if self.distributed and not dist.is_initialized():
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            init_process_group(backend, timeout=timedelta(seconds=cfg.timeout))
        if cfg.precision == "bf16" and not bf16_supported(self.device):
            raise ConfigError(
                f"precision = bf16 needs native bfloat16, which this {self.device.type} lacks (torch CPU "
                f"capability {torch.backends.cpu.get_cpu_capability()}; bf16 would run several times slower "
                "than fp32 here); use precision = fp32"
            )
        self.rank = dist.get_rank() if self.distributed else 0
        self.processes = dist.get_world_size() if self.distributed else 1
        # Sharded workers: K groups of S processes (localsgd.sharding); this process's part of its
        # worker's batch.
        self.shards = cfg.shard_size
        self.part = self.rank % self.shards
        self.mesh = None
        if self.shards > 1:
            from torch.distributed.device_mesh import init_device_mesh

            shape = (self.processes // self.shards, self.shards)
            self.mesh = init_device_mesh(self.device.type, shape, mesh_dim_names=("replicate", "shard"))
        # --membership: the simulator replays a fault-tolerant run's rounds (read and checked now)
        from localsgd.harness.fault_tolerance import membership

        self.membership = membership(cfg)
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        threads = cfg.threads or max(1, (os.cpu_count() or 1) // local)
        torch.set_num_threads(threads)

    @property
    def name(self) -> str:
        """Where the workers live, as config.json records it."""
        if self.fault_tolerant:
            return "fault-tolerant"
        if self.distributed:
            return "torchrun"
        return "simulator" if self.membership is None else "simulator (replay)"

    def all_sum(self, values: torch.Tensor) -> list[float]:
        """Sums of a float64 vector over all processes (identity in the simulator), read to the
        host: one synchronisation."""
        if self.distributed:
            try:
                dist.all_reduce(values)
            except RuntimeError as e:
                raise CommunicationError(f"summing metrics across workers failed ({first_line(e)})") from e
        return values.tolist()
