"""What differs between the training tasks, behind one small interface: the data (each worker's
batch at step i of an epoch, the evaluation split), the model, how a worker's forward pass runs
(and any state it carries from step to step), and how inputs are prepared. The
training loop (``train.py``) owns everything else, the same for every task: steps, the LR schedule,
the engine, the loss (cross-entropy over the last axis of the logits), the metrics (loss and
accuracy; bits per byte for text), evaluation, checkpoints and resume.

* ``ImageTask``: CIFAR-10/100, MNIST, Fashion-MNIST; a fresh random disjoint shard of the training
  images per worker every epoch, augmented with the worker's own generator; evaluation on the test
  split.
* ``TextTask``: a byte-level corpus (``harness/text.py``). The GPT reads windows drawn from the
  whole training stream (``RandomWindows``: a seeded permutation per epoch, disjoint across
  workers). The LSTM reads the paper's contiguous columns (``Streams``) and carries its hidden
  state from one window to the next within a column, per worker: detached between windows, reset
  where the columns restart (each epoch's step 0), never averaged (it is not a parameter), and
  saved in checkpoints. Evaluation on the validation split's consecutive windows, each from a zero
  state.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from localsgd.harness.config import Config, ConfigError
from localsgd.harness.data import augment, default_data_dir, epoch_shards, load_dataset, normalize
from localsgd.harness.language import LSTMLM, LSTMState, build_language_model
from localsgd.harness.measures import IMAGE, TEXT, Measures
from localsgd.harness.models import build_model
from localsgd.harness.text import CorpusError, RandomWindows, Streams, load_corpus, windows


class Task(Protocol):
    measures: Measures  # what runs of the task measure, and the evaluation split's name in rows
    steps_per_epoch: int
    eval_x: torch.Tensor  # the evaluation split, on the device
    eval_y: torch.Tensor
    eval_batch: int  # evaluation examples per forward pass

    def sizes(self) -> dict[str, Any]:
        """What config.json records about the data."""
        ...

    def model(self) -> nn.Module:
        """A freshly initialised model on the device (the caller seeds torch)."""
        ...

    def start_epoch(self, epoch: int, i: int) -> None:
        """Lay out this epoch's data (every worker's shard, windows or columns), to be read from its
        step ``i`` on (0, or the step a resumed run starts at)."""
        ...

    def batch(self, worker: int, i: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Worker ``worker``'s inputs and targets at step ``i`` of the epoch."""
        ...

    def forward(self, worker: int, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Worker ``worker``'s training logits for its batch ``x``, with any state the task carries
        for it from the previous step."""
        ...

    def state(self) -> dict[str, Any]:
        """What a checkpoint must hold of the task besides the config: state carried per worker."""
        ...

    def load(self, state: dict[str, Any]) -> None:
        """Restore ``state()`` from a checkpoint."""
        ...

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Evaluation inputs as the model takes them."""
        ...

    def annotate(self, row: dict[str, Any], steps: int) -> None:
        """Add the task's own metrics to an epoch's row (after ``steps`` steps)."""
        ...

    def baselines(self) -> dict[str, float]:
        """Reference values for the summary (text: the unigram entropy a model must beat)."""
        ...


def sampling(cfg: Config) -> str | None:
    """How a text run's workers read the training split (``config.json`` records it, and a run is
    continued only with the sampling it began with); None for images."""
    if cfg.dataset != "text":
        return None
    if cfg.model == "lstm":
        return "columns (K·B_loc per epoch), the LSTM's state carried along them"
    return "windows in a seeded permutation per epoch, disjoint across workers"


def task_class(dataset: str) -> type[ImageTask] | type[TextTask]:
    """The task that trains on ``dataset`` (a config's ``dataset``)."""
    return TextTask if dataset == "text" else ImageTask


def measures_of(dataset: str) -> Measures:
    """What runs on ``dataset`` measure: their task's ``measures``."""
    return task_class(dataset).measures


def make_task(cfg: Config, device: torch.device) -> Task:
    return task_class(cfg.dataset)(cfg, device)


def subset(
    x: torch.Tensor, y: torch.Tensor, n: int | None, seed: int, what: str, unit: str | None = None
) -> tuple[torch.Tensor, ...]:
    """A fixed random subset of ``n`` examples (all if ``n`` is None); ``what``: train or test,
    ``unit``: what the examples are called in an error (default: "<what> images")."""
    if n is None:
        return x, y
    if n > len(x):
        raise ConfigError(f"{what}_subset = {n} exceeds the {len(x)} {unit or what + ' images'}")
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:n]
    return x[idx], y[idx]


def shard_steps(cfg: Config, train_size: int) -> int:
    """Steps per epoch when each worker gets ``train_size // K`` images in batches of B_loc (the
    last batch may be short)."""
    per_worker = train_size // cfg.workers
    if per_worker == 0:
        raise ConfigError(f"{train_size} training images cannot be shared by workers (K) = {cfg.workers}")
    if cfg.local_batch_size > per_worker:
        raise ConfigError(
            f"local_batch_size (B_loc) = {cfg.local_batch_size} exceeds each worker's shard of {per_worker} "
            f"images ({train_size} training images / workers (K) = {cfg.workers})"
        )
    return math.ceil(per_worker / cfg.local_batch_size)


