"""The text task's pieces: corpus loading and split, the GPT's random windows and the LSTM's column
streams, the LSTM's state carried along a column, the language models (shapes, tied weights,
parameter counts by formula, causality)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from localsgd.harness.config import Config
from localsgd.harness.language import GPT, LSTMLM
from localsgd.harness.tasks import TextTask
from localsgd.harness.text import CorpusError, RandomWindows, Streams, load_corpus, windows

SOTU = Path(__file__).resolve().parents[2] / "shared/data/sotu"


def write_docs(folder: Path, docs: dict[str, bytes]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in docs.items():
        (folder / name).write_bytes(text)
    return folder


def test_folder_with_years_splits_by_year(tmp_path: Path) -> None:
    folder = write_docs(tmp_path / "c", {"1999_a.txt": b"old", "2000_b.txt": b"new!", "1800_c.txt": b"x"})
    (folder / "notes.md").write_bytes(b"ignored")
    corpus = load_corpus(folder, split_year=2000)
    assert bytes(corpus.train.tolist()) == b"x\nold\n"  # name order, a newline after each document
    assert bytes(corpus.valid.tolist()) == b"new!\n"
    assert corpus.train_documents == ("1800_c.txt", "1999_a.txt") and corpus.valid_documents == (
        "2000_b.txt",
    )
    assert corpus.train.dtype == torch.uint8


def test_folder_without_years_and_single_file_split_by_fraction(tmp_path: Path) -> None:
    folder = write_docs(tmp_path / "c", {f"doc{i}.txt": bytes([97 + i]) * 3 for i in range(10)})
    corpus = load_corpus(folder, valid_fraction=0.2)
    assert corpus.valid_documents == ("doc8.txt", "doc9.txt")
    assert bytes(corpus.valid.tolist()) == b"iii\njjj\n"
    one = tmp_path / "one.txt"
    one.write_bytes(b"0123456789" * 10)  # 100 bytes + the newline
    corpus = load_corpus(one, valid_fraction=0.1)
    assert len(corpus.train) == 101 - 10 and bytes(corpus.valid.tolist()) == b"123456789\n"
    assert torch.equal(
        torch.cat([corpus.train, corpus.valid]),
        torch.tensor(list(b"0123456789" * 10 + b"\n"), dtype=torch.uint8),
    )


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p / "missing", "no such file or folder"),
        (lambda p: write_docs(p / "c", {"a.txt": b"a"}), "needs at least 2 .txt files, found 1"),
        (lambda p: write_docs(p / "c", {"1990_a.txt": b"a", "1991_b.txt": b"b"}), "leaves one side empty"),
    ],
)
def test_bad_corpus_is_one_line_naming_the_path(tmp_path: Path, make, message: str) -> None:
    path = make(tmp_path)
    with pytest.raises(CorpusError) as info:
        load_corpus(path)
    assert message in str(info.value) and str(path) in str(info.value) and "\n" not in str(info.value)


def test_unigram_entropy_by_hand(tmp_path: Path) -> None:
    folder = write_docs(tmp_path / "c", {"2001_v.txt": b"zz", "1900_a.txt": b"aaab"})  # train: "aaab\n"
    p = [3 / 5, 1 / 5, 1 / 5]
    assert load_corpus(folder).unigram_bits() == pytest.approx(-sum(q * math.log2(q) for q in p))


@pytest.mark.skipif(not SOTU.is_dir(), reason=f"the SOTU corpus is not at {SOTU}")
def test_sotu_split_matches_its_readme() -> None:
    """Before 2000 for training, from 2000 on for validation: the README's byte counts plus one
    newline per document."""
    corpus = load_corpus(SOTU, split_year=2000)
    assert len(corpus.train_documents) + len(corpus.valid_documents) == 233
    assert len(corpus.train) == 9_987_368 + len(corpus.train_documents)
    assert len(corpus.valid) == 774_045 + len(corpus.valid_documents)
    assert corpus.valid_documents[0].startswith("2000_")


def test_streams_are_contiguous_per_worker_and_disjoint_between_workers() -> None:
    """Every row of a worker's batches is one contiguous piece of the stream, and consecutive steps
    continue it; in an epoch no token position is read by two workers; targets are inputs shifted."""
    tokens = (torch.arange(5000) % 251).to(torch.uint8)  # position p holds p mod 251
    k, b, seq = 3, 2, 7
    streams = Streams(tokens, k, b, seq, seed=4)
    positions: dict[int, set[int]] = {w: set() for w in range(k)}
    for epoch in range(3):
        start = streams.offset(epoch)
        columns = streams.columns(epoch)
        for w in range(k):
            for step in range(streams.steps_per_epoch):
                x, y = streams.batch(columns, w, step)
                assert x.shape == y.shape == (b, seq) and x.dtype == torch.int64
                for row in range(b):
                    column = w * b + row
                    first = start + column * streams.column_length + step * seq
                    expected = [(first + i) % 251 for i in range(seq + 1)]
                    assert x[row].tolist() == expected[:-1] and y[row].tolist() == expected[1:]
                    if epoch == 0:
                        positions[w] |= set(range(first, first + seq))
    assert (
        not (positions[0] & positions[1])
        and not (positions[1] & positions[2])
        and not (positions[0] & positions[2])
    )
    assert len({streams.offset(e) for e in range(20)}) > 1  # fresh offsets per epoch
    assert [Streams(tokens, k, b, seq, seed=4).offset(e) for e in range(5)] == [
        streams.offset(e) for e in range(5)
    ]
    with pytest.raises(CorpusError, match="too few"):
        Streams(tokens[:100], 8, 8, 7, seed=0)


def epoch_windows(sampler: RandomWindows, epoch: int) -> dict[int, list[int]]:
    """Every worker's window starts in an epoch, read off its batches of a stream whose token at
    position p is p (each row checked to be L consecutive positions, the targets one further)."""
    starts = sampler.starts(epoch)
    seen: dict[int, list[int]] = {w: [] for w in range(sampler.workers)}
    for step in range(sampler.steps_per_epoch):
        for w in range(sampler.workers):
            x, y = sampler.batch(starts, w, step)
            assert (
                x.shape == y.shape == (sampler.local_batch_size, sampler.seq_len) and x.dtype == torch.int64
            )
            for row, target in zip(x.tolist(), y.tolist(), strict=True):
                assert row == list(range(row[0], row[0] + sampler.seq_len)) and target == [p + 1 for p in row]
                seen[w].append(row[0])
    return seen


def test_random_windows_cover_the_corpus_once_per_epoch_disjoint_between_workers() -> None:
    """Every epoch reads each window of its grid (a fresh offset plus multiples of L) once, except
    fewer than K·B_loc, no two workers the same one; the first tenth of an epoch already spreads
    over the whole stream (the columns' first tenth would hit only K·B_loc = 8 of 100 stretches).
    Catches windows dealt in stream order, workers given the same windows, a fixed offset."""
    n, k, b, seq = 100_000, 2, 4, 8
    sampler = RandomWindows(torch.arange(n), k, b, seq, seed=4)
    grid_size = (n - seq) // seq  # windows of L + 1 tokens at offset + j·L, for any offset < L
    assert sampler.steps_per_epoch == grid_size // (k * b)
    offsets = set()
    for epoch in range(3):
        seen = epoch_windows(sampler, epoch)
        starts = seen[0] + seen[1]
        offset = starts[0] % seq
        offsets.add(offset)
        grid = {offset + j * seq for j in range(grid_size)}
        assert len(set(starts)) == len(starts) == sampler.steps_per_epoch * k * b  # each window once
        assert set(starts) <= grid and len(grid - set(starts)) < k * b
        assert not set(seen[0]) & set(seen[1])
    assert len(offsets) > 1  # the boundaries move
    tenth = sampler.steps_per_epoch // 10
    first = sampler.starts(0)[: tenth * k * b]
    stretches = {int(s) * 100 // n for s in first}
    assert len(stretches) >= 95, sorted(stretches)
    with pytest.raises(CorpusError, match="too few"):
        RandomWindows(torch.arange(100), 4, 4, 8, seed=0)


def test_random_windows_are_a_function_of_seed_worker_and_step() -> None:
    """A batch depends on (seed, epoch, worker, step) only: the same from a fresh sampler, in any
    order of calls; another seed gives other windows; step i's K·B_loc windows are the same for any
    split of them into workers (K = 1, 2, 4). Catches a sampler that draws from a generator as it
    goes (its batches would depend on the calls before them)."""
    tokens = torch.arange(50_000)

    def batch(seed: int, k: int, b: int, epoch: int, worker: int, step: int) -> torch.Tensor:
        sampler = RandomWindows(tokens, k, b, 16, seed)
        return sampler.batch(sampler.starts(epoch), worker, step)[0]

    sampler = RandomWindows(tokens, 2, 4, 16, seed=7)
    starts = sampler.starts(2)
    later = sampler.batch(starts, 1, 9)[0]
    assert torch.equal(sampler.batch(starts, 0, 3)[0], batch(7, 2, 4, 2, 0, 3))
    assert torch.equal(later, batch(7, 2, 4, 2, 1, 9))
    assert not torch.equal(later, batch(8, 2, 4, 2, 1, 9))
    assert not torch.equal(later, batch(7, 2, 4, 1, 1, 9))
    whole = batch(7, 1, 8, 2, 0, 9)
    for k in (2, 4):
        assert torch.equal(torch.cat([batch(7, k, 8 // k, 2, w, 9) for w in range(k)]), whole)


def tiny_text_task(tmp_path: Path, model: str, **settings: object) -> TextTask:
    """A TextTask on a 3,000-byte random corpus (K = 2, B_loc = 3, windows of 8 bytes)."""
    g = torch.Generator().manual_seed(0)
    folder = write_docs(
        tmp_path / "corpus",
        {name: bytes(torch.randint(0, 256, (size,), generator=g).tolist())
         for name, size in (("1990_a.txt", 3000), ("2001_b.txt", 200))},
    )  # fmt: skip
    cfg = Config(
        dataset="text", data_dir=str(folder), model=model, width=16, depth=2, seq_len=8, workers=2,
        local_batch_size=3, seed=5, **settings,  # type: ignore[arg-type]
    )  # fmt: skip
    return TextTask(cfg, torch.device("cpu"))


def test_lstm_state_is_carried_along_a_column_per_worker_and_reset_where_columns_restart(
    tmp_path: Path,
) -> None:
    """Training logits of a worker's consecutive windows equal one pass of the LSTM over its
    columns' text from a zero state (an independent computation: the model's own forward over the
    concatenated windows), with the other worker's steps in between; the state kept between windows
    has no graph; step 0 of the next epoch starts from a zero state again. Catches a state reset
    every window, one state shared by the workers, a state never reset, a state not detached."""
    task = tiny_text_task(tmp_path, "lstm")
    torch.manual_seed(0)
    model = task.model()
    g = torch.Generator()
    task.start_epoch(0, 0)
    inputs, logits = [], []
    for i in range(3):
        for w in (0, 1):
            x, _ = task.batch(w, i, g)
            out = task.forward(w, model, x)
            if w == 1:
                inputs.append(x)
                logits.append(out.detach())
                h, c = task.carried[1]
                assert out.grad_fn is not None and h.grad_fn is None and c.grad_fn is None
    with torch.no_grad():
        whole = model(torch.cat(inputs, dim=1))  # (B_loc, 3·L) of contiguous text
    torch.testing.assert_close(torch.cat(logits, dim=1), whole, rtol=0, atol=1e-5)
    assert (logits[1] - model(inputs[1]).detach()).abs().max() > 1e-3  # the state matters
    task.start_epoch(1, 0)
    x, _ = task.batch(1, 0, g)
    with torch.no_grad():
        assert torch.equal(task.forward(1, model, x), model(x))


def test_gpt_task_forward_is_the_model_and_carries_nothing(tmp_path: Path) -> None:
    task = tiny_text_task(tmp_path, "gpt", heads=2)
    torch.manual_seed(0)
    model = task.model().eval()
    task.start_epoch(0, 0)
    x, _ = task.batch(1, 2, torch.Generator())
    with torch.no_grad():
        assert torch.equal(task.forward(1, model, x), model(x))
    assert task.state() == {"carried": {}}


def test_evaluation_windows_cover_the_split_in_order() -> None:
    tokens = torch.arange(23, dtype=torch.uint8)
    x, y = windows(tokens, 5)
    assert x.tolist() == [list(range(i, i + 5)) for i in range(0, 20, 5)]
    assert y.tolist() == [list(range(i + 1, i + 6)) for i in range(0, 20, 5)]


def test_lstm_shapes_tied_weights_and_parameter_count() -> None:
    v, h, layers = 256, 32, 3
    model = LSTMLM(v, h, layers, dropout=0.4)
    assert model(torch.randint(0, v, (4, 9))).shape == (4, 9, v)
    assert model.decoder.weight is model.embed.weight
    # embedding V·H, per layer 4H·(H + H) weights and 2·4H biases, the decoder's bias V
    assert sum(p.numel() for p in model.parameters()) == v * h + layers * (8 * h * h + 8 * h) + v
    assert sum(p.numel() for p in LSTMLM(256, 256, 2).parameters()) == 1_118_464


def test_gpt_shapes_tied_weights_parameter_count_and_causality() -> None:
    v, d, layers, heads, context = 256, 32, 2, 4, 16
    torch.manual_seed(0)
    model = GPT(v, d, layers, heads, context).eval()
    tokens = torch.randint(0, v, (2, context))
    logits = model(tokens)
    assert logits.shape == (2, context, v) and model.decoder.weight is model.embed.weight
    # embeddings (V + context)·d; per block 2 LayerNorms 4d, qkv 3d² + 3d, projection d² + d,
    # MLP 8d² + 5d; the final LayerNorm 2d; the decoder is the embedding
    per_block = 12 * d * d + 13 * d
    assert sum(p.numel() for p in model.parameters()) == (v + context) * d + layers * per_block + 2 * d
    assert sum(p.numel() for p in GPT(256, 128, 4, 4, 128).parameters()) == 842_496
    changed = tokens.clone()
    changed[:, 10] = (changed[:, 10] + 1) % v  # a later token cannot change earlier predictions
    again = model(changed)
    torch.testing.assert_close(again[:, :10], logits[:, :10], rtol=0, atol=1e-6)  # any CPU's kernels
    assert (again[:, 10:] - logits[:, 10:]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="longer than the context 16"):
        model(torch.randint(0, v, (1, 17)))


def test_lstm_is_causal() -> None:
    torch.manual_seed(0)
    model = LSTMLM(256, 16, 2).eval()
    tokens = torch.randint(0, 256, (2, 12))
    changed = tokens.clone()
    changed[:, 7] = (changed[:, 7] + 1) % 256
    a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[:, :7], b[:, :7], rtol=0, atol=1e-6)
    assert (a[:, 7:] - b[:, 7:]).abs().max() > 1e-4
