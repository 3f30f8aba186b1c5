"""The training harness: config, optimisation rules, the train command in both runtimes, plots."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from unittest.mock import patch

import pytest
import torch
from torch import nn

from localsgd.harness import optim, plot
from localsgd.harness.cli import main
from localsgd.harness.config import PRESETS, Config, ConfigError, load_toml, preset
from localsgd.harness.models import build_model
from localsgd.harness.tasks import shard_steps
from localsgd.harness.train import make_plan
from tests.helpers import launch
from tests.test_data import write_cifar100

ROOT = Path(__file__).resolve().parents[1]
CIFAR10 = ROOT.parent / "shared/data/cifar-10-batches-py"
SOTU = ROOT.parent / "shared/data/sotu"
needs_cifar10 = pytest.mark.skipif(not CIFAR10.is_dir(), reason=f"CIFAR-10 not found at {CIFAR10}")
TINY = [
    "--dataset", "cifar10", "--data-dir", str(CIFAR10), "--model", "resnet20",
    "--train-subset", "256", "--test-subset", "200", "--workers", "4", "--local-batch-size", "16",
    "--epochs", "2", "--local-steps", "2", "--switch-epoch", "1", "--warmup-epochs", "0.5", "--seed", "3",
    # Bitwise agreement of the runtimes: the same thread count (convolution results depend on it)
    # and averages summed in worker order under torchrun, as in the simulator.
    "--threads", "1", "--ordered-averaging", "true",
]  # fmt: skip


def test_paper_lr_rule_warmup_and_decays() -> None:
    """The paper preset: peak 0.1 * 128/64 * 16 = 3.2, per-step warm-up from 0.1 over 5 epochs,
    x0.1 at epochs 150 and 225; t' is the first decay (25 steps per epoch at K=16, B_loc=128)."""
    cfg = preset("paper")
    plan = make_plan(cfg, shard_steps(cfg, 50_000))
    assert (plan.steps_per_epoch, plan.total_steps, plan.switch_step) == (25, 7500, 3750)
    assert plan.peak_lr == pytest.approx(3.2)

    def lr(step: int) -> float:
        return optim.lr_at(step / 25, plan.peak_lr, cfg.lr_per_64, 5, plan.decay_epochs, 0.1)

    assert lr(0) == pytest.approx(0.1)
    assert lr(1) == pytest.approx(0.1 + 3.1 / 125)
    assert lr(62) == pytest.approx(0.1 + 3.1 * 62 / 125)
    assert lr(125) == pytest.approx(3.2)
    assert lr(3749) == pytest.approx(3.2)
    assert lr(3750) == pytest.approx(0.32)
    assert lr(5625) == pytest.approx(0.032)
    assert lr(7499) == pytest.approx(0.032)
    assert make_plan(
        preset("paper-small-batch"), shard_steps(preset("paper-small-batch"), 50_000)
    ).peak_lr == pytest.approx(0.2)


def test_steps_per_epoch_keep_the_short_last_batch() -> None:
    cfg = Config(workers=16, local_batch_size=128, epochs=1.5)
    plan = make_plan(cfg, shard_steps(cfg, 50_000))  # 3125 images per worker: 24 full batches and one of 53
    assert plan.steps_per_epoch == 25
    assert plan.total_steps == 38  # fractional epochs round to whole steps


def test_no_weight_decay_on_batchnorm_parameters() -> None:
    """All BatchNorm weights and biases (the shortcut projections' too) are spared; a step with zero
    gradients shrinks every other parameter by lr * wd and leaves BatchNorm parameters alone."""
    model = build_model("resnet20", 10)
    opt = optim.sgd(model, lr=0.5, momentum=0.0, nesterov=False, weight_decay=1e-2)
    bn = {id(p) for m in model.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters()}
    assert len(bn) == 2 * 21  # 19 in the blocks and stem + 2 shortcut projections
    assert {id(p) for p in opt.param_groups[1]["params"]} == bn
    assert opt.param_groups[1]["weight_decay"] == 0.0
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for name, p in model.named_parameters():
        factor = 1.0 if id(p) in bn else 1 - 0.5 * 1e-2
        assert torch.allclose(p, before[name] * factor), name


def test_presets_toml_and_flags_in_order(tmp_path: Path) -> None:
    toml = tmp_path / "run.toml"
    toml.write_text('local-steps = 8\nswitch_epoch = "first-decay"\nepochs = 40\ndecay_at = [0.6]\n')
    cfg = load_toml(toml, base=preset("demo"))
    assert (cfg.workers, cfg.local_steps, cfg.epochs, cfg.switch_epoch_value()) == (4, 8, 40.0, 24.0)
    assert isinstance(cfg.epochs, float)
    cfg.validate()


