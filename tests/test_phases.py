"""Models kept along a run (``save_models_at``), their sharpness, and the phase-length study built on
them (``localsgd.harness.phases``)."""

from __future__ import annotations

import json
from pathlib import Path
from unittest.mock import patch

import pytest
import torch

from localsgd.harness import phases, sharpness, studies
from localsgd.harness.cli import main
from localsgd.harness.data import load_dataset, normalize
from tests.test_train import CIFAR10, needs_cifar10

# 256 images, K = 2, B_loc = 32: 4 steps per epoch; t' = the decay at epoch 1 of 4; H = 3, so the
# kept epochs' steps (8, 12) fall between averages and the averaged model differs from every worker's.
TINY = [
    "--dataset", "cifar10", "--data-dir", str(CIFAR10), "--model", "resnet8", "--train-subset", "256",
    "--test-subset", "200", "--workers", "2", "--local-batch-size", "32", "--epochs", "4",
    "--warmup-epochs", "0", "--decay-at", "0.25", "--local-steps", "3", "--switch-epoch", "first-decay",
    "--eval-local", "never", "--progress", "false", "--threads", "1", "--save-models-at", "2,3",
]  # fmt: skip


def independent_test_eval(model_file: Path) -> tuple[float, float]:
    """Loss and accuracy of a saved model on the run's 200 test images (drawn with the run's seed + 1),
    outside the training loop."""
    _, model = sharpness.load_run(model_file.parent.parent, model_file)
    data = load_dataset("cifar10", str(CIFAR10))
    idx = torch.randperm(len(data.test_x), generator=torch.Generator().manual_seed(6 + 1))[:200]
    x, y = data.test_x[idx], data.test_y[idx]  # the test subset of seed 6 (the default)
    return sharpness.loss_acc(model, [(normalize(x, data.mean, data.std), y)])


@needs_cifar10
def test_kept_models_are_the_averaged_models_the_rows_evaluated(tmp_path: Path, capsys) -> None:
    """models/epoch-E.pt is the averaged model whose test loss the row of epoch E shows (catches a
    worker's model, the final model or another epoch's kept instead); a row that evaluates nothing
    keeps the same average; `localsgd sharpness` measures each kept model, not the final one."""
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["train", *TINY, "--out", str(a)]) == 0
    assert main(["train", *TINY, "--eval-every", "3", "--out", str(b)]) == 0  # rows 1, 2 not evaluated
    rows = {r["epoch"]: r for r in map(json.loads, (a / "metrics.jsonl").read_text().splitlines())}
    for epoch in (2, 3):
        loss, acc = independent_test_eval(a / "models" / f"epoch-{epoch}.pt")
        assert loss == pytest.approx(rows[epoch]["test_loss"], rel=1e-5)
        assert acc == rows[epoch]["test_acc"]
    assert rows[2]["test_loss"] != pytest.approx(rows[3]["test_loss"], rel=1e-4)
    kept = [torch.load(r / "models" / "epoch-2.pt", weights_only=True)["model"] for r in (a, b)]
    assert kept[0].keys() == kept[1].keys()
    assert all(torch.equal(kept[0][k], kept[1][k]) for k in kept[0])
    assert sorted(p.name for p in (a / "models").iterdir()) == ["epoch-2.pt", "epoch-3.pt"]

    capsys.readouterr()
    assert main(["sharpness", str(a), "--samples", "64", "--max-iters", "200"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in printed] == [
        str(a / "models" / "epoch-2.pt"),
        str(a / "models" / "epoch-3.pt"),
        str(a / "model.pt"),
    ]
    cfg, _ = sharpness.load_run(a)
    probe = sharpness.train_probe(cfg, load_dataset("cifar10", str(CIFAR10)), 64, 0)
    found = []
    for model_file, out in (
        (a / "models" / "epoch-2.pt", a / "models" / "epoch-2.json"),
        (a / "models" / "epoch-3.pt", a / "models" / "epoch-3.json"),
        (a / "model.pt", a / "sharpness.json"),
    ):
        written = json.loads(out.read_text())
        _, model = sharpness.load_run(a, model_file)
        assert written["eigenvalue"] == pytest.approx(
            sharpness.top_eigenvalue(model, probe, 1e-3, 200, 0).eigenvalue, rel=1e-9
        )
        assert (written["train_loss"], written["train_acc"]) == pytest.approx(
            sharpness.loss_acc(model, probe), rel=1e-9
        )
        found.append(written["eigenvalue"])
    assert len(set(found)) == 3


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--save-models-at", "0"], "save_models_at must be a list of epochs in (0, epochs=4], got [0.0]"),
        (["--save-models-at", "5"], "save_models_at must be a list of epochs in (0, epochs=4], got [5.0]"),
        (["--save-models-at", "3,2"], "save_models_at must be strictly increasing, got [3.0, 2.0]"),
        (["--save-models-at", "2,2"], "save_models_at must be strictly increasing, got [2.0, 2.0]"),
        (["--save-models-at", "1.5"], "save_models_at: epoch 1.5 (step 6) does not end a metrics row; rows "
                                      "end every 4 steps (1 epochs) and at step 16"),
        (["--save-models-at", "1.5", "--row-steps", "2"], None),  # step 6 ends a row of 2 steps
    ],
)  # fmt: skip
def test_kept_epochs_are_checked_before_any_work(
    tmp_path: Path, capsys, flags: list[str], message: str | None
) -> None:
    if not CIFAR10.is_dir():
        pytest.skip("needs CIFAR-10")
    out = tmp_path / "run"
    tiny = [f for f in TINY if f != "--save-models-at" and f != "2,3"]
    code = main(["train", *tiny, *flags, "--out", str(out)])
    if message is None:
        assert code == 0 and (out / "models" / "epoch-1.5.pt").is_file()
        return
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("localsgd: error: ") and err.count("\n") == 1 and message in err
    assert not out.exists()


