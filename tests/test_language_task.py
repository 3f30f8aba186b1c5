"""The text task through the one training loop: optimizers and schedules by hand, a run that learns
and logs what the docs say, rows without evaluation, resume bit for bit and simulator = torchrun with
dropout on, for the GPT's random windows and the LSTM's carried state."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from localsgd.harness import optim
from localsgd.harness.cli import main
from localsgd.harness.config import preset
from localsgd.harness.language import GPT, LSTMLM
from localsgd.harness.text import load_corpus
from tests.helpers import launch
from tests.test_resume import kill_after_first_checkpoint, same_run
from tests.test_train import SOTU

needs_sotu = pytest.mark.skipif(not SOTU.is_dir(), reason=f"the SOTU corpus is not at {SOTU}")

# A GPT of 2 layers of width 32 on windows of 32 bytes, K = 2 workers with 4 windows each: a few
# seconds per run. Local SGD with H = 2 after 4 mini-batch steps, dropout on (each worker its own
# stream), 1 thread and ordered averaging (bitwise agreement of the runtimes).
LM = [
    "--dataset", "text", "--data-dir", str(SOTU), "--model", "gpt", "--width", "32", "--depth", "2",
    "--heads", "2", "--seq-len", "32", "--dropout", "0.1", "--workers", "2", "--local-batch-size", "4",
    "--local-steps", "2", "--switch-epoch", "0.00005", "--optimizer", "adamw", "--peak-lr", "0.01",
    "--weight-decay", "0.1", "--lr-schedule", "cosine", "--warmup-epochs", "0.00005", "--test-subset", "64",
    "--row-steps", "10", "--seed", "4", "--threads", "1", "--ordered-averaging", "true", "--progress", "false",
]  # fmt: skip
# GPT: (tokens - L) // L windows, // (K·B_loc) per step; the LSTM's columns: (tokens - L) // (K·B_loc)
# tokens each, less one, // L steps; both 39,013 here
STEPS_PER_EPOCH = (9_987_579 - 32) // 32 // (2 * 4)
assert STEPS_PER_EPOCH == ((9_987_579 - 32) // (2 * 4) - 1) // 32


def lm_flags(steps: int, model: str = "gpt") -> list[str]:
    """``steps`` steps of the GPT above, or of a 2 x 32 LSTM with the same settings otherwise."""
    flags = [*LM, "--epochs", repr(steps / STEPS_PER_EPOCH)]
    if model == "lstm":
        at = flags.index("--model")
        flags[at + 1] = "lstm"
        at = flags.index("--heads")
        del flags[at : at + 2]
    return flags


def test_cosine_schedule_by_hand() -> None:
    peak, final = 1.0, 0.1
    lr = [optim.cosine_lr_at(e, peak, 2.0, 10.0, final) for e in (0.0, 1.0, 2.0, 6.0, 10.0, 12.0)]
    # warm-up from 0; the peak at its end; halfway through the cosine the mean of peak and final
    assert lr == pytest.approx([0.0, 0.5, 1.0, 0.55, 0.1, 0.1])
    assert optim.cosine_lr_at(2.0 + 8 / 3, peak, 2.0, 10.0, final) == pytest.approx(0.1 + 0.9 * 0.75)


@pytest.mark.parametrize("kind", ["gpt", "lstm"])
def test_adamw_spares_norms_biases_and_embeddings(kind: str) -> None:
    """Decay exactly the weight matrices of attention, MLPs and LSTM gates; not the (tied)
    embeddings, position table, LayerNorms or biases: the names below are written out, not derived
    from the code under test."""
    model = GPT(256, 32, 2, 2, 16) if kind == "gpt" else LSTMLM(256, 32, 2)
    opt = optim.adamw(model, 1e-3, (0.9, 0.95), 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in opt.param_groups[0]["params"]}
    spared = {names[id(p)] for p in opt.param_groups[1]["params"]}
    if kind == "gpt":
        expect = {f"blocks.{i}.{w}.weight" for i in range(2) for w in ("qkv", "proj", "mlp.0", "mlp.2")}
    else:
        expect = {f"lstm.weight_{g}_l{i}" for i in range(2) for g in ("ih", "hh")}
    assert decayed == expect
    assert spared == set(names.values()) - expect and "embed.weight" in spared
    assert opt.param_groups[0]["weight_decay"] == 0.1 and opt.param_groups[1]["weight_decay"] == 0.0
    assert opt.defaults["betas"] == (0.9, 0.95)


def test_presets_validate_and_the_demos_fit_their_budget() -> None:
    """The presets are valid configs; the CPU demos stay small: under 5 minutes at the ~16k tokens/s
    measured for the 0.84M GPT needs at most ~4.8M training tokens."""
    for name in ("paper-lstm", "sotu-gpt", "sotu-lstm"):
        cfg = preset(name)
        cfg.validate()
        assert cfg.dataset == "text"
    gpt = preset("sotu-gpt")
    tokens = gpt.epochs * 9_987_579
    assert tokens <= 4.8e6
    paper = preset("paper-lstm")
    assert optim.peak_lr(paper.lr_per_64, paper.local_batch_size, paper.workers) == pytest.approx(
        2.5 * 32 * 32 / 24
    )  # the paper's code: lr 2.5 per 24 samples, scaled to K·B_loc = 1024


@needs_sotu
def test_lm_run_learns_and_logs_rows_by_steps(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """30 steps: rows after steps 10, 20 and 30 (--row-steps 10), tokens counted as steps · K · B_loc · L,
    bits per byte = loss / ln 2, and a validation loss well below an untrained model's 8 bits per
    byte (log2 256). Catches a loop that does not step the inner optimizer, a row schedule that
    ignores --row-steps, and a bits-per-byte conversion in the wrong base."""
    assert main(["train", *lm_flags(30), "--out", str(tmp_path / "run")]) == 0
    rows = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [10, 20, 30]
    assert [r["tokens"] for r in rows] == [s * 2 * 4 * 32 for s in (10, 20, 30)]
    for r in rows:
        assert r["valid_bpb"] == pytest.approx(r["valid_loss"] / math.log(2))
        assert r["train_bpb"] == pytest.approx(r["train_loss"] / math.log(2))
    assert rows[-1]["valid_bpb"] < 6.0 and rows[-1]["train_bpb"] < rows[0]["train_bpb"]
    summary = json.loads((tmp_path / "run/summary.json").read_text())
    unigram = load_corpus(SOTU).unigram_bits()
    assert summary["unigram_bits_per_byte"] == pytest.approx(unigram)
    assert summary["final_valid_bpb"] == rows[-1]["valid_bpb"]
    out = capsys.readouterr().out
    assert f"unigram entropy of the training bytes {unigram:.4f}" in out
    assert main(["sharpness", str(tmp_path / "run")]) == 2  # image-only measurements refuse in one line
    assert "is a text run; sharpness and interpolation measure image runs only" in capsys.readouterr().err


@needs_sotu
def test_lm_rows_between_evaluations(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--eval-every 2 with a row every 5 steps, 15 steps: rows after steps 5, 10 and 15, evaluated
    after 10 and at the end; the row in between has training bits per byte and tokens but no
    validation keys; the summary, the printed table and the plot read the evaluated rows. Catches
    the task's metrics assuming every row was evaluated (it raised KeyError: 'valid_loss')."""
    out = tmp_path / "run"
    flags = [*lm_flags(15), "--row-steps", "5", "--eval-every", "2", "--eval-local", "every"]
    assert main(["train", *flags, "--out", str(out)]) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [5, 10, 15]
    assert [("valid_bpb" in r, "local_valid_bpb" in r) for r in rows] == [
        (False, False),
        (True, True),
        (True, True),
    ]
    assert not any(key.startswith(("valid", "local")) for key in rows[0])
    assert rows[0]["train_bpb"] == pytest.approx(rows[0]["train_loss"] / math.log(2))
    assert rows[0]["tokens"] == 5 * 2 * 4 * 32
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_valid_bpb"] == rows[2]["valid_bpb"]
    assert summary["best_valid_bpb"] == min(rows[1]["valid_bpb"], rows[2]["valid_bpb"])
    printed = [line.split() for line in capsys.readouterr().out.splitlines()]
    table = [line[0] for line in printed if line and line[0][0].isdigit()]
    assert table == [f"{r['epoch']:g}" for r in rows[1:]]  # the table's rows: the evaluated ones
    assert main(["plot", str(out), "--out", str(tmp_path / "p.png")]) == 0


