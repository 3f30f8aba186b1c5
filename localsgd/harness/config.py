"""The training configuration: one typed dataclass, named presets, TOML files and ``--key value``
overrides (preset < file < flags). Field names are the glossary names of docs/design.md."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import sys
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from localsgd import outer
from localsgd._validate import check_int, check_number, is_number
from localsgd.compression import CodecName
from localsgd.harness.data import ImageDataset
from localsgd.policy import BufferPolicy, MergeRule, OptimizerStatePolicy

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

FIRST_DECAY = "first-decay"
DEFAULT_WORKERS = 16  # K outside torchrun when no preset, file or flag sets it
# The settings that take one of a few names: each a Literal type, the one place its names are listed.
Dataset = Literal[ImageDataset, "text"]
InnerOptimizer = Literal["sgd", "adamw"]
LRSchedule = Literal["step", "cosine"]
OuterOptimizer = Literal["none", "diloco", "slowmo"]
Compress = Literal["none", CodecName]
EvalLocal = Literal["every", "final", "never"]
Precision = Literal["fp32", "bf16"]
Device = Literal["auto", "cpu", "cuda"]
DEVICES: tuple[str, ...] = get_args(Device)
OUTER_OPTIMIZERS = {"diloco": outer.diloco, "slowmo": outer.slowmo}  # outer_optimizer's other names


def _lr_momentum(make: Any) -> tuple[float, float]:
    parameters = inspect.signature(make).parameters
    return parameters["lr"].default, parameters["momentum"].default


# (lr, momentum) by default: the core's (DiLoCo's paper values, SlowMo's as fairscale has them)
OUTER_DEFAULTS: dict[str, tuple[float, float]] = {n: _lr_momentum(f) for n, f in OUTER_OPTIMIZERS.items()}


class ConfigError(ValueError):
    """A bad configuration value: one line naming the key, the value and what is allowed."""


@dataclass
class TaskSettings:
    """What is learned: the data (and how much of it is read or evaluated)."""

    dataset: Dataset = "cifar10"
    """cifar10, cifar100, mnist or fashion-mnist (images), or text (a byte-level corpus in data_dir)"""
    data_dir: str | None = None
    """folder holding the dataset files (default: the cache `localsgd download` writes to); for
    text: a folder of .txt files or one file"""
    train_subset: int | None = None
    """train on a fixed random subset of N training images (quick runs; images only; default: all)"""
    test_subset: int | None = None
    """evaluate on a fixed random subset of N test images (text: N validation windows; default: all)"""
    seq_len: int | None = None
    """text: tokens (bytes) per window (default 128)"""

    def text_seq_len(self) -> int:
        return self.seq_len or 128

    def _check_task(self) -> None:
        for name in ("train_subset", "test_subset"):
            if getattr(self, name) is not None:
                integer(self, name, 1)


@dataclass
class ModelSettings:
    """The model and how its numbers are laid out."""

    model: str = "resnet20"
    """images: resnet8, resnet14, resnet20, resnet32, resnet56, densenet40 or wrn28_10; text: gpt or
    lstm"""
    width: int | None = None
    """text: the model's width (default: gpt 128, lstm 256)"""
    depth: int | None = None
    """text: layers (default: gpt 4, lstm 2)"""
    heads: int | None = None
    """text: attention heads of the gpt (default 4)"""
    dropout: float | None = None
    """text: dropout (default 0); each worker draws from its own random stream"""
    channels_last: bool = True
    """channels_last memory format (faster on CPU, same numerics)"""
    precision: Precision = "fp32"
    """fp32, or bf16: bfloat16 autocast of forward and loss (a speed mode that changes the numerics;
    needs native bf16: a GPU or a CPU with AVX-512 BF16/AMX)"""

    def text_model_size(self) -> dict[str, Any]:
        return {"width": self.width, "depth": self.depth, "heads": self.heads, "dropout": self.dropout}

    def _check_model(self) -> None:
        from localsgd.harness.language import LANGUAGE_MODELS
        from localsgd.harness.models import MODELS

        text = self.dataset == "text"
        models = LANGUAGE_MODELS if text else MODELS
        if self.model not in models:
            raise ConfigError(
                f"model must be one of {', '.join(models)}; got {self.model!r} (for dataset = {self.dataset})"
            )
        if not text:
            return
        for name in ("seq_len", "width", "depth", "heads"):
            if getattr(self, name) is not None:
                integer(self, name, 1)
        if self.model == "gpt":
            from localsgd.harness.language import MAX_CONTEXT, SIZES

            if self.text_seq_len() > MAX_CONTEXT:
                raise ConfigError(
                    f"seq_len = {self.text_seq_len()} is longer than the gpt's position table allows: "
                    f"at most {MAX_CONTEXT} positions (localsgd.harness.language.MAX_CONTEXT)"
                )
            width, heads = self.width or SIZES["gpt"]["width"], self.heads or SIZES["gpt"]["heads"]
            if width % heads:  # type: ignore[operator]
                raise ConfigError(f"width = {width} must be a multiple of heads = {heads} (model = gpt)")
        if self.dropout is not None:
            number(self, "dropout", 0)
            if self.dropout >= 1:
                raise ConfigError(f"dropout must be a number in [0, 1), got {self.dropout!r}")