def fake_run(
    run: Path, seed: int, test_acc: dict[int, float], measured: dict[int, tuple[float, float]]
) -> None:
    """A finished run of 4 epochs with t' at epoch 1 and models kept at epochs 2 and 3:
    ``measured[epoch] = (clean train accuracy, eigenvalue)`` (epoch 4: the final model)."""
    (run / "models").mkdir(parents=True)
    config = {"config": {"epochs": 4, "decay_at": [0.25], "save_models_at": [2, 3], "seed": seed}}
    (run / "config.json").write_text(json.dumps(config))
    (run / "metrics.jsonl").write_text(
        "".join(json.dumps({"epoch": e, "test_acc": a}) + "\n" for e, a in test_acc.items())
    )
    (run / "summary.json").write_text("{}")
    for epoch, (train_acc, eig) in measured.items():
        out = run / "sharpness.json" if epoch == 4 else run / "models" / f"epoch-{epoch}.json"
        out.write_text(json.dumps({"train_acc": train_acc, "train_loss": 1 - train_acc, "eigenvalue": eig}))


def test_phase_table_pairs_seeds_at_each_phase_length(tmp_path: Path, capsys) -> None:
    """Phase lengths count from t' (epoch 1); each phase reads the row and the measurement of its own
    epoch, and the windowed test accuracy the rows of the last 2 epochs up to it (catches a window one
    row too wide or too narrow); differences are paired by seed with Student's t interval (values
    worked out by hand)."""
    tiny = studies.Study(
        base={"save_models_at": [2, 3]},
        methods={"base": {}, "new": {}, "unrun": {}},
        seeds=(1, 2, 3),
        baseline="base",
    )
    accs = {1: 0.50, 2: 0.60, 3: 0.70, 4: 0.80}
    for seed, shift in ((1, 0.00), (2, 0.01), (3, -0.01)):  # the baseline differs by seed
        base = {e: a + shift for e, a in accs.items()}
        fake_run(
            studies.run_dir(tmp_path, "base", seed),
            seed,
            base,
            {2: (0.9, 10.0), 3: (0.9, 12.0), 4: (0.9, 14.0)},
        )
        # "new" is 0.02 better at epoch 3 on seeds 1, 2 and 0.05 on seed 3; elsewhere equal
        new = {**base, 3: base[3] + (0.05 if seed == 3 else 0.02)}
        fake_run(
            studies.run_dir(tmp_path, "new", seed),
            seed,
            new,
            {2: (0.8, 7.0), 3: (0.8, 8.0), 4: (0.8, 9.0 + seed)},
        )
    (studies.run_dir(tmp_path, "new", 3) / "models" / "epoch-2.json").unlink()  # not measured yet: left out
    with patch.dict(studies.STUDIES, {"tiny": tiny}):
        rows = phases.phase_rows("tiny", tmp_path, window=2)
    assert [(p["phase"], p["epoch"]) for p in rows] == [(1, 2), (2, 3), (3, 4)]
    one, two, three = rows
    assert [r["seeds_done"] for r in one["methods"]] == [3, 2, 0]
    (test2,) = [c for c in two["comparisons"] if c["metric"] == "test_acc"]
    assert test2["seeds"] == [1, 2, 3] and test2["differences"] == pytest.approx([0.02, 0.02, 0.05])
    mean, std = 0.03, (2 * 0.01**2 + 0.02**2) ** 0.5 / 2**0.5  # sample std of 0.02, 0.02, 0.05
    half = 4.303 * std / 3**0.5
    assert test2["mean"] == pytest.approx(mean) and test2["ci95"] == pytest.approx([mean - half, mean + half])
    (eig3,) = [c for c in three["comparisons"] if c["metric"] == "eigenvalue"]
    assert eig3["differences"] == pytest.approx([-4.0, -3.0, -2.0])
    (test1,) = [c for c in one["comparisons"] if c["metric"] == "test_acc"]
    assert test1["seeds"] == [1, 2] and test1["differences"] == pytest.approx([0.0, 0.0])
    # windowed over epochs (E - 2, E]: seed s's 0.02/0.02/0.05 at epoch 3 is half that at epochs 3 and 4
    for point in (two, three):
        (window,) = [c for c in point["comparisons"] if c["metric"] == "test_acc_window"]
        assert window["differences"] == pytest.approx([0.01, 0.01, 0.025])
    (window1,) = [c for c in one["comparisons"] if c["metric"] == "test_acc_window"]
    assert window1["differences"] == pytest.approx([0.0, 0.0])
    assert two["methods"][0]["test_acc_window"][0] == pytest.approx(0.65)  # (0.60 + 0.70) / 2, seeds 0, ±0.01
    new3 = three["methods"][1]
    assert new3["train_acc"] == pytest.approx((0.8, 0.0)) and new3["test_acc"][0] == pytest.approx(0.80)
    written = json.loads((tmp_path / "phases.json").read_text())["phases"]
    assert written[1]["epoch"] == 3 and [p["window"] for p in written] == [2, 2, 2]
    table = phases.phase_table(rows)
    assert "+3.00 [" in table and "-3.0 [" in table and "+1.50 [" in table and "last 2 ep." in table

    drawn = {}
    real_save = phases.save

    def keep(fig, axes, legend_ax, out):  # what the panels draw, before they are closed
        drawn.update(
            {ax.get_ylabel(): [c.get_offsets().tolist() for c in ax.collections] for ax in axes.flat}
        )
        drawn["titles"] = " ".join(ax.get_title() for ax in axes.flat)
        drawn["labels"] = [label for ax in axes.flat for label in ax.get_legend_handles_labels()[1]]
        drawn["lines"] = {ax.get_ylabel(): [ln.get_xydata().tolist() for ln in ax.lines] for ax in axes.flat}
        return real_save(fig, axes, legend_ax, out)

    with patch.object(phases, "save", keep):
        assert phases.plot_phases(rows, tmp_path / "phases.png").stat().st_size > 0

    def has_line(panel: str, points: list[tuple[float, float]]) -> bool:
        flat = [v for pt in points for v in pt]
        return any([v for pt in line for v in pt] == pytest.approx(flat) for line in drawn["lines"][panel])

    assert "unrun" not in " ".join(drawn["labels"]) and "new" in drawn["labels"]  # no runs: not drawn
    assert "last 2 epochs" in drawn["titles"] and "last 4" not in drawn["titles"]  # the window used
    assert has_line("points", [(1.4, 0.0), (2.4, 100 * mean), (3.4, 0.0)])  # mean paired differences
    seeds_at_two = [pt for group in drawn["points"] for pt in group if pt[0] == 2]
    assert sorted(pt[1] for pt in seeds_at_two) == pytest.approx([2.0, 2.0, 5.0])
    assert has_line("points", [(2.2, 0.0), (3.2, 1.5), (4.2, 1.5)])  # windowed: shifted, its own means
    window_seeds = [pt for group in drawn["points"] for pt in group if pt[0] == pytest.approx(2.8)]
    assert sorted(pt[1] for pt in window_seeds) == pytest.approx([1.0, 1.0, 2.5])
    assert has_line("test accuracy (%)", [(1, 55.0), (2, 65.0), (3, 75.0)])  # baseline, last 2 epochs
    assert has_line("top Hessian eigenvalue", [(1, 10.0), (2, 12.0), (3, 14.0)])
    assert has_line("training accuracy (%)", [(1, 80.0), (2, 80.0), (3, 80.0)])