@needs_sotu
@pytest.mark.parametrize("model", ["gpt", "lstm"])
def test_killed_lm_run_with_dropout_resumes_bit_for_bit(tmp_path: Path, model: str) -> None:
    """Dropout draws from each worker's own random stream, saved in the checkpoint, the GPT's
    windows are a function of (seed, epoch), the LSTM's state carried along its columns is saved
    too: a run killed after a checkpoint (mid-epoch) and resumed ends with the uninterrupted run's
    model and rows. Catches a resume that restarts the dropout streams (or shares one stream among
    workers), a sampler that counts its draws, an LSTM resumed from a zero state."""
    flags = lm_flags(40, model)
    assert main(["train", *flags, "--out", str(tmp_path / "full")]) == 0
    step = kill_after_first_checkpoint(flags, tmp_path / "killed")
    assert step % 10 == 0 and step < 40
    assert main(["train", *flags, "--out", str(tmp_path / "killed"), "--resume"]) == 0
    same_run(tmp_path / "full", tmp_path / "killed", f"killed after the checkpoint of step {step}")


@needs_sotu
def test_torchrun_lstm_run_resumes_bit_for_bit(tmp_path: Path) -> None:
    """Two gloo processes, each holding one worker's carried LSTM state: a run cut back to its
    checkpoint of step 10 (mid-epoch) and resumed with --resume ends with the uninterrupted torchrun
    run's model and rows. Catches a process checkpoint without its worker's state."""
    flags = lm_flags(20, "lstm")
    at = flags.index("--workers")
    cmd = ["-m", "localsgd", "train", *flags[:at], *flags[at + 2 :]]
    launch(2, [*cmd, "--out", str(tmp_path / "full")])
    launch(2, [*cmd, "--out", str(tmp_path / "resumed")])
    for name in ("model.pt", "summary.json"):  # as a crash after the checkpoint would have left it
        (tmp_path / "resumed" / name).unlink()
    assert json.loads((tmp_path / "resumed/checkpoints/latest").read_text())["step"] == 10
    launch(2, [*cmd, "--out", str(tmp_path / "resumed"), "--resume", "true"])
    same_run(tmp_path / "full", tmp_path / "resumed")