@dataclass
class AveragingSettings:
    """The workers and when and how they average (the paper's symbols, and the outer step)."""

    workers: int | None = None
    """K: workers. Under torchrun, K is the number of processes (one worker each) unless you set it,
    and a K that differs from it is an error; outside torchrun K workers are simulated in this
    process (default 16)"""
    local_batch_size: int = 128
    """B_loc: mini-batch per worker"""
    local_steps: int = 1
    """H: local steps between averages (1 = mini-batch SGD)"""
    switch_epoch: float | str | None = None
    """t': epoch of the switch from mini-batch to local SGD ("first-decay": the first LR decay;
    default: none, local SGD from the start)"""
    workers_per_block: int | None = None
    """K': workers per block for hierarchical local SGD (under torchrun default: the processes of a node)"""
    block_steps: int | None = None
    """H_b: block averages between two global averages (hierarchical local SGD; default: none, flat)"""
    buffers: BufferPolicy = "local"
    """BatchNorm statistics at averages: local (paper) or average"""
    optimizer_state: OptimizerStatePolicy = "local"
    """momentum at averages: local (paper), average or reset"""
    outer_optimizer: OuterOptimizer = "none"
    """none (plain averaging), diloco (Nesterov SGD on the averaged pseudo-gradient at every global
    average) or slowmo (slow momentum, Wang et al. 2020); see localsgd.outer"""
    outer_lr: float | None = None
    """the outer optimizer's learning rate (default: diloco 0.7, slowmo's alpha 1.0)"""
    outer_momentum: float | None = None
    """the outer optimizer's momentum (default: diloco 0.9, slowmo's beta 0.5)"""
    compress: Compress = "none"
    """none, bf16, fp16, int8 or sign: send each global average's pseudo-gradient (the change since
    the last one) encoded, with error feedback; see localsgd.compression"""
    compress_block: int | None = None
    """values per scale for int8 and sign (default 256)"""
    overlap_steps: int = 0
    """tau: run each global average during the next tau local steps instead of waiting for it (0:
    blocking); see docs/design.md, Overlapped averaging"""
    ordered_averaging: bool = False
    """under torchrun, average by all-gather and a sum in worker order: bitwise the simulator's result"""
    fragments: int = 1
    """N: Streaming DiLoCo. The parameters are cut into N fragments of equal bytes that sync in
    turn, one every H/N steps, each once per H (1: the whole model at once); see localsgd.streaming"""
    merge: MergeRule = "delta"
    """how an overlapped or streamed sync lands: delta (keep what was learned during the tau steps) or
    mix (Streaming DiLoCo as torchft: lerp from the new global fragment toward the local one by alpha)"""
    alpha: float = 0.0
    """the mix rule's weight of the worker's own parameters, in [0, 1]"""
    shard_size: int = 1
    """S: processes per worker under torchrun (K = processes / S). Each worker's model is sharded over
    its S processes with FSDP2 (per block and at the root), each takes B_loc/S of the worker's batch,
    and localsgd averages across the K groups; see localsgd.sharding"""

    def _check_averaging(self) -> None:
        for name in ("local_batch_size", "local_steps"):
            integer(self, name, 1)
        for name in ("workers", "workers_per_block", "block_steps"):
            if getattr(self, name) is not None:
                integer(self, name, 1)
        s = self.switch_epoch
        is_epoch = is_number(s) and 0 <= s <= self.epochs
        if s is not None and s != FIRST_DECAY and not is_epoch:
            allowed = f"an epoch in [0, epochs={self.epochs:g}] or {FIRST_DECAY!r}"
            raise ConfigError(f"switch_epoch (t') must be {allowed}, got {s!r}")
        if s == FIRST_DECAY and not self.decay_at:
            raise ConfigError("switch_epoch (t') is 'first-decay' but decay_at is empty")
        if (self.block_steps is None) != (self.workers_per_block is None) and self.block_steps is None:
            raise ConfigError(
                f"workers_per_block (K') = {self.workers_per_block} needs block_steps (H_b) for "
                "hierarchical local SGD"
            )
        workers = self.workers or DEFAULT_WORKERS
        if self.workers_per_block is not None and workers % self.workers_per_block:
            raise ConfigError(
                f"workers_per_block (K') = {self.workers_per_block} must divide workers (K) = {workers}"
            )
        self._validate_outer()
        self._validate_compress()
        self._validate_overlap()
        self._validate_shards()

    def _validate_shards(self) -> None:
        integer(self, "shard_size", 1)
        s = self.shard_size
        if s == 1:
            return
        if self.local_batch_size % s:
            raise ConfigError(
                f"shard_size (S) = {s} must divide local_batch_size (B_loc) = {self.local_batch_size}: "
                "each of a worker's S processes takes B_loc/S of its batch"
            )
        unsupported = {
            "block_steps": (self.block_steps is not None, "hierarchical schedules"),
            "buffers": (self.buffers != "local", "buffers = 'average'"),
            "model": (self.model == "lstm", "the LSTM (its carried state is per worker)"),
            "optimizer_state": (
                self.compress != "none" and self.optimizer_state != "local",
                "compression with optimizer_state other than 'local'",
            ),
        }
        for name, (bad, what) in unsupported.items():
            if bad:
                value = getattr(self, name)
                raise ConfigError(f"shard_size (S) = {s} does not support {what} ({name} = {value!r})")

    def _validate_outer(self) -> None:
        if self.outer_optimizer == "none":
            return
        if self.outer_lr is not None:
            number(self, "outer_lr", 0, strict=True)
        if self.outer_momentum is not None:
            number(self, "outer_momentum", 0)
            if self.outer_momentum >= 1:
                raise ConfigError(f"outer_momentum must be a number < 1, got {self.outer_momentum!r}")
        self._needs_local_steps("outer_optimizer", self.outer_optimizer)

    def _needs_local_steps(self, name: str, value: str) -> None:
        if self.local_steps == 1 and self.block_steps is None:
            raise ConfigError(
                f"{name} = {value} needs local steps: with local_steps (H) = 1 every step averages "
                "gradients, so no global parameter average is left for it to act on"
            )

    def _validate_compress(self) -> None:
        if self.compress_block is not None:
            integer(self, "compress_block", 8)
        if self.compress != "none":
            self._needs_local_steps("compress", self.compress)

    def _validate_overlap(self) -> None:
        from localsgd.policy import Policy
        from localsgd.rounds import DelayedAverage
        from localsgd.schedule import Schedule
        from localsgd.streaming import Streaming

        integer(self, "overlap_steps", 0)
        integer(self, "fragments", 1)
        if self.overlap_steps:
            self._needs_local_steps("overlap_steps", str(self.overlap_steps))
        if self.fragments > 1:
            self._needs_local_steps("fragments", str(self.fragments))
        schedule = Schedule(local_steps=self.local_steps, block_steps=self.block_steps)
        try:  # the engine's own rules, checked before any work
            policy = Policy(
                buffers=self.buffers, optimizer_state=self.optimizer_state, overlap_steps=self.overlap_steps,
                fragments=self.fragments, merge=self.merge, alpha=self.alpha,
            )  # fmt: skip
            DelayedAverage.check(self.overlap_steps, schedule)
            if policy.streams:
                Streaming.check(schedule, self.fragments, self.overlap_steps)
        except ValueError as e:
            raise ConfigError(str(e)) from None

    def outer(self) -> tuple[float, float] | None:
        """(lr, momentum) of the outer optimizer, defaults filled in; None for plain averaging."""
        if self.outer_optimizer == "none":
            return None
        lr, momentum = OUTER_DEFAULTS[self.outer_optimizer]
        return (
            lr if self.outer_lr is None else self.outer_lr,
            momentum if self.outer_momentum is None else self.outer_momentum,
        )

    def switch_epoch_value(self) -> float:
        """t' in epochs (0: local SGD from the start)."""
        if self.switch_epoch is None:
            return 0.0
        if self.switch_epoch == FIRST_DECAY:
            return self.decay_at[0] * self.epochs
        return float(self.switch_epoch)