BAD_CONFIGS = [
    (["--workers", "0"], "workers must be an integer >= 1, got 0"),
    (["--workers", "four"], "--workers must be an integer, got 'four'"),
    (["--local-steps", "-2"], "local_steps must be an integer >= 1, got -2"),
    (["--local-batch-size", "0"], "local_batch_size must be an integer >= 1, got 0"),
    (["--epochs", "0"], "epochs must be a number > 0, got 0.0"),
    (["--switch-epoch", "400"], "switch_epoch (t') must be an epoch in [0, epochs=300] or 'first-decay', got 400.0"),
    (["--switch-epoch", "soon"], "--switch-epoch must be a number, got 'soon'"),
    (["--model", "resnet18"], "model must be one of resnet8, resnet14, resnet20, resnet32, resnet56, densenet40, wrn28_10; got 'resnet18'"),
    (["--dataset", "imagenet"], "dataset must be one of cifar10, cifar100, mnist, fashion-mnist, text; got 'imagenet'"),
    (["--buffers", "sync"], "buffers must be one of local, average; got 'sync'"),
    (["--workers", "4", "--workers-per-block", "3", "--block-steps", "2"], "workers_per_block (K') = 3 must divide workers (K) = 4"),
    (["--workers-per-block", "4"], "workers_per_block (K') = 4 needs block_steps (H_b)"),
    (["--block-steps", "2", "--local-steps", "2"], "block_steps (H_b) = 2 needs workers_per_block (K') in the simulator"),
    (["--decay-at", "0.8,0.5"], "decay_at must be increasing, got [0.8, 0.5]"),
    (["--decay-at", "1.5"], "decay_at must be a list of fractions of training in (0, 1), got [1.5]"),
    (["--nesterov", "maybe"], "--nesterov must be true or false, got 'maybe'"),
    (["--preset", "paper", "--config", "missing.toml"], "config file 'missing.toml' does not exist"),
    (["--train-subset", "60000", "--data-dir", str(CIFAR10)], "train_subset = 60000 exceeds the 50000 train images"),
    (["--data-dir", "/nonexistent/cifar"], "/nonexistent/cifar"),
    (["--dataset", "cifar100", "--data-dir", str(CIFAR10)], "holds the cifar10 layout, not cifar100"),
    (["--epochs", "-1"], "epochs must be a number > 0, got -1.0"),
    (["--lr-per-64", "0"], "lr_per_64 must be a number > 0, got 0.0"),
    (["--peak-lr", "-0.1"], "peak_lr must be a number > 0, got -0.1"),
    (["--warmup-epochs", "-1"], "warmup_epochs must be a number >= 0, got -1.0"),
    (["--decay-factor", "0"], "decay_factor must be a number > 0, got 0.0"),
    (["--momentum", "-0.5"], "momentum must be a number >= 0, got -0.5"),
    (["--weight-decay", "nan"], "weight_decay must be a number >= 0, got nan"),
    (["--seed", "-3"], "seed must be an integer >= 0, got -3"),
    (["--eval-every", "0"], "eval_every must be an integer >= 1, got 0"),
    (["--checkpoint-every", "0"], "checkpoint_every must be an integer >= 1, got 0"),
    (["--timeout", "0"], "timeout must be a number > 0, got 0.0"),
    (["--threads", "0"], "threads must be an integer >= 1, got 0"),
    (["--test-subset", "0"], "test_subset must be an integer >= 1, got 0"),
    (["--optimizer-state", "keep"], "optimizer_state must be one of local, average, reset; got 'keep'"),
    (["--switch-epoch", "first-decay", "--decay-at", ""], "switch_epoch (t') is 'first-decay' but decay_at is empty"),
    (["--momentum", "0"], "nesterov needs momentum > 0, got momentum = 0 (nesterov is on by default: give --no-nesterov)"),
    (["--momentum", "0", "--nesterov"], "nesterov needs momentum > 0, got momentum = 0"),
    (["--ordered-averaging", "perhaps"], "--ordered-averaging must be true or false, got 'perhaps'"),
    (["--eval-local", "false"], "eval_local must be one of every, final, never; got 'false'"),
    (["--precision", "fp16"], "precision must be one of fp32, bf16; got 'fp16'"),
    (["--device", "tpu"], "device must be one of auto, cpu, cuda; got 'tpu'"),
    (["--resume", "maybe"], "--resume must be true or false, got 'maybe'"),
    (["--workers", "2", "--train-subset", "512", "--local-batch-size", "100000", "--data-dir", str(CIFAR10)],
     "local_batch_size (B_loc) = 100000 exceeds each worker's shard of 256 images (512 training images / workers (K) = 2)"),
    (["--data-dir", "/etc/hostname"], "/etc/hostname: directory not found"),
    (["--outer-optimizer", "adam"], "outer_optimizer must be one of none, diloco, slowmo; got 'adam'"),
    (["--outer-lr", "0.5"], "outer_lr = 0.5 needs an outer_optimizer (diloco or slowmo)"),
    (["--outer-optimizer", "diloco", "--local-steps", "1"], "outer_optimizer = diloco needs local steps: with local_steps (H) = 1 every step averages gradients"),
    (["--outer-optimizer", "diloco", "--local-steps", "4", "--outer-momentum", "1"], "outer_momentum must be a number < 1, got 1.0"),
    (["--outer-optimizer", "slowmo", "--local-steps", "4", "--outer-lr", "0"], "outer_lr must be a number > 0, got 0.0"),
    (["--compress", "int4"], "compress must be one of none, bf16, fp16, int8, sign; got 'int4'"),
    (["--compress", "int8", "--local-steps", "1"], "compress = int8 needs local steps: with local_steps (H) = 1"),
    (["--compress", "bf16", "--local-steps", "4", "--compress-block", "64"], "compress_block = 64 needs compress = int8 or sign"),
    (["--compress", "sign", "--local-steps", "4", "--compress-block", "4"], "compress_block must be an integer >= 8, got 4"),
    (["--overlap-steps", "4", "--local-steps", "4"], "overlap_steps (τ) = 4 must be less than the global period H·H_b = 4"),
    (["--overlap-steps", "1", "--local-steps", "4", "--buffers", "average"], "overlap_steps > 0 needs buffers='local' and optimizer_state='local'"),
    (["--overlap-steps", "-1"], "overlap_steps must be an integer >= 0, got -1"),
    (["--overlap-steps", "1"], "overlap_steps = 1 needs local steps"),
    # the text task's and the optimizers' settings: each belongs to its task or optimizer
    (["--dataset", "text", "--data-dir", str(SOTU)], "model must be one of gpt, lstm; got 'resnet20' (for dataset = text)"),
    (["--model", "gpt"], "model must be one of resnet8, resnet14, resnet20, resnet32, resnet56, densenet40, wrn28_10; got 'gpt'"),
    (["--seq-len", "64"], "seq_len = 64 is not used by dataset = cifar10"),
    (["--dropout", "0.1"], "dropout = 0.1 is not used by dataset = cifar10"),
    (["--dataset", "text", "--model", "gpt", "--train-subset", "10"], "train_subset = 10 is not used by dataset = text"),
    (["--dataset", "text", "--model", "lstm", "--heads", "2"], "heads = 2 is for model = gpt, not lstm"),
    (["--dataset", "text", "--model", "gpt", "--dropout", "1"], "dropout must be a number in [0, 1), got 1.0"),
    (["--dataset", "text", "--model", "gpt", "--width", "30"], "width = 30 must be a multiple of heads = 4 (model = gpt)"),
    (["--dataset", "text", "--model", "gpt", "--seq-len", "0"], "seq_len must be an integer >= 1, got 0"),
    (["--dataset", "text", "--model", "gpt"], "dataset = text needs data_dir: a folder of .txt files or one text file"),
    (["--dataset", "text", "--model", "gpt", "--data-dir", "/nonexistent/corpus"], "/nonexistent/corpus: no such file or folder"),
    (["--dataset", "text", "--model", "gpt", "--data-dir", str(SOTU), "--test-subset", "100000"], "test_subset = 100000 exceeds the 6047 validation windows"),
    (["--optimizer", "adam"], "optimizer must be one of sgd, adamw; got 'adam'"),
    (["--optimizer", "adamw"], "optimizer = adamw needs peak_lr: the linear-scaling rule (lr_per_64) is sgd's"),
    (["--optimizer", "adamw", "--peak-lr", "0.003", "--momentum", "0.5"], "momentum = 0.5 is sgd's; optimizer = adamw does not use it"),
    (["--optimizer", "adamw", "--peak-lr", "0.003", "--betas", "0.9"], "betas must be two numbers in [0, 1), got [0.9]"),
    (["--betas", "0.9,0.99"], "betas = [0.9, 0.99] needs optimizer = adamw"),
    (["--lr-schedule", "linear"], "lr_schedule must be one of step, cosine; got 'linear'"),
    (["--lr-schedule", "cosine", "--decay-at", "0.5"], "decay_at = [0.5] is for lr_schedule = step; cosine decays smoothly"),
    (["--lr-schedule", "cosine", "--switch-epoch", "first-decay"], "switch_epoch (t') = first-decay needs lr_schedule = step"),
    (["--max-grad-norm", "0"], "max_grad_norm must be a number > 0, got 0.0"),
    (["--row-steps", "0"], "row_steps must be an integer >= 1, got 0"),
]  # fmt: skip


