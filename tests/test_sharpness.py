"""Flatness: the Hessian power iteration against an exact Hessian, BN re-estimation, interpolation,
and the ``sharpness`` / ``interpolate`` commands on real run directories."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.func import functional_call

from localsgd.harness.cli import main
from localsgd.harness.sharpness import interpolate, reestimate_bn, top_eigenvalue
from tests.test_train import CIFAR10, needs_cifar10


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)).double()


def batches(n: int = 3, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(20, 5, generator=g).double(), torch.randint(0, 3, (20,), generator=g)) for _ in range(n)
    ]


def exact_hessian_eigenvalues(model: nn.Module, data) -> torch.Tensor:
    model.eval()
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    x = torch.cat([b[0] for b in data])
    y = torch.cat([b[1] for b in data])

    def loss(flat: torch.Tensor) -> torch.Tensor:
        params, i = {}, 0
        for name, shape in zip(names, shapes, strict=True):
            params[name] = flat[i : i + shape.numel()].reshape(shape)
            i += shape.numel()
        return nn.functional.cross_entropy(functional_call(model, params, (x,)), y)

    return torch.linalg.eigvalsh(torch.autograd.functional.hessian(loss, flat0))


def test_power_iteration_finds_the_exact_top_eigenvalue() -> None:
    """Against the full Hessian (autograd, 87 parameters): the largest-magnitude eigenvalue, over
    several batches of the mean loss, BN in eval mode."""
    model, data = small_net(), batches()
    with torch.no_grad():  # non-trivial running statistics, so eval-mode BN matters
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
    eigs = exact_hessian_eigenvalues(model, data)
    expected = eigs[eigs.abs().argmax()].item()
    got = top_eigenvalue(model, data, tol=1e-10, max_iters=2000, seed=3)
    assert got.converged and got.samples == 60
    assert got.eigenvalue == pytest.approx(expected, rel=1e-6)
    assert not model.training  # evaluated in eval mode


def test_power_iteration_reports_non_convergence() -> None:
    got = top_eigenvalue(small_net(), batches(), tol=1e-12, max_iters=2, seed=0)
    assert (got.iterations, got.converged) == (2, False)


def test_bn_reestimation_is_the_exact_mean_over_the_batches() -> None:
    model, data = small_net(), batches(4)
    reestimate_bn(model, data)
    with torch.no_grad():
        hidden = [model[0](x) for x, _ in data]
    expected_mean = torch.stack([h.mean(0) for h in hidden]).mean(0)
    expected_var = torch.stack([h.var(0, unbiased=True) for h in hidden]).mean(0)
    torch.testing.assert_close(model[1].running_mean, expected_mean)
    torch.testing.assert_close(model[1].running_var, expected_var)
    assert model[1].momentum == 0.1  # restored


def by_hand(a: nn.Module, b: nn.Module, alpha: float, bn_data, data) -> tuple[float, float]:
    """Mean loss and accuracy of the net (1 - alpha) A + alpha B on ``data``, written out: each
    weight mixed by its formula, the BN statistics the mean over ``bn_data``'s batches of each
    batch's mean and unbiased variance of the first layer's output, the forward pass by hand."""
    mixed = {
        name: (1 - alpha) * pa + alpha * pb
        for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True)
        if not name.startswith("1.running") and not name.endswith("num_batches_tracked")
    }

    def first(x: torch.Tensor) -> torch.Tensor:
        return x @ mixed["0.weight"].T + mixed["0.bias"]

    mean = torch.stack([first(x).mean(0) for x, _ in bn_data]).mean(0)
    var = torch.stack([first(x).var(0, unbiased=True) for x, _ in bn_data]).mean(0)
    x = torch.cat([x for x, _ in data])
    y = torch.cat([y for _, y in data])
    hidden = (first(x) - mean) / torch.sqrt(var + 1e-5) * mixed["1.weight"] + mixed["1.bias"]
    logits = torch.tanh(hidden) @ mixed["3.weight"].T + mixed["3.bias"]
    loss = -logits.log_softmax(1)[torch.arange(len(y)), y].mean()
    return loss.item(), (logits.argmax(1) == y).double().mean().item()


def test_interpolation_against_the_net_written_out() -> None:
    """Each point is the mixed weights with BN statistics re-estimated on the BN batches (catches an
    interpolation that ignores alpha or mixes the other way, statistics carried over from A or
    mixed instead of re-estimated, and train and test swapped); alpha = 1.5 extrapolates."""
    a, data = small_net(), batches()
    torch.manual_seed(5)
    b = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)).double()
    with torch.no_grad():  # A's statistics far from any re-estimate: carrying them over shows
        a[1].running_mean.fill_(3.0)
    train, test, bn = data[:2], data[2:], batches(2, seed=7)
    alphas = [0.0, 0.25, 0.5, 1.0, 1.5]
    rows = interpolate(a, b, alphas, train, test, bn=bn)
    for alpha, row in zip(alphas, rows, strict=True):
        assert row["alpha"] == alpha
        assert (row["train_loss"], row["train_acc"]) == pytest.approx(
            by_hand(a, b, alpha, bn, train), rel=1e-9
        )
        assert (row["test_loss"], row["test_acc"]) == pytest.approx(by_hand(a, b, alpha, bn, test), rel=1e-9)
    assert len({round(r["train_loss"], 6) for r in rows}) == len(rows)  # the points differ
    assert a[1].running_mean.eq(3.0).all()  # the endpoints are left as they were


@needs_cifar10
def test_sharpness_and_interpolate_commands_on_run_directories(tmp_path: Path, capsys) -> None:
    tiny = [
        "--dataset", "cifar10", "--data-dir", str(CIFAR10), "--model", "resnet8", "--train-subset", "256",
        "--test-subset", "100", "--workers", "2", "--local-batch-size", "32", "--epochs", "1",
        "--warmup-epochs", "0", "--progress", "false",
    ]  # fmt: skip
    for seed in (1, 2):
        assert main(["train", *tiny, "--seed", str(seed), "--out", str(tmp_path / f"r{seed}")]) == 0
    assert main(["sharpness", str(tmp_path / "r1"), "--samples", "64", "--max-iters", "200"]) == 0
    out = capsys.readouterr().out
    result = json.loads((tmp_path / "r1" / "sharpness.json").read_text())
    assert result["converged"] and result["eigenvalue"] > 0 and result["samples"] == 64
    assert f"{result['eigenvalue']:.4g}" in out

    stem = tmp_path / "line"
    assert main(["interpolate", str(tmp_path / "r1"), str(tmp_path / "r2"), "--alphas", "0:1:3",
                 "--samples", "64", "--out", str(stem)]) == 0  # fmt: skip
    record = json.loads(stem.with_suffix(".json").read_text())
    assert [p["alpha"] for p in record["points"]] == [0.0, 0.5, 1.0]
    assert stem.with_suffix(".png").stat().st_size > 0


@pytest.mark.parametrize(
    "argv, message",
    [
        (["sharpness", "{tmp}"], "has no model.pt"),
        (["interpolate", "{tmp}", "{tmp}", "--alphas", "1:0:3"], "--alphas needs START < STOP"),
        (["interpolate", "{tmp}", "{tmp}", "--alphas", "0-1"], "--alphas must be START:STOP:POINTS"),
        (["sharpness", "{tmp}", "--tol", "0"], "tol must be > 0, got 0.0"),
        (["sharpness", "{tmp}", "--tol", "nan"], "tol must be > 0, got nan"),
        (["sharpness", "{bad}"], "cannot load"),
    ],
)
def test_bad_sharpness_input_is_one_line(tmp_path: Path, capsys, argv: list[str], message: str) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.pt").write_bytes(b"not a checkpoint")
    argv = [a.replace("{tmp}", str(tmp_path)).replace("{bad}", str(bad)) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