@dataclass
class OptimizerSettings:
    """The inner optimizer each worker steps."""

    optimizer: InnerOptimizer = "sgd"
    """the inner optimizer: sgd (the paper) or adamw"""
    lr_per_64: float = 0.1
    """learning rate per 64 samples; peak LR = lr_per_64 * B_loc/64 * K (linear scaling)"""
    peak_lr: float | None = None
    """set the peak LR directly instead of the linear-scaling rule (default: none, the rule)"""
    momentum: float = 0.9
    """sgd's momentum"""
    nesterov: bool = True
    """sgd's Nesterov momentum"""
    weight_decay: float = 1e-4
    """sgd: L2 weight decay, not applied to BatchNorm parameters; adamw: decoupled weight decay, not
    applied to norms, biases and embeddings"""
    betas: list[float] | None = None
    """adamw's (beta1, beta2) (default 0.9, 0.95)"""
    max_grad_norm: float | None = None
    """clip each worker's gradient to this 2-norm before its step (the averaged gradient in the
    mini-batch phase; default: none, no clipping)"""

    def _check_optimizer(self) -> None:
        if self.optimizer == "adamw":
            if self.peak_lr is None:
                raise ConfigError(
                    "optimizer = adamw needs peak_lr: the linear-scaling rule (lr_per_64) is sgd's"
                )
            b = self.betas
            if b is not None and not (
                isinstance(b, list) and len(b) == 2 and all(is_number(v) and 0 <= v < 1 for v in b)
            ):
                raise ConfigError(f"betas must be two numbers in [0, 1), got {b!r}")
        if self.lr_schedule == "cosine" and self.switch_epoch == FIRST_DECAY:
            raise ConfigError("switch_epoch (t') = first-decay needs lr_schedule = step; give an epoch")
        if self.max_grad_norm is not None:
            number(self, "max_grad_norm", 0, strict=True)
        number(self, "lr_per_64", 0, strict=True)
        if self.peak_lr is not None:
            number(self, "peak_lr", 0, strict=True)
        number(self, "momentum", 0)
        number(self, "weight_decay", 0)


