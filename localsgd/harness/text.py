"""Text corpora for language modelling: byte-level tokens, a documented split, and two ways to
batch the training stream: windows in a seeded random order (models without carried state), and
the paper's contiguous columns (a recurrent model carrying its state from window to window).

* **Tokens**: the corpus's UTF-8 bytes (vocabulary 256): no tokenizer to download or train, and
  the loss per token is directly in bits per byte (``loss / ln 2``).
* **Corpus**: a folder of ``.txt`` files (read in name order) or one file. Each document is
  followed by one newline byte. In a folder whose file names start with a year (``1790_...``, as
  the State of the Union corpus), documents from before ``split_year`` are the training split and
  the rest the validation split; otherwise the last ``valid_fraction`` of the documents (of the
  bytes, for a single file) is the validation split.
* **RandomWindows** (models without carried state, the GPT): each epoch, the training stream is cut
  into non-overlapping windows of L + 1 tokens (L inputs, the targets shifted by one) starting at
  a fresh offset in [0, L); a seeded permutation of these windows is dealt out in order, step i's
  K·B_loc windows being the next K·B_loc of the permutation and worker k taking its B_loc of
  them. Without replacement, so an epoch reads every window of its grid once (the remainder of
  fewer than K·B_loc windows is dropped) and no two workers read the same window in an epoch, as
  the image task's disjoint shards; any part of an epoch is a uniform sample of the whole corpus,
  not the beginning of each column. The order is a function of (seed, epoch) only: a resumed run
  and every process compute it again, nothing is saved; and step i's K·B_loc windows are the same
  for any split of them into K workers of B_loc.
* **Streams** (the LSTM, the batching of the paper's code, ``batchify``): the training tokens are
  cut into K·B_loc contiguous columns of equal length, one per sequence slot; worker k owns
  columns k·B_loc .. (k+1)·B_loc − 1, so its batch rows are contiguous text and no two workers
  share a token within an epoch. Step i of an epoch reads tokens [i·L, (i+1)·L) of every column as
  inputs and the next token of each as targets (L = ``seq_len``), so a recurrent model can carry
  its state from one window to the next. Each epoch starts the columns at a fresh offset in
  [0, L) drawn from the seed, so the window boundaries move from epoch to epoch. A part of an
  epoch reads only the beginning of each column: a biased sample of the corpus.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from localsgd._validate import check_int

VOCAB = 256
SEPARATOR = b"\n"


class CorpusError(ValueError):
    """A corpus that cannot be read or split (the message names the path)."""


@dataclass(frozen=True)
class Corpus:
    """Byte tokens of the two splits (uint8) and the documents each came from."""

    train: torch.Tensor
    valid: torch.Tensor
    train_documents: tuple[str, ...]
    valid_documents: tuple[str, ...]
    rule: str  # how the split was made, for config.json

    def unigram_bits(self) -> float:
        """Entropy of the training split's byte frequencies in bits per byte: what a model that
        ignores context achieves at best, the bar a language model must go well below."""
        counts = torch.bincount(self.train.long(), minlength=VOCAB).double()
        p = counts[counts > 0] / counts.sum()
        return float(-(p * p.log2()).sum())


def _year(name: str) -> int | None:
    match = re.match(r"(\d{4})(?!\d)", name)
    return int(match.group(1)) if match else None


def _tokens(chunks: list[bytes]) -> torch.Tensor:
    data = bytearray()
    for chunk in chunks:
        data += chunk
    return torch.frombuffer(data, dtype=torch.uint8).clone() if data else torch.empty(0, dtype=torch.uint8)


def load_corpus(path: Path, split_year: int = 2000, valid_fraction: float = 0.05) -> Corpus:
    """Read and split a corpus (see the module docstring)."""
    if not 0 < valid_fraction < 1:
        raise CorpusError(f"valid_fraction must be between 0 and 1, got {valid_fraction!r}")
    path = Path(path)
    if path.is_file():
        data = path.read_bytes() + SEPARATOR
        cut = len(data) - max(1, round(valid_fraction * len(data)))
        rule = f"one file: the last {valid_fraction:g} of its bytes for validation"
        return Corpus(_tokens([data[:cut]]), _tokens([data[cut:]]), (path.name,), (path.name,), rule)
    if not path.is_dir():
        raise CorpusError(f"{path}: no such file or folder (a corpus is a folder of .txt files or one file)")
    files = sorted(p for p in path.iterdir() if p.suffix == ".txt" and p.is_file())
    if len(files) < 2:
        raise CorpusError(f"{path}: a corpus folder needs at least 2 .txt files, found {len(files)}")
    years = [_year(f.name) for f in files]
    if all(y is not None for y in years):
        is_valid = [y >= split_year for y in years]  # type: ignore[operator]
        rule = f"documents from before {split_year} for training, from {split_year} on for validation"
    else:
        n_valid = max(1, round(valid_fraction * len(files)))
        is_valid = [i >= len(files) - n_valid for i in range(len(files))]
        rule = f"the last {n_valid} of {len(files)} documents (in name order) for validation"
    if all(is_valid) or not any(is_valid):
        raise CorpusError(f"{path}: the split ({rule}) leaves one side empty")
    docs = [(f.name, f.read_bytes() + SEPARATOR, v) for f, v in zip(files, is_valid, strict=True)]
    return Corpus(
        _tokens([d for _, d, v in docs if not v]),
        _tokens([d for _, d, v in docs if v]),
        tuple(n for n, _, v in docs if not v),
        tuple(n for n, _, v in docs if v),
        rule,
    )


def _check_sizes(workers: int, local_batch_size: int, seq_len: int) -> None:
    for name, value in (("workers (K)", workers), ("local_batch_size (B_loc)", local_batch_size),
                        ("seq_len", seq_len)):  # fmt: skip
        check_int(name, value, 1, CorpusError)


def _generator(seed: int, epoch: int) -> torch.Generator:
    """The generator of one epoch's layout: the same in every process and after a resume."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