class ImageTask:
    measures = IMAGE
    eval_batch = 1000

    def __init__(self, cfg: Config, device: torch.device) -> None:
        self.cfg, self.device = cfg, device
        data = load_dataset(cfg.dataset, cfg.data_dir or default_data_dir(cfg.dataset))
        self.mean, self.std, self.num_classes = data.mean, data.std, data.num_classes
        train_x, train_y = subset(data.train_x, data.train_y, cfg.train_subset, cfg.seed, "train")
        test_x, test_y = subset(data.test_x, data.test_y, cfg.test_subset, cfg.seed + 1, "test")
        self.steps_per_epoch = shard_steps(cfg, len(train_x))
        self.train_x, self.train_y, self.eval_x, self.eval_y = (
            t.to(device) for t in (train_x, train_y, test_x, test_y)
        )
        self.shards: list[torch.Tensor] = []

    def sizes(self) -> dict[str, Any]:
        return {"train_images": len(self.train_x), "test_images": len(self.eval_x)}

    def model(self) -> nn.Module:
        m = build_model(self.cfg.model, self.num_classes, in_channels=self.train_x.shape[1]).to(self.device)
        return m.to(memory_format=torch.channels_last) if self.cfg.channels_last else m

    def start_epoch(self, epoch: int, i: int) -> None:
        self.shards = [
            s.to(self.device) for s in epoch_shards(len(self.train_x), self.cfg.workers, epoch, self.cfg.seed)
        ]

    def batch(self, worker: int, i: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        b = self.cfg.local_batch_size
        idx = self.shards[worker][i * b : (i + 1) * b]
        x = augment(self.train_x[idx], generator, self.mean, self.std)
        if self.cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, self.train_y[idx]

    def forward(self, worker: int, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return model(x)

    def state(self) -> dict[str, Any]:
        return {}

    def load(self, state: dict[str, Any]) -> None:
        pass

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        x = normalize(x, self.mean, self.std)
        return x.contiguous(memory_format=torch.channels_last) if self.cfg.channels_last else x

    def annotate(self, row: dict[str, Any], steps: int) -> None:
        pass

    def baselines(self) -> dict[str, float]:
        return {}


class TextTask:
    measures = TEXT
    eval_batch = 64

    def __init__(self, cfg: Config, device: torch.device) -> None:
        self.cfg, self.device = cfg, device
        if cfg.data_dir is None:
            raise ConfigError("dataset = text needs data_dir: a folder of .txt files or one text file")
        self.carries = cfg.model == "lstm"  # a recurrent state, carried along columns
        sampler = Streams if self.carries else RandomWindows
        try:
            corpus = load_corpus(Path(cfg.data_dir))
            self.sampler = sampler(
                corpus.train.to(device), cfg.workers, cfg.local_batch_size, cfg.text_seq_len(), cfg.seed
            )
        except CorpusError as e:
            raise ConfigError(str(e)) from None
        self.corpus = corpus
        self.steps_per_epoch = self.sampler.steps_per_epoch
        x, y = windows(corpus.valid, cfg.text_seq_len())
        if len(x) == 0:
            raise ConfigError(
                f"seq_len = {cfg.text_seq_len()} is too long for the validation split: its "
                f"{len(corpus.valid)} tokens allow at most seq_len = {len(corpus.valid) - 1}"
            )
        x, y = subset(x, y, cfg.test_subset, cfg.seed + 1, "test", "validation windows")
        self.eval_x, self.eval_y = x.to(device), y.to(device)
        self.layout = torch.empty(0)  # this epoch's columns or window starts
        self.carried: dict[int, LSTMState] = {}  # each worker's state after its last window

    def sizes(self) -> dict[str, Any]:
        return {
            "train_tokens": len(self.corpus.train),
            "valid_tokens": len(self.corpus.valid),
            "valid_windows": len(self.eval_x),
            "split": self.corpus.rule,
            "sampling": sampling(self.cfg),
            **self.baselines(),
        }

    def model(self) -> nn.Module:
        cfg = self.cfg
        return build_language_model(cfg.model, cfg.text_model_size(), cfg.text_seq_len()).to(self.device)

    def start_epoch(self, epoch: int, i: int) -> None:
        if isinstance(self.sampler, Streams):
            self.layout = self.sampler.columns(epoch)
        else:
            self.layout = self.sampler.starts(epoch)
        if i == 0:  # the columns restart, and with them every worker's state
            self.carried.clear()

    def batch(self, worker: int, i: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return self.sampler.batch(self.layout, worker, i)

    def forward(self, worker: int, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if not self.carries:
            return model(x)
        assert isinstance(model, LSTMLM)
        logits, (h, c) = model.carry(x, self.carried.get(worker))
        self.carried[worker] = (h.detach(), c.detach())  # backpropagation stops at the window
        return logits

    def state(self) -> dict[str, Any]:
        return {"carried": dict(self.carried)}

    def load(self, state: dict[str, Any]) -> None:
        carried = state.get("carried", {})
        self.carried = {k: (h.to(self.device), c.to(self.device)) for k, (h, c) in carried.items()}

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def annotate(self, row: dict[str, Any], steps: int) -> None:
        split = self.measures.split
        for name in ("train", split, f"local_{split}"):
            if f"{name}_loss" in row:  # rows between evaluations have no validation loss
                row[f"{name}_bpb"] = row[f"{name}_loss"] / math.log(2)  # nats per byte -> bits per byte
        row["tokens"] = steps * self.cfg.workers * self.cfg.local_batch_size * self.cfg.text_seq_len()
        row["tokens_per_second"] = row["tokens"] / max(row["wall_seconds"] - row["eval_seconds"], 1e-9)

    def baselines(self) -> dict[str, float]:
        return {"unigram_bits_per_byte": self.corpus.unigram_bits()}