@dataclass
class ScheduleSettings:
    """How long training runs and the learning rate at each step."""

    epochs: float = 300
    """training epochs"""
    warmup_epochs: float = 5
    """linear per-step warm-up to the peak LR over this many epochs, from lr_per_64 (sgd) or from 0
    (adamw)"""
    lr_schedule: LRSchedule = "step"
    """step: warm-up, then the LR times decay_factor at each decay_at (the paper); cosine: warm-up,
    then a cosine from the peak LR to peak * decay_factor at the end"""
    decay_at: list[float] = field(default_factory=lambda: [0.5, 0.75])
    """step schedule: LR decays at these fractions of training"""
    decay_factor: float = 0.1
    """factor of each LR decay (cosine: the final LR as a fraction of the peak)"""

    def _check_schedule(self) -> None:
        number(self, "epochs", 0, strict=True)
        number(self, "warmup_epochs", 0)
        if self.warmup_epochs > self.epochs:
            default = "" if "warmup_epochs" in self.given else " (the default)"
            raise ConfigError(
                f"warmup_epochs = {self.warmup_epochs:g}{default} exceeds epochs = {self.epochs:g}: the LR "
                f"would never reach its peak; give --warmup-epochs between 0 and {self.epochs:g}"
            )
        number(self, "decay_factor", 0, strict=True)
        if not isinstance(self.decay_at, list) or not all(is_number(f) and 0 < f < 1 for f in self.decay_at):
            raise ConfigError(
                f"decay_at must be a list of fractions of training in (0, 1), got {self.decay_at!r}"
            )
        if self.decay_at != sorted(self.decay_at):
            raise ConfigError(f"decay_at must be increasing, got {self.decay_at!r}")


@dataclass
class OutputSettings:
    """What the run writes: rows, evaluations, checkpoints, kept models, logs."""

    out: str | None = None
    """run directory (default: runs/<preset or model>-<dataset>-K<K>-H<H>-seed<seed>)"""
    row_steps: int | None = None
    """write a metrics row every this many steps instead of at every epoch's end (text: an epoch is
    long); eval_every and checkpoint_every then count rows (default: none, a row per epoch)"""
    eval_every: int = 1
    """evaluate every this many epochs (rows, with row_steps), and always at the end"""
    eval_local: EvalLocal = "final"
    """when to also evaluate each worker's own model, whose mean accuracy the paper's code reports:
    every, final or never"""
    checkpoint_every: int = 1
    """write a resumable checkpoint every this many epochs (rows, with row_steps)"""
    save_models_at: list[float] = field(default_factory=list)
    """also keep the averaged model at these epochs (each at a row's end) as models/epoch-E.pt, for
    measurements along one run (``localsgd sharpness`` measures them too)"""
    tensorboard: bool = False
    """also log to TensorBoard (needs the tensorboard package)"""
    progress: bool = True
    """progress bar on stderr (rank 0)"""

    def _check_output(self) -> None:
        for name in ("eval_every", "checkpoint_every"):
            integer(self, name, 1)
        if self.row_steps is not None:
            integer(self, "row_steps", 1)
        at = self.save_models_at
        if not isinstance(at, list) or not all(is_number(e) and 0 < e <= self.epochs for e in at):
            allowed = f"a list of epochs in (0, epochs={self.epochs:g}]"
            raise ConfigError(f"save_models_at must be {allowed}, got {at!r}")
        if at != sorted(set(at)):
            raise ConfigError(f"save_models_at must be strictly increasing, got {at!r}")


@dataclass
class RunSettings:
    """This run of it: the seed, the run directory's fate, where and how the processes run."""

    seed: int = 6
    """seeds the initial model, every worker's data order, augmentation and dropout"""
    resume: bool = False
    """continue the run in the run directory from its last checkpoint, with the same settings (a
    finished run is not run again)"""
    overwrite: bool = False
    """replace the run in the run directory (its files are deleted when the new run starts); without
    resume or overwrite an existing run directory is an error"""
    timeout: float = 600
    """seconds a collective may wait for a peer before the run stops with an error (torchrun)"""
    threads: int | None = None
    """torch threads per process (default: all cores, 1 under torchrun with several processes per node)"""
    device: Device = "auto"
    """auto (CUDA if available), cpu or cuda: where the workers, the data and the evaluation live
    (under torchrun each process takes GPU LOCAL_RANK)"""

    random_per_step: bool = False
    """draw each worker's augmentation and dropout at step t from (seed, k, t) rather than from one
    stream per worker (always so with fault_tolerant, where a healed worker must draw what it would
    have, and with membership; give it to a plain run that is to equal a fault-tolerant one)"""

    def _check_run(self) -> None:
        integer(self, "seed", 0)
        number(self, "timeout", 0, strict=True)
        if self.threads is not None:
            integer(self, "threads", 1)
        if self.resume is True and self.overwrite is True:
            raise ConfigError(
                "resume and overwrite exclude each other: resume continues the run, overwrite replaces it"
            )