@pytest.mark.parametrize("flags,message", BAD_CONFIGS, ids=[" ".join(f) for f, _ in BAD_CONFIGS])
def test_bad_config_is_one_line_before_training(
    flags: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if str(CIFAR10) in flags and not CIFAR10.is_dir():
        pytest.skip("needs CIFAR-10")
    if str(SOTU) in flags and not SOTU.is_dir():
        pytest.skip("needs the SOTU corpus")
    out = tmp_path / "run"
    assert main(["train", *flags, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("localsgd: error: ") and err.count("\n") == 1, err
    assert message in err
    assert not out.exists()  # nothing ran


# Validation by intent: a setting given on purpose (flag, file, preset, Config(...)) that the chosen
# task, model, optimizer, schedule or method does not read is an error whatever its value, even
# its default's. One row per class of unused setting.
ADAMW = ["--optimizer", "adamw", "--peak-lr", "0.003"]
TEXT = ["--dataset", "text", "--model", "gpt"]
UNUSED_SETTINGS = [
    ([*ADAMW, "--momentum", "0.9"], "momentum = 0.9 is sgd's; optimizer = adamw does not use it"),
    ([*ADAMW, "--nesterov"], "nesterov = True is sgd's; optimizer = adamw does not use it"),
    ([*ADAMW, "--lr-per-64", "0.1"], "lr_per_64 = 0.1 is sgd's; optimizer = adamw does not use it"),
    (["--peak-lr", "0.5", "--lr-schedule", "cosine", "--lr-per-64", "0.1"],
     "lr_per_64 = 0.1 is not used: peak_lr sets the peak LR, and the warm-up starts from lr_per_64 only"),
    (["--betas", "none"], "betas = None needs optimizer = adamw"),
    (["--lr-schedule", "cosine", "--decay-at", "0.5,0.75"], "decay_at = [0.5, 0.75] is for lr_schedule = step"),
    (["--decay-at", "", "--decay-factor", "0.1"], "decay_factor = 0.1 is not used: decay_at is empty (no LR decay)"),
    ([*TEXT, "--train-subset", "none"], "train_subset = None is not used by dataset = text"),
    ([*TEXT, "--channels-last"], "channels_last = True is not used by dataset = text"),
    ([*TEXT, "--buffers", "local"], "buffers = 'local' is not used by dataset = text"),
    (["--seq-len", "none"], "seq_len = None is not used by dataset = cifar10"),
    (["--width", "none"], "width = None is not used by dataset = cifar10"),
    (["--depth", "2"], "depth = 2 is not used by dataset = cifar10"),
    (["--heads", "4"], "heads = 4 is not used by dataset = cifar10"),
    (["--dropout", "0"], "dropout = 0.0 is not used by dataset = cifar10"),
    (["--dataset", "text", "--model", "lstm", "--heads", "none"], "heads = None is for model = gpt, not lstm"),
    (["--outer-lr", "none"], "outer_lr = None needs an outer_optimizer (diloco or slowmo)"),
    (["--outer-momentum", "0.9"], "outer_momentum = 0.9 needs an outer_optimizer (diloco or slowmo)"),
    (["--compress-block", "none"], "compress_block = None needs compress = int8 or sign"),
]  # fmt: skip


@pytest.mark.parametrize("flags,message", UNUSED_SETTINGS, ids=[" ".join(f) for f, _ in UNUSED_SETTINGS])
def test_a_setting_given_but_not_used_is_one_line_whatever_its_value(
    flags: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    assert main(["train", *flags, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("localsgd: error: ") and err.count("\n") == 1, err
    assert message in err
    assert not out.exists()


def test_given_settings_survive_every_path_to_train(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Which settings were given travels with the Config: from a TOML file (named in the error),
    from Config(...) in Python, through dataclasses.replace; it is not a setting (not in to_dict,
    so checkpoints compare as before); a study's method is named too."""
    import dataclasses

    from localsgd.harness import studies

    toml = tmp_path / "run.toml"
    toml.write_text("momentum = 0.9\n")
    assert main(["train", "--config", str(toml), *ADAMW, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert f"momentum = 0.9 is sgd's; optimizer = adamw does not use it (set by {toml})" in err
    cfg = Config(optimizer="adamw", peak_lr=3e-3, momentum=0.9)
    with pytest.raises(ConfigError, match=r"^momentum = 0.9 is sgd's; optimizer = adamw does not use it$"):
        cfg.validate()
    with pytest.raises(ConfigError, match=r"^momentum = 0.9 is sgd's"):
        dataclasses.replace(cfg, workers=4).validate()
    Config(optimizer="adamw", peak_lr=3e-3).validate()  # the defaults of sgd's settings, not given
    assert "given" not in cfg.to_dict() and cfg.to_dict() == Config(**cfg.to_dict()).to_dict()
    assert cfg == Config(optimizer="adamw", peak_lr=3e-3)  # given is not compared
    base = {"optimizer": "adamw", "peak_lr": 3e-3, "nesterov": True}
    named = studies.Study(base=base, methods={"m": {}}, seeds=(1,))
    with pytest.raises(ConfigError, match=r"nesterov = True is sgd's; .* \(set by study method 'm'\)$"):
        named.config("m", 1, None).validate()


def test_switching_a_presets_optimizer_drops_its_own_settings_with_one_line_each(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A preset's settings are given on purpose, for its optimizer, schedule and task. A user who
    switches one of those (a flag or file wins over the preset) gets the preset's settings that no
    longer apply dropped, one line each naming the preset; in Python, where nothing is dropped,
    validate() names the preset. No preset sets a setting it does not use."""
    from localsgd.harness.cli import parser, train_config

    for name in PRESETS:
        assert preset(name).unused() == {}, name
    args = parser().parse_args(["train", "--preset", "sotu-lstm", *ADAMW])
    cfg = train_config(args)
    lines = capsys.readouterr().err.splitlines()
    assert lines == [
        f"localsgd: preset 'sotu-lstm' sets {name} = {value!r}, which is sgd's; optimizer = adamw does not "
        "use it; ignored"
        for name, value in (("momentum", 0.0), ("nesterov", False), ("lr_per_64", 2.5 * 64 / 24))
    ]
    cfg.validate()
    assert (cfg.momentum, cfg.nesterov, cfg.lr_per_64) == (0.9, True, 0.1)  # the defaults, unused
    assert (cfg.seq_len, cfg.max_grad_norm, cfg.weight_decay) == (64, 0.4, 0.0)  # the rest is kept
    cfg = preset("sotu-lstm")
    cfg.optimizer, cfg.peak_lr = "adamw", 3e-3
    with pytest.raises(ConfigError, match=r"\(set by preset 'sotu-lstm'\)$"):
        cfg.validate()
    args = parser().parse_args(["train", "--preset", "sotu-lstm", *ADAMW, "--momentum", "0"])
    with pytest.raises(ConfigError, match=r"^momentum = 0.0 is sgd's"):
        train_config(args).validate()  # given again by the user: an error


def small_corpus(folder: Path, train_bytes: int, valid_bytes: int) -> Path:
    """Two documents: the first for training, the second (the last) for validation."""
    folder.mkdir()
    (folder / "a.txt").write_bytes(b"abcdefgh" * (train_bytes // 8))
    (folder / "b.txt").write_bytes(b"x" * valid_bytes)
    return folder


# Every size is bounded before the first step (one line: the value and what is allowed).
ONE_STEP_TEXT = ["--dataset", "text", "--workers", "1", "--local-batch-size", "1", "--epochs", "0.0001",
                 "--warmup-epochs", "0", "--test-subset", "1", "--no-progress", "--eval-local", "never"]  # fmt: skip
TOO_LARGE = [
    ([*ONE_STEP_TEXT, "--model", "gpt", "--seq-len", "1025", "--data-dir", "SOTU"],
     "seq_len = 1025 is longer than the gpt's position table allows: at most 1024 positions"),
    (["--dataset", "text", "--model", "lstm", "--seq-len", "5000", "--data-dir", "SOTU"],
     "seq_len = 5000 is too long for the training split: its 9987579 tokens in K·B_loc = 2048 columns allow "
     "at most seq_len = 4873"),
    ([*ONE_STEP_TEXT, "--model", "lstm", "--seq-len", "200", "--data-dir", "SMALL"],
     "seq_len = 200 is too long for the validation split: its 101 tokens allow at most seq_len = 100"),
    (["--dataset", "cifar100", "--data-dir", "CIFAR100", "--workers", "2", "--local-batch-size", "8", "--epochs", "1",
      "--warmup-epochs", "0", "--local-steps", "2", "--compress", "int8", "--compress-block", str(10**12)],
     "compress_block = 1000000000000 exceeds the 278,324 parameters of model = resnet20: a block holds at most"),
    (["--epochs", "3", "--warmup-epochs", "4"],
     "warmup_epochs = 4 exceeds epochs = 3: the LR would never reach its peak; give --warmup-epochs between 0 and 3"),
    (["--epochs", "2"], "warmup_epochs = 5 (the default) exceeds epochs = 2"),
]  # fmt: skip


@pytest.mark.parametrize("flags,message", TOO_LARGE, ids=[" ".join(f) for f, _ in TOO_LARGE])
def test_every_size_is_bounded_before_the_first_step(
    flags: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if "SOTU" in flags and not SOTU.is_dir():
        pytest.skip("needs the SOTU corpus")
    where = {"SOTU": str(SOTU), "SMALL": str(tmp_path / "small"), "CIFAR100": str(tmp_path / "cifar100")}
    if "SMALL" in flags:
        small_corpus(tmp_path / "small", 20_000, 100)
    if "CIFAR100" in flags:
        write_cifar100(tmp_path / "cifar100", n_train=64, n_test=32)
    out = tmp_path / "run"
    assert main(["train", *[where.get(f, f) for f in flags], "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("localsgd: error: ") and err.count("\n") == 1, err
    assert message in err
    assert not out.exists()


@needs_cifar10
def test_bf16_speed_mode_learns_like_fp32_or_is_refused_where_it_would_be_slow(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """precision = bf16 on hardware with native bf16: memorising 64 images for 30 epochs takes the
    training loss from ln 10 ~ 2.3 to within 0.3 of the fp32 run's (~0.9 here), and the model
    differs from fp32's in its bits (autocast really ran). Catches a bf16 path that does not learn
    or that silently runs fp32. Elsewhere it is a one-line error before any work, since the
    fallback kernels are several times slower than fp32."""
    from localsgd.harness.runtime import bf16_supported

    flags = [
        "--dataset", "cifar10", "--data-dir", str(CIFAR10), "--model", "resnet8", "--train-subset", "64",
        "--test-subset", "100", "--workers", "2", "--local-batch-size", "16", "--epochs", "30",
        "--local-steps", "2", "--switch-epoch", "1", "--warmup-epochs", "0", "--decay-at", "",
        "--peak-lr", "0.1", "--seed", "3", "--threads", "1", "--no-progress", "--eval-local", "never",
        "--eval-every", "30",
    ]  # fmt: skip
    code = main(["train", *flags, "--precision", "bf16", "--out", str(tmp_path / "bf16")])
    if not bf16_supported(torch.device("cpu")):
        assert code == 2 and not (tmp_path / "bf16").exists()
        assert "precision = bf16 needs native bfloat16" in capsys.readouterr().err
        return
    assert code == 0
    assert main(["train", *flags, "--out", str(tmp_path / "fp32")]) == 0
    loss = {
        r: json.loads((tmp_path / r / "summary.json").read_text())["final_train_loss"]
        for r in ("bf16", "fp32")
    }
    assert loss["bf16"] < 1.5 and abs(loss["bf16"] - loss["fp32"]) < 0.3, loss
    models = [torch.load(tmp_path / r / "model.pt", weights_only=True)["model"] for r in ("bf16", "fp32")]
    assert not all(torch.equal(models[0][k], models[1][k]) for k in models[0])


@pytest.mark.parametrize("where", ["below a file", "in /proc", "checkpoints is a file"])
def test_unwritable_run_directory_is_one_line_before_training(
    where: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An output directory that cannot be created or written: one line naming the path and the
    OS's reason, before any training step (no traceback, no model)."""
    data = write_cifar100(tmp_path / "data", n_train=64, n_test=32)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    out = {"below a file": blocker / "run", "in /proc": Path("/proc/localsgd-test/run")}.get(
        where, tmp_path / "run"
    )
    flags = ["--dataset", "cifar100", "--data-dir", str(data), "--workers", "2", "--local-batch-size", "8"]
    flags += ["--warmup-epochs", "0", "--epochs", "1", "--out", str(out)]  # the runs are 1 epoch long
    if where == "checkpoints is a file":  # a run to continue, whose checkpoints folder became a file
        assert main(["train", *flags, "--progress", "false"]) == 0
        (out / "summary.json").unlink()
        shutil.rmtree(out / "checkpoints")
        (out / "checkpoints").write_text("")
        flags.append("--resume")
        capsys.readouterr()
    model = (out / "model.pt").read_bytes() if (out / "model.pt").exists() else None
    assert main(["train", *flags]) == 2
    err = capsys.readouterr().err
    reason = {"below a file": "Not a directory", "checkpoints is a file": "File exists"}.get(where, "")
    said = re.fullmatch(
        rf"localsgd: error: cannot write the run directory {re.escape(str(out))}: ([A-Z].*)\n", err
    )
    assert said and reason in said[1], err
    assert (out / "model.pt").read_bytes() == model if model else not (out / "model.pt").exists()


def test_oserror_anywhere_is_one_line_with_path_and_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An OS error later in a run (here: writing metrics.jsonl fails as on a full disk) ends the
    command with one line naming the file and the OS's reason, not a traceback."""
    import errno
    import os

    from localsgd.harness.rundir import RunWriter

    def full_disk(writer: RunWriter, *args: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(writer.out / "metrics.jsonl"))

    monkeypatch.setattr(RunWriter, "append", full_disk)
    data = write_cifar100(tmp_path / "data", n_train=64, n_test=32)
    out = tmp_path / "run"
    flags = ["--dataset", "cifar100", "--data-dir", str(data), "--workers", "2", "--local-batch-size", "8"]
    flags += ["--warmup-epochs", "0"]  # the runs are 1 epoch long
    assert main(["train", *flags, "--epochs", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err  # the progress bar's lines, then the error on a line of its own
    assert err.endswith(f"\nlocalsgd: error: {out / 'metrics.jsonl'}: No space left on device\n"), err
    assert "Traceback" not in err and "step/s" in err


def test_boolean_settings_are_flags_that_also_take_values(tmp_path: Path) -> None:
    """--resume alone (also before another flag), --no-resume, --resume true|false and TOML booleans;
    the last one given wins; --help shows the flag form and the rule for K under torchrun."""
    from localsgd.harness.cli import parser, train_config

    def cfg(*argv: str) -> Config:
        return train_config(parser().parse_args(["train", *argv]))

    assert cfg().resume is False and cfg().progress is True
    assert cfg("--resume").resume is True
    assert (cfg("--resume", "--workers", "2").resume, cfg("--resume", "--workers", "2").workers) == (True, 2)
    assert cfg("--no-resume").resume is False
    assert cfg("--resume", "false").resume is False and cfg("--resume", "TRUE").resume is True
    assert cfg("--resume", "--no-resume").resume is False and cfg("--no-resume", "--resume").resume is True
    assert cfg("--no-progress").progress is False and cfg("--progress", "off").progress is False
    toml = tmp_path / "run.toml"
    toml.write_text("resume = true\nprogress = false\n")
    assert (cfg("--config", str(toml)).resume, cfg("--config", str(toml)).progress) == (True, False)
    assert cfg("--config", str(toml), "--no-resume").resume is False
    with pytest.raises(SystemExit):
        parser().parse_args(["train", "--no-resume", "true"])  # the negative form takes no value
    text = " ".join(parser()._subparsers._group_actions[0].choices["train"].format_help().split())  # type: ignore[union-attr]
    assert "--resume [true|false]" in text and "--no-resume" in text
    assert "K is the number of processes" in text


def test_train_help_shows_every_default_and_a_line_per_preset() -> None:
    """Each setting's help shows its default (from the dataclass; a None default says what none
    means, and the defaults derived in code agree with it); each preset has one line of what it
    is, the same line as in README's table."""
    from localsgd.compression import DEFAULT_BLOCK
    from localsgd.harness.cli import parser
    from localsgd.harness.config import DEFAULT_WORKERS, OUTER_DEFAULTS, PRESET_NOTES, SETTINGS, choices
    from localsgd.harness.language import SIZES

    train = parser()._subparsers._group_actions[0].choices["train"]  # type: ignore[union-attr]
    shown = [a for a in train._actions if a.dest in SETTINGS and a.help != "==SUPPRESS=="]
    helps = {a.dest: " ".join(a.help.split()) for a in shown}
    assert set(helps) == set(SETTINGS)
    assert [name for name, text in helps.items() if "default" not in text] == []
    assert "(default: 0.5,0.75)" in helps["decay_at"] and "(default: true)" in helps["nesterov"]
    assert "(default: 300)" in helps["epochs"] and "(default: none)" in helps["save_models_at"]
    assert f"(default {Config().text_seq_len()})" in helps["seq_len"]
    assert f"(default {DEFAULT_WORKERS})" in helps["workers"]
    assert f"(default {DEFAULT_BLOCK})" in helps["compress_block"]
    assert f"(default {optim.ADAMW_BETAS[0]}, {optim.ADAMW_BETAS[1]})" in helps["betas"]
    for key in ("width", "depth"):
        assert f"(default: gpt {SIZES['gpt'][key]}, lstm {SIZES['lstm'][key]})" in helps[key]
    assert f"(default {SIZES['gpt']['heads']})" in helps["heads"]
    assert ("none", *OUTER_DEFAULTS) == choices("outer_optimizer")
    lr, momentum = OUTER_DEFAULTS["diloco"], OUTER_DEFAULTS["slowmo"]
    assert f"diloco {lr[0]}, slowmo's alpha {momentum[0]}" in helps["outer_lr"]
    assert f"diloco {lr[1]}, slowmo's beta {momentum[1]}" in helps["outer_momentum"]
    text = train.format_help()
    assert list(PRESET_NOTES) == list(PRESETS)
    for name, note in PRESET_NOTES.items():
        assert re.search(rf"^  {re.escape(name)} +{re.escape(note)}$", text, re.M), name
    readme = (ROOT / "README.md").read_text()
    table = re.findall(r"^\| `([\w-]+)` \| (.*) \|$", readme, re.M)
    assert table == list(PRESET_NOTES.items())


def test_choices_and_flag_types_come_from_the_settings_types() -> None:
    """A choice setting's names are its Literal type's, the same lists the core and the data
    module check against; every setting's flag is parsed as its declared type."""
    from localsgd.compression import CODECS
    from localsgd.harness.config import CHOICES, SETTINGS, choices, kind, optional, parse_value
    from localsgd.harness.data import DATASETS
    from localsgd.policy import BUFFER_POLICIES, MERGE_RULES, OPTIMIZER_STATE_POLICIES

    assert choices("dataset") == (*DATASETS, "text") and choices("compress") == ("none", *CODECS)
    assert choices("buffers") == BUFFER_POLICIES and choices("optimizer_state") == OPTIMIZER_STATE_POLICIES
    assert choices("merge") == MERGE_RULES
    assert set(CHOICES) == {
        "dataset", "buffers", "optimizer_state", "outer_optimizer", "compress", "optimizer", "lr_schedule",
        "eval_local", "precision", "device", "merge",
    }  # fmt: skip
    for name in CHOICES:
        with pytest.raises(
            ConfigError, match=rf"^{name} must be one of {', '.join(choices(name))}; got 'x'$"
        ):
            Config(**{name: "x"}).validate()
    defaults = Config().to_dict()
    for name in SETTINGS:  # each default has its declared type, and its flag text parses back to it
        value = defaults[name]
        declared = (int, float) if kind(name) is float else kind(name)  # epochs: float = 300
        assert (value is None and optional(name)) or isinstance(value, declared), name
        if value is not None and not isinstance(value, list):
            text = str(value).lower() if isinstance(value, bool) else str(value)
            assert parse_value(name, text) == value and type(parse_value(name, text)) is kind(name), name
    assert parse_value("workers", "none") is None and parse_value("epochs", "3") == 3.0
    assert parse_value("decay_at", "0.5,0.8") == [0.5, 0.8] and parse_value("switch_epoch", "first-decay")
    with pytest.raises(ConfigError, match=r"^--epochs must be a number, got 'none'$"):
        parse_value("epochs", "none")  # not optional: none is not a value


def test_a_config_is_checked_once_until_a_setting_changes() -> None:
    """The CLI, a study and train() all validate the config they hold; a config that passed is
    not checked again, and any assignment makes it checked again."""
    calls = []
    real = Config._check

    def counted(self: Config) -> None:
        calls.append(1)
        real(self)

    with patch.object(Config, "_check", counted):
        cfg = Config(epochs=2, warmup_epochs=1)
        cfg.validate()
        cfg.validate()
        assert len(calls) == 1
        cfg.local_steps = 0
        with pytest.raises(ConfigError, match=r"^local_steps must be an integer >= 1, got 0$"):
            cfg.validate()
        cfg.local_steps = 4
        cfg.validate()
        assert len(calls) == 3


def test_workers_follow_torchrun_unless_set(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under torchrun K is the number of processes unless a flag, file or preset sets it; an explicit
    K that differs is a one-line error; outside torchrun the default is 16."""
    from localsgd.harness.runtime import resolve_workers

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert resolve_workers(Config()).workers == 16
    assert resolve_workers(preset("demo")).workers == 4
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert resolve_workers(Config()).workers == 2
    assert resolve_workers(Config(workers=2)).workers == 2
    with pytest.raises(
        ConfigError,
        match=r"^workers \(K\) = 4 but torchrun started 2 processes; start 4 processes or pass --workers 2",
    ):
        resolve_workers(preset("demo"))
    with pytest.raises(ConfigError, match=r"workers \(K\) = 16 but torchrun started 2"):
        resolve_workers(preset("paper"))  # the paper's protocol is K = 16
    monkeypatch.setenv("WORLD_SIZE", "1")  # one process: the simulator may hold any K
    assert resolve_workers(Config(workers=8)).workers == 8 and resolve_workers(Config()).workers == 1


def test_explicit_workers_that_differ_from_torchrun_is_one_line(tmp_path: Path) -> None:
    """Two real torchrun processes told --workers 3: the first to check stops with the one-line error
    before any work (torchrun then stops the other), no traceback through localsgd, no run directory."""
    out = tmp_path / "run"
    with pytest.raises(AssertionError) as failed:
        launch(
            2, ["-m", "localsgd", "train", "--workers", "3", "--data-dir", str(tmp_path), "--out", str(out)]
        )
    log = str(failed.value)
    assert "localsgd: error: workers (K) = 3 but torchrun started 2 processes; start 3 processes" in log, log
    assert "localsgd/" not in log and not out.exists()  # torchrun's own report names no file of ours


def test_cuda_device_without_cuda_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = tmp_path / "run"
    assert main(["train", "--device", "cuda", "--data-dir", str(tmp_path), "--out", str(out)]) == 2
    assert capsys.readouterr().err == (
        "localsgd: error: device = cuda but torch.cuda.is_available() is False; use device = cpu or auto\n"
    )
    assert not out.exists()


def test_unknown_toml_key_is_named(tmp_path: Path) -> None:
    toml = tmp_path / "bad.toml"
    toml.write_text("local_step = 4\n")
    with pytest.raises(ConfigError, match=r"unknown key 'local_step'; known keys: .*local_steps"):
        load_toml(toml)


@needs_cifar10
def test_simulator_and_torchrun_train_the_same_model(tmp_path: Path) -> None:
    """The same config and seed: `localsgd train --workers 4` and 4 torchrun processes (K taken from
    the number of processes: no --workers) end with the same model (max abs difference <= 1e-5; in
    fact bitwise equal) and the same metrics."""
    flags = [*TINY, "--progress", "false", "--eval-local", "every"]
    assert main(["train", *flags, "--out", str(tmp_path / "sim")]) == 0
    at = flags.index("--workers")
    without_k = flags[:at] + flags[at + 2 :]
    launch(4, ["-m", "localsgd", "train", *without_k, "--out", str(tmp_path / "dist")])
    assert json.loads((tmp_path / "dist/config.json").read_text())["config"]["workers"] == 4
    sim = torch.load(tmp_path / "sim/model.pt", weights_only=True)
    dist = torch.load(tmp_path / "dist/model.pt", weights_only=True)
    diff = max(
        (a.double() - b.double()).abs().max().item()
        for a, b in zip(sim["model"].values(), dist["model"].values(), strict=True)
    )
    assert diff <= 1e-5
    rows = [
        [json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        for run in ("sim", "dist")
    ]
    assert len(rows[0]) == len(rows[1]) == 2
    for a, b in zip(*rows, strict=True):
        assert (a["epoch"], a["step"], a["rounds"], a["bytes"]) == (
            b["epoch"],
            b["step"],
            b["rounds"],
            b["bytes"],
        )
        for key in (
            "lr",
            "train_loss",
            "train_acc",
            "test_loss",
            "test_acc",
            "local_test_loss",
            "local_test_acc",
        ):
            assert a[key] == pytest.approx(b[key], abs=1e-5), key
    assert rows[0][-1]["rounds"] == {"global": 4 + 2}  # 4 mini-batch steps, then H = 2 for 4 steps


OUTER_VARIANTS = {
    "diloco int8": ["--outer-optimizer", "diloco", "--compress", "int8"],
    "slowmo overlapped": ["--outer-optimizer", "slowmo", "--overlap-steps", "1", "--local-steps", "4"],
}


@needs_cifar10
@pytest.mark.parametrize("variant", list(OUTER_VARIANTS))
def test_outer_optimizer_through_the_cli_in_both_runtimes(tmp_path: Path, variant: str) -> None:
    """An outer optimizer after the mini-batch phase, with int8 compression or with each global
    average overlapped with the next local step: 2 torchrun processes end with the simulator's
    model, and the run differs from plain post-local SGD."""
    flags = [
        *TINY,
        "--workers",
        "2",
        "--progress",
        "false",
        "--eval-local",
        "never",
        *OUTER_VARIANTS[variant],
    ]
    assert main(["train", *flags, "--out", str(tmp_path / "sim")]) == 0
    plain = ["--outer-optimizer", "none", "--compress", "none", "--overlap-steps", "0"]
    assert main(["train", *flags, *plain, "--out", str(tmp_path / "plain")]) == 0
    launch(2, ["-m", "localsgd", "train", *flags, "--out", str(tmp_path / "dist")])
    sim, dist, plain = (
        torch.load(tmp_path / r / "model.pt", weights_only=True)["model"] for r in ("sim", "dist", "plain")
    )
    assert all(torch.equal(sim[k], dist[k]) for k in sim)
    assert not all(torch.equal(sim[k], plain[k]) for k in sim)


@needs_cifar10
def test_train_writes_the_run_directory_and_prints_a_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    assert main(["train", *TINY, "--workers", "2", "--out", str(out)]) == 0  # local steps in epoch 2
    printed = capsys.readouterr().out
    assert "test acc" in printed and "final test accuracy (averaged model)" in printed
    resolved = json.loads((out / "config.json").read_text())
    assert resolved["config"]["workers"] == 2 and resolved["derived"]["steps_per_epoch"] == 8
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    if head.returncode == 0:  # a git checkout (as in CI): the run names the code that made it
        assert re.fullmatch(re.escape(head.stdout.strip()) + r"(\+dirty)?", resolved["versions"]["commit"])
    ckpt = torch.load(out / "model.pt", weights_only=True)
    model = build_model("resnet20", 10)
    model.load_state_dict(ckpt["model"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"]["global"] == 8 + 4  # mini-batch epoch, then H = 2
    # The reported accuracy is the saved model's on the test subset, evaluated here by hand
    # (catches a summary of another model, e.g. a worker's own, or of an earlier epoch).
    from localsgd.harness.data import MEAN_STD, load_dataset
    from localsgd.harness.tasks import subset

    data = load_dataset("cifar10", CIFAR10)
    x, y = subset(data.test_x, data.test_y, 200, 3 + 1, "test")  # TINY: --test-subset 200, --seed 3
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in MEAN_STD["cifar10"])
    with torch.no_grad():
        correct = (model.eval()((x.float() / 255 - mean) / std).argmax(1) == y).sum().item()
    # (at most one image apart: batch size and memory format may round a near-tie differently)
    assert abs(summary["final_test_acc"] - correct / 200) <= 1 / 200


def test_cifar100_trains_from_the_same_code(tmp_path: Path) -> None:
    """CIFAR-100 in its official layout (a small fixture) goes through the same pipeline."""
    data = write_cifar100(tmp_path / "data", n_train=64, n_test=32)
    out = tmp_path / "run"
    flags = ["--dataset", "cifar100", "--data-dir", str(data), "--workers", "2", "--local-batch-size", "8"]
    flags += ["--warmup-epochs", "0"]  # the runs are 1 epoch long
    assert main(["train", *flags, "--epochs", "1", "--local-steps", "2", "--out", str(out)]) == 0
    assert torch.load(out / "model.pt", weights_only=True)["model"]["head.fc.weight"].shape[0] == 100


@needs_cifar10
def test_plot_compares_runs(tmp_path: Path) -> None:
    for h in ("1", "2"):
        flags = [*TINY, "--workers", "2", "--epochs", "1", "--local-steps", h, "--switch-epoch", "0"]
        flags += ["--eval-local", "never"]
        assert main(["train", *flags, "--out", str(tmp_path / f"h{h}"), "--progress", "false"]) == 0
    png = tmp_path / "cmp.png"
    drawn = {}
    real_save = plot.save

    def keep(fig, axes, legend_ax, out):  # what is on the axes, before they are closed
        drawn.update(
            {
                ax.get_ylabel() + " vs " + ax.get_xlabel(): [ln.get_xydata().tolist() for ln in ax.lines]
                for ax in axes.flat
            }
        )
        return real_save(fig, axes, legend_ax, out)

    with patch.object(plot, "save", keep):
        assert main(["plot", str(tmp_path / "h1"), str(tmp_path / "h2"), "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # every panel shows each run's own numbers from metrics.jsonl, in run order (catches a wrong
    # column, a wrong scale, or one run's data drawn for both)
    runs = [
        [json.loads(x) for x in (tmp_path / h / "metrics.jsonl").read_text().splitlines()]
        for h in ("h1", "h2")
    ]
    evals = [[r for r in rows if "test_acc" in r] for rows in runs]
    assert drawn["test accuracy (%) vs epoch"] == [
        [[r["epoch"], 100 * r["test_acc"]] for r in e] for e in evals
    ]
    assert drawn["test accuracy (%) vs global communication rounds"] == [
        [[r["rounds"].get("global", 0), 100 * r["test_acc"]] for r in e] for e in evals
    ]
    assert drawn["training loss vs epoch"] == [[[r["epoch"], r["train_loss"]] for r in rows] for rows in runs]
    assert drawn["learning rate vs epoch"] == [[[r["epoch"], r["lr"]] for r in rows] for rows in runs]
    rounds = [e[-1]["rounds"]["global"] for e in evals]
    assert rounds[1] == rounds[0] // 2 > 0  # H = 1 averages every step, H = 2 every second one


def fake_run(run: Path, text: bool = False) -> Path:
    """A finished run directory of two rows, written by hand (no training)."""
    run.mkdir(parents=True)
    split, metric = ("valid", "valid_bpb") if text else ("test", "test_acc")
    rows = [
        {"epoch": e, "step": e, "lr": 0.1, "train_loss": 2.0 / e, "train_acc": 0.1 * e, f"{split}_loss": 2.0,
         f"{split}_acc": 0.1 * e, metric: 3.0 / e, "tokens": 1000 * e, "rounds": {"global": e}}
        for e in (1, 2)
    ]  # fmt: skip
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = {"workers": 2, "local_steps": 1, "switch_epoch": None, "block_steps": None}
    config["dataset"] = "text" if text else "cifar10"
    (run / "config.json").write_text(json.dumps({"config": config, "derived": {"switch_step": 0}}))
    (run / "summary.json").write_text(json.dumps({"rounds": {"global": 2}, "bytes": {"global": 8}}))
    return run


# Every OS or parse error names its file: (file, how it is damaged, the command that reads it, message).
DAMAGED = [
    ("run.toml", b"epochs = 3\n# caf\xe9\n", "train", "is not UTF-8 text (byte 16: 0xe9); TOML files are UTF-8"),
    ("run/metrics.jsonl", b'{"epoch": 1}\n{"epoch": 2, "lr', "plot", "line 2 is not valid JSON (Unterminated string"),
    ("run/metrics.jsonl", b'{"epoch": 1}\n\xff\n', "plot", "not UTF-8 text (byte 13); the file is corrupt"),
    ("run/metrics.jsonl", b"[1, 2]\n", "plot", "line 1 is not a metrics row (a JSON object); corrupt"),
    ("run/config.json", b'{"config": {"workers": 2', "plot", "not valid JSON (Expecting ',' delimiter: line 1"),
    ("run/config.json", b'{"settings": {}}', "plot", "not a run's config.json (KeyError: 'config')"),
    ("study/mini-batch/seed-1/summary.json", b'{"rounds": ', "study", "not valid JSON (Expecting value: line 1"),
]  # fmt: skip


@pytest.mark.parametrize("name,data,command,message", DAMAGED, ids=[f"{n} {c}" for n, _, c, _ in DAMAGED])
def test_a_damaged_file_is_one_line_naming_it(
    name: str, data: bytes, command: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_run(tmp_path / "run")
    fake_run(tmp_path / "study" / "mini-batch" / "seed-1")
    path = tmp_path / name
    path.write_bytes(data)
    argv = {
        "train": ["train", "--config", str(path), "--out", str(tmp_path / "new")],
        "plot": ["plot", str(tmp_path / "run"), "--out", str(tmp_path / "runs.png")],
        "study": ["study", "smoke", "--summary", "--out", str(tmp_path / "study")],
    }[command]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(("localsgd: error: config file " + repr(str(path)), f"localsgd: error: {path}: "))
    assert err.count("\n") == 1 and message in err, err


def test_plot_of_image_and_text_runs_draws_each_kind_on_its_own_axes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Accuracy against epochs and bits per byte against tokens share no axis: each kind gets its
    own panels, every run drawn on its kind's; the kind is read from config.json (a config without
    a dataset is an error naming the file), never guessed from the rows' keys."""
    image, text = fake_run(tmp_path / "image"), fake_run(tmp_path / "text", text=True)
    other = fake_run(tmp_path / "image2")
    drawn: dict[str, list] = {}
    real_save = plot.save

    def keep(fig, axes, legend_ax, out):  # what is on the axes, before they are closed
        for ax in axes.flat:
            drawn[f"{ax.get_ylabel()} vs {ax.get_xlabel()}"] = [ln.get_xydata().tolist() for ln in ax.lines]
        return real_save(fig, axes, legend_ax, out)

    with patch.object(plot, "save", keep):
        assert main(["plot", str(image), str(text), str(other), "--out", str(tmp_path / "runs.png")]) == 0
    assert (tmp_path / "runs.png").read_bytes()[:4] == b"\x89PNG"
    assert drawn["test accuracy (%) vs epoch"] == [[[1, 300.0], [2, 150.0]]] * 2  # both image runs, in %
    assert drawn["validation bits per byte vs training tokens"] == [[[1000, 3.0], [2000, 1.5]]]
    assert drawn["training loss vs training tokens"] == [[[1000, 2.0], [2000, 1.0]]]
    assert len(drawn) == 8  # two kinds, four panels each
    config = json.loads((text / "config.json").read_text())
    del config["config"]["dataset"]
    (text / "config.json").write_text(json.dumps(config))
    assert main(["plot", str(text), "--out", str(tmp_path / "t.png")]) == 2
    assert capsys.readouterr().err.startswith(
        f"localsgd: error: {text / 'config.json'}: not a run's config.json"
    )


def test_plot_names_runs_of_the_same_folder_name_by_their_parent_too(tmp_path: Path) -> None:
    """seed-1 of two studies: the legend tells them apart."""
    a, b = fake_run(tmp_path / "a" / "seed-1"), fake_run(tmp_path / "b" / "seed-1")
    legends: list[str] = []
    real_save = plot.save

    def keep(fig, axes, legend_ax, out):
        legends.extend(t.get_text() for t in axes[0][0].get_legend().get_texts())
        return real_save(fig, axes, legend_ax, out)

    with patch.object(plot, "save", keep):
        assert main(["plot", str(a), str(b), "--out", str(tmp_path / "runs.png")]) == 0
    assert legends == ["a/seed-1: K=2, H=1", "b/seed-1: K=2, H=1"]


def test_tensorboard_without_the_package_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    try:
        import tensorboard  # noqa: F401

        pytest.skip("tensorboard is installed")
    except ImportError:
        pass
    out = tmp_path / "run"
    assert main(["train", "--tensorboard", "true", "--data-dir", str(tmp_path), "--out", str(out)]) == 2
    assert capsys.readouterr().err == (
        "localsgd: error: tensorboard = true needs the tensorboard package: pip install tensorboard\n"
    )
    assert not out.exists()


@needs_cifar10
def test_tensorboard_gets_every_metric_of_the_jsonl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With tensorboard = true, rank 0 logs every numeric metric of each metrics.jsonl row at its
    step into out/tensorboard and closes the writer (a stand-in SummaryWriter records the calls,
    so the path is tested whether or not the package is installed)."""
    import sys
    import types

    calls: list[tuple[str, float, int]] = []
    made: list[str] = []

    class Writer:
        def __init__(self, log_dir: str) -> None:
            made.append(log_dir)

        def add_scalar(self, key: str, value: float, step: int) -> None:
            calls.append((key, value, step))

        def close(self) -> None:
            made.append("closed")

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer))
    out = tmp_path / "run"
    flags = [*TINY, "--workers", "2", "--epochs", "1", "--tensorboard", "true", "--progress", "false"]
    assert main(["train", *flags, "--out", str(out)]) == 0
    assert made == [str(out / "tensorboard"), "closed"]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    expected = [
        (k, v, r["step"])
        for r in rows
        for k, v in r.items()
        if isinstance(v, float | int) and k not in ("epoch", "step")
    ]
    assert calls == expected and any(k == "test_acc" for k, _, _ in calls)


@needs_cifar10
def test_study_runs_pieces_skips_finished_ones_and_reproduces(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`localsgd study smoke`: every (method, seed) piece runs once; a second call skips them all;
    a study run from scratch elsewhere gives the same table."""
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["study", "smoke", "--out", str(a), "--data-dir", str(CIFAR10)]) == 0
    first = capsys.readouterr().out
    assert first.count("seed ") == 4 and "mini-batch" in first and "post-local H=4" in first
    model = a / "mini-batch" / "seed-1" / "model.pt"
    stamp = model.stat().st_mtime_ns
    assert main(["study", "smoke", "--out", str(a), "--data-dir", str(CIFAR10)]) == 0
    assert "seed " not in capsys.readouterr().out and model.stat().st_mtime_ns == stamp
    assert main(["study", "smoke", "--out", str(b), "--data-dir", str(CIFAR10)]) == 0
    rows = [json.loads((d / "study.json").read_text())["rows"] for d in (a, b)]
    for ra, rb in zip(*rows, strict=True):
        assert ra["final_test_acc"] == rb["final_test_acc"] and ra["global_rounds"] == rb["global_rounds"]
    post_local = rows[0][1]
    assert post_local["seeds_done"] == 2 and post_local["global_rounds"] == [8 + 2, 8 + 2]
    # counted in the local phase (after the first decay, epoch 1 of 2): 1/H of mini-batch SGD's rounds
    assert rows[0][0]["global_rounds_after_first_decay"] == [8, 8]
    assert post_local["global_rounds_after_first_decay"] == [2, 2]
    assert len(post_local["runs"]) == 2 and post_local["runs"][0]["seed"] == 1
    (paired,) = [
        c
        for c in json.loads((a / "study.json").read_text())["comparisons"]
        if c["metric"] == "final_test_acc"
    ]
    assert paired["method"] == "post-local H=4" and paired["baseline"] == "mini-batch"
    by_seed = [(r["runs"][0]["final_test_acc"], r["runs"][1]["final_test_acc"]) for r in rows[0]]
    assert paired["differences"] == [by_seed[1][0] - by_seed[0][0], by_seed[1][1] - by_seed[0][1]]
    exported = tmp_path / "exported"
    assert main(["study", "smoke", "--out", str(a), "--summary", "--plot", "--export", str(exported)]) == 0
    assert (a / "study.png").stat().st_size > 0 and "post-local H=4" in capsys.readouterr().out
    files = sorted(str(p.relative_to(exported)) for p in exported.rglob("*") if p.is_file())
    assert len(files) == 2 + 4 * 3 and "post-local_H4/seed-2/metrics.jsonl" in files  # no checkpoints
    # an unfinished run stays behind; the exported runs, copied into a new study directory, are finished
    partial, again = tmp_path / "partial", tmp_path / "again"
    shutil.copytree(a, partial)
    (partial / "post-local_H4" / "seed-2" / "summary.json").unlink()
    assert main(["study", "smoke", "--out", str(partial), "--summary", "--export", str(again)]) == 0
    assert not (again / "post-local_H4" / "seed-2").exists() and (again / "post-local_H4" / "seed-1").is_dir()
    capsys.readouterr()
    assert main(["study", "smoke", "--out", str(exported), "--data-dir", str(CIFAR10)]) == 0
    assert "seed " not in capsys.readouterr().out
    assert main(["study", "nope"]) == 2
    # one piece alone, as a user reproducing one row would run it: the same numbers
    c = tmp_path / "c"
    assert (
        main(
            [
                "study",
                "smoke",
                "--out",
                str(c),
                "--data-dir",
                str(CIFAR10),
                "--methods",
                "post-local H=4",
                "--seeds",
                "2",
            ]
        )
        == 0
    )
    assert [p.name for p in c.iterdir() if p.is_dir()] == ["post-local_H4"]
    alone = json.loads((c / "post-local_H4" / "seed-2" / "summary.json").read_text())
    assert alone["final_test_acc"] == post_local["runs"][1]["final_test_acc"]
    capsys.readouterr()
    # threads are run control: the finished piece is reused; a bad count is refused before any piece
    piece = ["study", "smoke", "--out", str(c), "--methods", "post-local H=4", "--seeds", "2"]
    assert main([*piece, "--threads", "1"]) == 0 and "seed " not in capsys.readouterr().out
    assert main(["study", "smoke", "--out", str(tmp_path / "d"), "--threads", "0"]) == 2
    assert "threads" in capsys.readouterr().err and not (tmp_path / "d").exists()
    assert main(["study", "smoke", "--out", str(c), "--methods", "post-local H=8"]) == 2
    assert (
        "study 'smoke' has no method 'post-local H=8'; methods: 'mini-batch', 'post-local H=4'"
        in capsys.readouterr().err
    )
    # a finished run is reused only if it was run with the piece's settings; a setting added since
    # (missing from its config.json) counts as its default
    config = a / "mini-batch" / "seed-2" / "config.json"
    saved = json.loads(config.read_text())
    del saved["config"]["precision"]
    config.write_text(json.dumps(saved))
    assert main(["study", "smoke", "--out", str(a), "--data-dir", str(CIFAR10)]) == 0
    saved["config"]["epochs"] = 3.0
    config.write_text(json.dumps(saved))
    capsys.readouterr()
    assert main(["study", "smoke", "--out", str(a), "--data-dir", str(CIFAR10)]) == 2
    err = capsys.readouterr().err
    assert "the finished run in" in err and "epochs = 3.0, but this run has epochs = 2" in err


def test_paired_comparison_confidence_interval() -> None:
    """Differences are paired by seed; the 95% interval uses Student's t with n - 1 degrees of freedom."""
    from localsgd.harness.stats import compare

    def row(method: str, accs: dict[int, float]) -> dict:
        return {"method": method, "runs": [{"seed": s, "final_test_acc": a} for s, a in accs.items()]}

    rows = [row("base", {1: 0.80, 2: 0.70, 3: 0.90}), row("new", {3: 0.921, 1: 0.82, 2: 0.719})]
    (c,) = compare(rows, "base", ("final_test_acc",))
    assert c["seeds"] == [1, 2, 3]
    assert c["differences"] == pytest.approx([0.02, 0.019, 0.021])  # seed by seed, not by position
    assert c["mean"] == pytest.approx(0.02) and c["std"] == pytest.approx(0.001)
    half = 4.303 * 0.001 / 3**0.5  # t(0.975, df=2)
    assert c["ci95"] == pytest.approx([0.02 - half, 0.02 + half]) and c["ci_excludes_zero"] is True
    rows[1]["runs"][0]["final_test_acc"] = 0.80  # seed 3 now -0.10: the interval spans zero
    assert compare(rows, "base", ("final_test_acc",))[0]["ci_excludes_zero"] is False
    assert (
        compare(rows, "missing", ("final_test_acc",)) == [] and compare(rows, None, ("final_test_acc",)) == []
    )
    # a method compared with another method than the baseline (a study's ``versus``)
    rows.append(row("newer", {1: 0.83, 2: 0.72, 3: 0.81}))
    by = {c["method"]: c for c in compare(rows, "base", ("final_test_acc",), {"newer": "new"})}
    assert by["newer"]["baseline"] == "new" and by["new"]["baseline"] == "base"
    assert by["newer"]["differences"] == pytest.approx([0.01, 0.001, 0.01])
    from localsgd.harness.report import comparison_table
    from localsgd.harness.tasks import measures_of

    table = comparison_table(list(by.values()), measures_of("cifar10"))
    assert "vs base (paired by seed)" in table and "newer vs new" in table  # the other baseline is named


HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")


def count_host_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record every Python-level read of a tensor's value to the host (on a GPU each one waits for
    the device to finish everything queued): the name of the method, per call."""
    reads: list[str] = []
    for name in HOST_READS:
        real = getattr(torch.Tensor, name)

        def read(self: torch.Tensor, *args: object, _real=real, _name=name) -> object:
            reads.append(_name)
            return _real(self, *args)

        monkeypatch.setattr(torch.Tensor, name, read)
    return reads


@pytest.mark.parametrize("local_steps", [1, 4])
def test_training_loop_reads_the_device_per_round_not_per_step_and_worker(
    local_steps: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Host reads in a whole `train()` run: the same for K = 2 and K = 4 workers, and per epoch at
    most one per averaging round plus a few per epoch (metrics, evaluation, checkpoint), where a
    `loss.item()` per worker and step would give 2 * K * 8 per epoch."""
    from localsgd.harness.train import train

    reads: dict[tuple[int, int], int] = {}
    for workers in (2, 4):
        data = write_cifar100(tmp_path / f"data{workers}", n_train=64 * workers, n_test=16)
        for epochs in (1, 3):
            cfg = Config(
                dataset="cifar100",
                data_dir=str(data),
                model="resnet8",
                workers=workers,
                local_batch_size=8,
                local_steps=local_steps,
                epochs=epochs,
                warmup_epochs=0,
                eval_local="never",
                progress=False,
            )  # fmt: skip  (8 steps per epoch)
            counted = count_host_reads(monkeypatch)
            result = train(cfg, tmp_path / f"run-{workers}-{epochs}")
            monkeypatch.undo()
            reads[workers, epochs] = len(counted)
            assert result.summary["steps"] == 8 * epochs
    assert reads[2, 1] == reads[4, 1] and reads[2, 3] == reads[4, 3], reads
    per_epoch = (reads[4, 3] - reads[4, 1]) / 2
    rounds_per_epoch = 8 // local_steps
    assert per_epoch <= rounds_per_epoch + 4, reads