class RandomWindows:
    """Each epoch, a seeded permutation of the stream's non-overlapping windows, dealt to the
    workers step by step (see the module docstring).

    Args:
        tokens: the training split.
        workers: K.
        local_batch_size: B_loc, windows per worker and step.
        seq_len: L, tokens per window.
        seed: the epochs' offsets and permutations are drawn from it.
    """

    def __init__(
        self, tokens: torch.Tensor, workers: int, local_batch_size: int, seq_len: int, seed: int
    ) -> None:
        _check_sizes(workers, local_batch_size, seq_len)
        self.tokens, self.workers, self.local_batch_size = tokens, workers, local_batch_size
        self.seq_len, self.seed = seq_len, seed
        self.count = (len(tokens) - seq_len) // seq_len  # windows per epoch, room for every offset
        self.steps_per_epoch = self.count // (workers * local_batch_size)
        if self.steps_per_epoch < 1:
            raise CorpusError(
                f"{len(tokens)} training tokens are too few for K·B_loc = {workers * local_batch_size} "
                f"windows of {seq_len + 1} tokens (seq_len = {seq_len}) per step"
            )
        self.span = torch.arange(seq_len + 1, device=tokens.device)

    def starts(self, epoch: int) -> torch.Tensor:
        """Where this epoch's windows start, in the order they are dealt: a fresh offset in [0, L)
        plus L times a permutation of the window indices (steps_per_epoch·K·B_loc of them)."""
        g = _generator(self.seed, epoch)
        offset = int(torch.randint(self.seq_len, (1,), generator=g))
        dealt = self.steps_per_epoch * self.workers * self.local_batch_size
        order = torch.randperm(self.count, generator=g)[:dealt]
        return (offset + order * self.seq_len).to(self.tokens.device)

    def batch(self, starts: torch.Tensor, worker: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Worker ``worker``'s inputs and targets at step ``step`` of the epoch: (B_loc, L) each,
        int64; its windows are ``starts[(step·K + worker)·B_loc :][:B_loc]``."""
        if not 0 <= step < self.steps_per_epoch:
            raise IndexError(f"step must be in [0, {self.steps_per_epoch}), got {step}")
        first = (step * self.workers + worker) * self.local_batch_size
        window = self.tokens[starts[first : first + self.local_batch_size, None] + self.span].long()
        return window[:, :-1], window[:, 1:]


class Streams:
    """The training stream cut into K·B_loc contiguous columns, per epoch (see the module docstring).

    Args:
        tokens: the training split.
        workers: K.
        local_batch_size: B_loc, columns per worker.
        seq_len: L, tokens per window.
        seed: the epochs' offsets are drawn from it.
    """

    def __init__(
        self, tokens: torch.Tensor, workers: int, local_batch_size: int, seq_len: int, seed: int
    ) -> None:
        _check_sizes(workers, local_batch_size, seq_len)
        self.tokens, self.workers, self.local_batch_size = tokens, workers, local_batch_size
        self.seq_len, self.seed = seq_len, seed
        columns = workers * local_batch_size
        self.column_length = (len(tokens) - seq_len) // columns  # room for every epoch's offset
        self.steps_per_epoch = (self.column_length - 1) // seq_len
        if self.steps_per_epoch < 1:
            longest = (len(tokens) - columns) // (columns + 1)  # the largest L with a step per epoch
            if longest >= 1:
                raise CorpusError(
                    f"seq_len = {seq_len} is too long for the training split: its {len(tokens)} tokens in "
                    f"K·B_loc = {columns} columns allow at most seq_len = {longest}"
                )
            raise CorpusError(
                f"{len(tokens)} training tokens are too few for K·B_loc = {columns} columns of "
                f"at least {2 * seq_len + 1} tokens (seq_len = {seq_len})"
            )

    def offset(self, epoch: int) -> int:
        """Where the columns start in this epoch: a fresh offset in [0, L)."""
        return int(torch.randint(self.seq_len, (1,), generator=_generator(self.seed, epoch)))

    def columns(self, epoch: int) -> torch.Tensor:
        """(K·B_loc, column_length) tokens of this epoch: row j is one contiguous piece of text."""
        start = self.offset(epoch)
        n = self.workers * self.local_batch_size * self.column_length
        return self.tokens[start : start + n].view(self.workers * self.local_batch_size, self.column_length)

    def batch(self, columns: torch.Tensor, worker: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Worker ``worker``'s inputs and targets at step ``step`` of the epoch: (B_loc, L) each,
        int64, the targets the inputs shifted by one token."""
        if not 0 <= step < self.steps_per_epoch:
            raise IndexError(f"step must be in [0, {self.steps_per_epoch}), got {step}")
        rows = columns[worker * self.local_batch_size : (worker + 1) * self.local_batch_size]
        window = rows[:, step * self.seq_len : (step + 1) * self.seq_len + 1].long()
        return window[:, :-1], window[:, 1:]


def windows(tokens: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Evaluation: the split as consecutive non-overlapping windows of L tokens, (n, L) inputs and
    targets; the last partial window is dropped."""
    n = (len(tokens) - 1) // seq_len
    x = tokens[: n * seq_len].long().view(n, seq_len)
    y = tokens[1 : n * seq_len + 1].long().view(n, seq_len)
    return x, y