@dataclass
class FaultToleranceSettings:
    """Workers that may die and rejoin without stopping the others (torchft; docs/design.md, Fault
    tolerance), and the replay of such a run in the simulator."""

    fault_tolerant: bool = False
    """run as one worker of a fault-tolerant run (pip install 'localsgd[ft]'): start a torchft
    lighthouse, then the same command once per worker with --worker k; a worker that dies is
    restarted with its command and heals from a live one. Worker k writes <out>/worker-k"""
    worker: int | None = None
    """k: this worker's id in [0, K) (fault_tolerant; default: the REPLICA_GROUP_ID environment variable)"""
    lighthouse: str | None = None
    """the torchft lighthouse's address, e.g. http://host:29510 (fault_tolerant; default: the
    TORCHFT_LIGHTHOUSE environment variable)"""
    min_workers: int = 1
    """a global round with fewer workers present is not committed (fault_tolerant)"""
    startup_timeout: float = 60
    """seconds the first round waits for all K workers before starting with those present (fault_tolerant)"""
    membership: str | None = None
    """replay a fault-tolerant run in the simulator: its run directory (the rounds.jsonl of each
    worker-k in it); the same settings give the same models, bit for bit with ordered_averaging"""

    def _check_fault_tolerance(self) -> None:
        integer(self, "min_workers", 1)
        number(self, "startup_timeout", 0)
        if self.membership is not None:
            if self.fault_tolerant:
                raise ConfigError("membership replays a fault-tolerant run in the simulator; drop one")
            self._fault_tolerant_only("membership")
        if not self.fault_tolerant:
            return
        if self.workers is None:
            raise ConfigError("fault_tolerant needs workers (K), the most workers the run has")
        if self.worker is None or not (isinstance(self.worker, int) and 0 <= self.worker < self.workers):
            raise ConfigError(
                f"worker (k) = {self.worker!r}: fault_tolerant needs this worker's id in [0, K) = "
                f"[0, {self.workers}) (--worker k, or REPLICA_GROUP_ID)"
            )
        if self.min_workers > self.workers:
            raise ConfigError(f"min_workers = {self.min_workers} exceeds workers (K) = {self.workers}")
        if not self.lighthouse:
            raise ConfigError(
                "fault_tolerant needs the lighthouse's address (--lighthouse URL, or TORCHFT_LIGHTHOUSE)"
            )
        self._fault_tolerant_only("fault_tolerant")

    def _fault_tolerant_only(self, setting: str) -> None:
        """What a fault-tolerant run (and its replay) does not support yet."""
        unsupported = {
            "block_steps": (self.block_steps is not None, "hierarchical schedules"),
            "shard_size": (self.shard_size > 1, "sharded workers"),
            "model": (self.model == "lstm", "the LSTM (its carried state cannot be healed)"),
            "resume": (self.resume, "--resume (a restarted worker heals from a live one)"),
        }
        for name, (bad, what) in unsupported.items():
            if bad and not (name == "resume" and setting == "membership"):
                value = getattr(self, name)
                raise ConfigError(f"{setting} does not support {what} yet ({name} = {value!r})")


