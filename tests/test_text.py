"""The text task's pieces: corpus loading and split, the per-worker column streams, the language
models (shapes, tied weights, parameter counts by formula, causality)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from localsgd.harness.language import GPT, LSTMLM
from localsgd.harness.text import CorpusError, Streams, load_corpus, windows

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