@needs_sotu
@pytest.mark.parametrize("model", ["gpt", "lstm"])
def test_lm_simulator_equals_torchrun_with_dropout(tmp_path: Path, model: str) -> None:
    """K = 2 in the simulator and as 2 gloo processes: the same model bit for bit and the same rows.
    Without per-worker dropout streams (or windows, or LSTM states) the simulator's second worker
    would continue the first one's while rank 1 starts its own, and the models would differ after
    the first step."""
    flags = lm_flags(20, model)
    assert main(["train", *flags, "--out", str(tmp_path / "sim")]) == 0
    at = flags.index("--workers")
    launch(2, ["-m", "localsgd", "train", *flags[:at], *flags[at + 2 :], "--out", str(tmp_path / "dist")])
    sim, dist = (
        torch.load(tmp_path / run / "model.pt", weights_only=True)["model"] for run in ("sim", "dist")
    )
    assert all(torch.equal(sim[k], dist[k]) for k in sim)
    rows = [
        [json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        for run in ("sim", "dist")
    ]
    assert len(rows[0]) == len(rows[1]) == 2
    for a, b in zip(*rows, strict=True):
        assert (a["step"], a["tokens"], a["rounds"], a["bytes"]) == (
            b["step"],
            b["tokens"],
            b["rounds"],
            b["bytes"],
        )
        # the same numbers summed in another grouping (each rank evaluates every K-th window, in
        # float32 per batch): equal to float32 rounding
        for key in ("train_loss", "train_acc", "valid_loss", "valid_acc"):
            assert a[key] == pytest.approx(b[key], rel=1e-6), key


@needs_sotu
def test_plot_of_text_runs_draws_bits_per_byte_against_tokens(tmp_path: Path) -> None:
    """The comparison plot of text runs puts each run's validation bits per byte against its
    training tokens and rounds (catches the image panels' accuracy key, or epochs on the x axis)."""
    from unittest.mock import patch

    from localsgd.harness import plot

    for h in ("1", "2"):
        flags = [*lm_flags(20), "--local-steps", h, "--switch-epoch", "0", "--out", str(tmp_path / f"h{h}")]
        assert main(["train", *flags]) == 0
    drawn = {}
    real_save = plot.save

    def keep(fig, axes, legend_ax, out):  # what is on the axes, before they are closed
        drawn.update(
            {
                f"{ax.get_ylabel()} vs {ax.get_xlabel()}": [ln.get_xydata().tolist() for ln in ax.lines]
                for ax in axes.flat
            }
        )
        return real_save(fig, axes, legend_ax, out)

    with patch.object(plot, "save", keep):
        assert (
            main(["plot", str(tmp_path / "h1"), str(tmp_path / "h2"), "--out", str(tmp_path / "p.png")]) == 0
        )
    runs = [
        [json.loads(x) for x in (tmp_path / h / "metrics.jsonl").read_text().splitlines()]
        for h in ("h1", "h2")
    ]
    assert drawn["validation bits per byte vs training tokens"] == [
        [[r["tokens"], r["valid_bpb"]] for r in rows] for rows in runs
    ]
    assert drawn["validation bits per byte vs global communication rounds"] == [
        [[r["rounds"]["global"], r["valid_bpb"]] for r in rows] for rows in runs
    ]
    assert runs[0][-1]["rounds"]["global"] == 20 == 2 * runs[1][-1]["rounds"]["global"]


@needs_sotu
def test_text_study_summarises_bits_per_byte_paired_by_seed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`localsgd study smoke-text`: the table and the paired comparison are in bits per byte, taken
    from each run's own summary (catches a text study summarised with the image study's accuracy
    keys, or differences paired by position instead of seed)."""
    assert main(["study", "smoke-text", "--out", str(tmp_path), "--data-dir", str(SOTU), "--plot"]) == 0
    out = capsys.readouterr().out
    assert "final valid bpb" in out and "final_valid_bpb" in out
    study = json.loads((tmp_path / "study.json").read_text())
    finals = {
        (m, s): json.loads((tmp_path / d / f"seed-{s}" / "summary.json").read_text())["final_valid_bpb"]
        for m, d in (("mini-batch", "mini-batch"), ("local H=4", "local_H4"))
        for s in (1, 2)
    }
    (row,) = [r for r in study["rows"] if r["method"] == "local H=4"]
    assert row["final_valid_bpb"][0] == pytest.approx((finals["local H=4", 1] + finals["local H=4", 2]) / 2)
    assert row["global_rounds"] == [5, 5]  # 20 steps, H = 4
    (paired,) = [c for c in study["comparisons"] if c["metric"] == "final_valid_bpb"]
    assert paired["differences"] == [finals["local H=4", s] - finals["mini-batch", s] for s in (1, 2)]
    losses = [
        json.loads((tmp_path / "local_H4" / f"seed-{s}" / "summary.json").read_text())["final_valid_loss"]
        for s in (1, 2)
    ]
    (line,) = [x for x in out.splitlines() if x.startswith("local H=4 ") and " 2/2 " in x]
    assert "valid loss" in out and f"{sum(losses) / 2:.4f} ±" in line  # the loss column, in nats
    assert (tmp_path / "study.png").read_bytes()[:4] == b"\x89PNG"


def test_every_study_piece_is_a_valid_config() -> None:
    """A study's pieces are checked before its first run; here every study's, so a broken
    definition fails in CI rather than hours into a sitting."""
    from localsgd.harness.studies import STUDIES

    for name, study in STUDIES.items():
        for method in study.methods:
            for seed in study.seeds:
                study.config(method, seed, "data").validate()
        assert study.baseline is None or study.baseline in study.methods, name