@dataclass
class Config(
    FaultToleranceSettings, RunSettings, OutputSettings, ScheduleSettings, OptimizerSettings,
    AveragingSettings, ModelSettings, TaskSettings,
):  # fmt: skip
    """Every setting of a run, in sections (task, model, averaging, optimizer, schedule, output, run,
    fault tolerance: the order of ``--help``); each section checks its own settings and ``validate``
    checks them all, in that order, with the rules between sections. The names are flat (``cfg.local_steps``,
    ``--local-steps``, the keys of TOML files and ``config.json``)."""

    # Not a setting: the settings given on purpose, each with where ("flag", a file's path, "preset
    # 'NAME'", "study method 'NAME'"; "" for Config(...)). Left out of to_dict(), so checkpoints and
    # config.json hold settings only (older checkpoints resume as before); dataclasses.replace
    # passes it on.
    given: dict[str, str] = field(default_factory=dict, repr=False, compare=False)

    def __setattr__(self, name: str, value: Any) -> None:
        object.__setattr__(self, "_checked", False)  # any change is checked again
        object.__setattr__(self, name, value)

    def validate(self) -> None:
        """Raise ConfigError on the first bad value, before any work. Checked once: validating a
        config no setting of which was assigned since it passed does nothing (a list changed in
        place is not seen: assign a new one)."""
        if getattr(self, "_checked", False):
            return
        self._check()
        object.__setattr__(self, "_checked", True)

    def _check(self) -> None:
        for name in CHOICES:
            choice(self, name)
        for name in SETTINGS:
            if kind(name) is bool and not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        self._check_model()
        self._check_optimizer()
        self._check_task()
        self._check_schedule()
        self._check_output()
        self._check_run()
        self._check_averaging()
        self._check_fault_tolerance()
        for name, reason in self.unused().items():  # a setting given on purpose that nothing reads
            where = self.given.get(name, "")
            where = f" (set by {where})" if where not in ("", "flag") else ""
            raise ConfigError(f"{name} = {getattr(self, name)!r} {reason}{where}")
        if self.optimizer == "sgd" and self.nesterov and self.momentum == 0:
            hint = "" if "nesterov" in self.given else " (nesterov is on by default: give --no-nesterov)"
            raise ConfigError(f"nesterov needs momentum > 0, got momentum = 0{hint}")

    def unused(self) -> dict[str, str]:
        """The settings given on purpose (``given``, or a None-default setting that has a value)
        that this run does not read, each with why: the rest of "name = value ..." in an error."""
        text, sgd = self.dataset == "text", self.optimizer == "sgd"
        why: dict[str, str] = {}
        if text:
            for name in ("train_subset", "channels_last", "buffers"):
                why[name] = f"is not used by dataset = {self.dataset}"
            if self.model != "gpt":
                why["heads"] = f"is for model = gpt, not {self.model}"
        else:
            for name in ("seq_len", "width", "depth", "heads", "dropout"):
                why[name] = f"is not used by dataset = {self.dataset}"
        if not sgd:
            for name in ("momentum", "nesterov", "lr_per_64"):
                why[name] = f"is sgd's; optimizer = {self.optimizer} does not use it"
        else:
            why["betas"] = "needs optimizer = adamw"
            if self.peak_lr is not None and (self.lr_schedule == "cosine" or self.warmup_epochs == 0):
                why["lr_per_64"] = (
                    "is not used: peak_lr sets the peak LR, and the warm-up starts from lr_per_64 only "
                    "with lr_schedule = step and warmup_epochs > 0"
                )
        if self.lr_schedule == "cosine":
            why["decay_at"] = "is for lr_schedule = step; cosine decays smoothly"
        elif not self.decay_at:
            why["decay_factor"] = "is not used: decay_at is empty (no LR decay)"
        if self.outer_optimizer == "none":
            for name in ("outer_lr", "outer_momentum"):
                why[name] = "needs an outer_optimizer (diloco or slowmo)"
        if self.compress not in ("int8", "sign"):
            why["compress_block"] = "needs compress = int8 or sign"
        if self.merge != "mix":
            why["alpha"] = "weighs the mix rule; merge = 'delta' uses none"
        if not self.fault_tolerant:
            for name in ("worker", "lighthouse", "min_workers", "startup_timeout"):
                why[name] = "needs fault_tolerant"
        else:
            why["checkpoint_every"] = "is not used: a fault-tolerant worker heals from a live one"
        defaults = Config()
        return {
            name: reason
            for name, reason in why.items()
            if name in self.given or (getattr(defaults, name) is None and getattr(self, name) is not None)
        }

    def per_step_random(self) -> bool:
        """Whether the random streams start again at every step (``random_per_step``; always in a
        fault-tolerant run and its replay)."""
        return self.random_per_step or self.fault_tolerant or self.membership is not None

    def to_dict(self) -> dict[str, Any]:
        """The settings (without ``given``)."""
        return {name: value for name, value in dataclasses.asdict(self).items() if name != "given"}


def _record_given(init: Any) -> Any:
    """Config(...) counts the settings its caller passed as given; a copy made by
    dataclasses.replace keeps its original's (it passes ``given`` on)."""

    @functools.wraps(init)
    def __init__(self: Config, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        if "given" not in kwargs and len(args) <= len(SETTINGS):
            self.given = dict.fromkeys([*SETTINGS[: len(args)], *kwargs], "")

    return __init__


Config.__init__ = _record_given(Config.__init__)  # type: ignore[method-assign]
SETTINGS: tuple[str, ...] = tuple(f.name for f in fields(Config) if f.name != "given")
"""The names of the settings, in the class's order."""
SECTIONS: dict[type, tuple[str, ...]] = {
    c: tuple(f.name for f in fields(c)) for c in reversed(Config.__mro__) if c.__name__.endswith("Settings")
}
"""Each section's settings, in order (``--help`` groups the flags so)."""


@functools.cache
def _hints() -> dict[str, Any]:
    return typing.get_type_hints(Config)


def _types(name: str) -> list[Any]:
    """The types a setting's value may have, None's left out."""
    hint = _hints()[name]
    if get_origin(hint) in (Union, types.UnionType):
        return [t for t in get_args(hint) if t is not type(None)]
    return [hint]


def kind(name: str) -> type:
    """The Python type of a setting's value (besides None): bool, int, float, str (a choice of
    names too) or list (of numbers); ``switch_epoch`` (a number or "first-decay") is a float."""
    first = _types(name)[0]
    if get_origin(first) is Literal:
        return str
    return get_origin(first) or first


def optional(name: str) -> bool:
    """Whether the setting may be None (none: its default)."""
    return type(None) in get_args(_hints()[name])


def choices(name: str) -> tuple[str, ...]:
    """The names a choice setting allows (its Literal type's), in order."""
    return get_args(_types(name)[0])


CHOICES: tuple[str, ...] = tuple(n for n in SETTINGS if get_origin(_types(n)[0]) is Literal)
"""The settings that take one of a few names."""


def drop_unused_preset_settings(cfg: Config) -> list[str]:
    """Reset to its default every setting a preset gave that the final settings do not use (a
    later file or flag changed the optimizer, schedule or task the preset was written for);
    returns one line per setting dropped, naming the preset."""
    lines = []
    for name, reason in cfg.unused().items():
        where = cfg.given.get(name, "")
        if where.startswith("preset "):
            lines.append(f"{where} sets {name} = {getattr(cfg, name)!r}, which {reason}; ignored")
            setattr(cfg, name, getattr(Config(), name))
            cfg.given = {k: v for k, v in cfg.given.items() if k != name}
    return lines


def choice(cfg: Config, name: str) -> None:
    value, allowed = getattr(cfg, name), choices(name)
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")


def integer(cfg: Config, name: str, minimum: int) -> None:
    check_int(name, getattr(cfg, name), minimum, ConfigError)


def number(cfg: Config, name: str, minimum: float, strict: bool = False) -> None:
    check_number(name, getattr(cfg, name), minimum, strict, ConfigError)


# --- presets ----------------------------------------------------------------------------------

PRESETS: dict[str, dict[str, Any]] = {
    # The paper's protocol (ResNet-20, CIFAR-10, K=16, B_loc=128, 300 epochs, post-local SGD with
    # H=16 from the first LR decay). About 6 CPU-hours here.
    "paper": {"workers": 16, "local_steps": 16, "switch_epoch": FIRST_DECAY},
    "paper-h32": {"workers": 16, "local_steps": 32, "switch_epoch": FIRST_DECAY},
    # Baselines of the same protocol: large-batch mini-batch SGD (K*B_loc = 2048) and small-batch
    # mini-batch SGD (one worker, B = 128).
    "paper-minibatch": {"workers": 16, "local_steps": 1},
    "paper-small-batch": {"workers": 1, "local_steps": 1},
    # A 3-minute look at the machinery on real CIFAR-10: post-local SGD, K=4.
    "demo": {
        "workers": 4,
        "local_batch_size": 64,
        "local_steps": 8,
        "switch_epoch": 1,
        "epochs": 3,
        "warmup_epochs": 0.5,
        "decay_at": [0.67],
        "train_subset": 20000,
        "eval_local": "never",
        "eval_every": 3,
    },
    # Language modelling on a byte-level corpus (--data-dir: a folder of .txt files, e.g. the
    # State of the Union corpus, split by year). The paper's LSTM recipe (its code's WikiText-2
    # example: 3 x 650 tied, dropout 0.4, BPTT 30, clipping 0.4, K = 32, B_loc = 32, lr 2.5 per 24
    # samples scaled linearly, no momentum, no weight decay, 300 epochs), with post-local SGD
    # H = 16 from the first decay as in "paper".
    "paper-lstm": {
        "dataset": "text",
        "model": "lstm",
        "width": 650,
        "depth": 3,
        "dropout": 0.4,
        "seq_len": 30,
        "max_grad_norm": 0.4,
        "workers": 32,
        "local_batch_size": 32,
        "local_steps": 16,
        "switch_epoch": FIRST_DECAY,
        "lr_per_64": 2.5 * 64 / 24,
        "momentum": 0.0,
        "nesterov": False,
        "weight_decay": 0.0,
    },
    # Minutes-long looks at the text task on this kind of CPU: a 0.83M-parameter GPT with nanoGPT's
    # small-model recipe (AdamW, betas 0.9/0.99, clipping at 1, a cosine), local SGD with H = 16
    # after a short mini-batch phase, reading 64-byte windows at random; the 2 x 256 LSTM with the
    # paper's SGD recipe (clipping, no momentum) at the same scale, its state carried along columns.
    "sotu-gpt": {
        "dataset": "text",
        "model": "gpt",
        "seq_len": 64,
        "workers": 4,
        "local_batch_size": 8,
        "local_steps": 16,
        "switch_epoch": 0.03,
        "epochs": 0.3,
        "optimizer": "adamw",
        "peak_lr": 3e-3,
        "betas": [0.9, 0.99],
        "weight_decay": 0.1,
        "max_grad_norm": 1.0,
        "lr_schedule": "cosine",
        "warmup_epochs": 0.02,
        "test_subset": 2048,
        "row_steps": 244,
        "eval_local": "never",
    },
    "sotu-lstm": {
        "dataset": "text",
        "model": "lstm",
        "seq_len": 64,
        "max_grad_norm": 0.4,
        "workers": 4,
        "local_batch_size": 16,
        "local_steps": 16,
        "switch_epoch": 0.05,
        "epochs": 0.3,
        "lr_per_64": 2.5 * 64 / 24,
        "momentum": 0.0,
        "nesterov": False,
        "weight_decay": 0.0,
        "warmup_epochs": 0.01,
        "decay_at": [0.67],
        "test_subset": 512,
        "row_steps": 61,
        "eval_local": "never",
    },
}


# One line per preset for `localsgd train --help` and the README's table (kept equal by a test).
PRESET_NOTES: dict[str, str] = {
    "paper": "the paper's protocol: ResNet-20, CIFAR-10, K=16, B_loc=128, 300 epochs, LR 0.1 per 64 samples "
    "scaled linearly (peak 3.2) after 5 warm-up epochs, x0.1 at 50% and 75%, Nesterov momentum 0.9, weight "
    "decay 1e-4; post-local SGD, H=16 from the first decay (about 6 CPU-hours)",
    "paper-h32": "the same with H=32",
    "paper-minibatch": "large-batch baseline: mini-batch SGD, K·B_loc = 2048",
    "paper-small-batch": "small-batch baseline: one worker, B = 128 (peak LR 0.2)",
    "demo": "3 epochs of post-local SGD on 20,000 CIFAR-10 images, K=4, B_loc=64, H=8 from epoch 1",
    "paper-lstm": "the paper's language model: 3 x 650 tied LSTM, dropout 0.4, windows of 30, clipping 0.4, "
    "K=32, B_loc=32, LR 2.5 per 24 samples scaled linearly, no momentum or weight decay, 300 epochs, H=16 "
    "from the first decay",
    "sotu-gpt": "a few-minute text demo: 0.83M-parameter GPT, 64-byte windows, AdamW (peak 3e-3, betas "
    "0.9/0.99, weight decay 0.1), clipping at 1 and a cosine, K=4, B_loc=8, H=16 after 0.03 of 0.3 epochs",
    "sotu-lstm": "a few-minute text demo: 2 x 256 LSTM with the paper's SGD recipe, 64-byte windows, K=4, "
    "B_loc=16, H=16 after 0.05 of 0.3 epochs, x0.1 at 67%",
}


def shown(value: Any) -> str:
    """A setting's value as it is typed after its flag (for --help)."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return ",".join(f"{v:g}" for v in value) or "none"
    return f"{value:g}" if isinstance(value, float) else str(value)


def field_docs() -> dict[str, str]:
    """Each field's docstring (the string literal under it in the class body), for --help."""
    import ast
    import inspect
    import itertools

    sections = [c for c in Config.__mro__ if c.__name__.endswith("Settings")]
    body = [n for c in sections for n in ast.parse(inspect.getsource(c)).body[0].body]  # type: ignore[attr-defined]
    docs = {}
    for node, nxt in itertools.pairwise(body):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
        ):
            docs[node.target.id] = nxt.value.value  # type: ignore[union-attr]
    return docs


def from_mapping(values: dict[str, Any], source: str, base: Config | None = None) -> Config:
    """Apply ``values`` (TOML or preset) over ``base``; unknown keys are errors."""
    cfg = dataclasses.replace(base) if base is not None else Config()
    for key, value in values.items():
        name = key.replace("-", "_")
        if name not in SETTINGS:
            raise ConfigError(f"{source}: unknown key {key!r}; known keys: {', '.join(sorted(SETTINGS))}")
        if isinstance(value, int) and not isinstance(value, bool) and kind(name) is float:
            value = float(value)
        setattr(cfg, name, value)
        cfg.given = {**cfg.given, name: source}
    return cfg


def load_toml(path: str | Path, base: Config | None = None) -> Config:
    path = Path(path)
    try:
        values = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} does not exist") from None
    except OSError as e:
        raise ConfigError(f"config file {str(path)!r} cannot be read: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"config file {str(path)!r} is not UTF-8 text (byte {e.start}: {e.object[e.start]:#04x}); "
            "TOML files are UTF-8"
        ) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {str(path)!r} is not valid TOML: {e}") from None
    return from_mapping(values, str(path), base)


def preset(name: str) -> Config:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    return from_mapping(PRESETS[name], f"preset {name!r}")


def parse_value(name: str, text: str) -> Any:
    """A ``--key value`` flag's text as the field's type."""
    k = kind(name)
    if text.lower() in ("none", "null") and optional(name):
        return None
    if name == "switch_epoch" and text == FIRST_DECAY:
        return text
    if k is list:
        return [_number(name, t, float) for t in text.split(",") if t.strip()] if text.strip() else []
    if k is bool:
        if text.lower() in ("true", "1", "yes", "on"):
            return True
        if text.lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"--{name.replace('_', '-')} must be true or false, got {text!r}")
    if k in (int, float):
        return _number(name, text, k)
    return text


def _number(name: str, text: str, kind: type) -> Any:
    try:
        return kind(text)
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise ConfigError(f"--{name.replace('_', '-')} must be {what}, got {text!r}") from None
