"""Sharded workers (FSDP2): K = 2 groups of S = 2 ranks (4 gloo processes) against K = 2 unsharded
workers (2 processes) each taking the union of its group's micro-batches.

Tolerance: the two runs compute the same function in a different reduction order (FSDP reduce-
scatters the mean of two micro-batch gradients; the twin takes one backward over their union, and
its averages sum whole buffers rather than shards), so they differ by float32 rounding, a few ulps
of parameters of size ~0.4 (ulp 3e-8) per step, compounded over 12-17 steps: measured 3e-8 to 6e-8
(2-vCPU Xeon, AVX-512). TOL = 1e-6 leaves 15x room for other CPUs' kernels and is 7000x below what
leaving the cross-group gradient all-reduce on in local steps does (7.5e-3).
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch

from tests.helpers import HERE, launch
from tests.sharded_worker import CONFIGS as CONFIGS_OF_WORKER
from tests.test_language_task import LM, needs_sotu
from tests.test_resume import same_run

TOL = 1e-6
CONFIGS = (
    "local", "post_local", "state_average", "state_reset", "diloco", "diloco_int8", "diloco_overlap",
    "diloco_fragments",
)  # fmt: skip


def run(tmp: Path, nproc: int, shards: int, configs: str, mutation: str | None = None) -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    launch(
        nproc,
        [str(HERE / "sharded_worker.py"), configs, str(tmp), str(shards), *([mutation] if mutation else [])],
    )
    return tmp


@pytest.fixture(scope="module")
def both(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The sharded runs (4 processes, S = 2) and the unsharded twins (2 processes), all configs."""
    base = tmp_path_factory.mktemp("sharding")
    return run(base / "sharded", 4, 2, ",".join(CONFIGS)), run(base / "twin", 2, 1, ",".join(CONFIGS))


def load(folder: Path, ranks: int) -> list[dict]:
    return [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(ranks)]


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.parametrize(
    "config",
    ["local", "post_local", "state_average", "state_reset", "diloco", "diloco_overlap", "diloco_fragments"],
)
def test_sharded_workers_equal_unsharded_twins(both: tuple[Path, Path], config: str) -> None:
    sharded, twin = (load(both[0] / config, 4), load(both[1] / config, 2))
    for rank in range(4):
        worker = rank // 2
        assert max_diff(sharded[rank]["params"], twin[worker]["params"]) < TOL, (config, rank)
    # the ranks of a group hold one model; rounds as the twin's, each rank sending its shards only
    assert max_diff(sharded[0]["params"], sharded[1]["params"]) == 0.0
    assert sharded[0]["stats"]["global"]["rounds"] == twin[0]["stats"]["global"]["rounds"] >= 3
    # every round (gradients; parameters and, by policy, optimizer state) sends this rank's shards:
    # the group's two ranks together send what one unsharded worker sends, and hold its model
    # (the twin's gradient averages also carry a float32 flag per parameter, "had a gradient")
    sent = [s["stats"]["global"]["bytes"] for s in sharded[:2]]
    flags = 4 * len(twin[0]["params"]) * CONFIGS_OF_WORKER[config][0].switch_step
    assert sum(sent) == twin[0]["stats"]["global"]["bytes"] - flags and min(sent) > 0
    assert sum(s["held"]["parameters"] for s in sharded[:2]) == twin[0]["held"]["parameters"]


def test_int8_compressed_diloco_differs_only_by_quantization(both: tuple[Path, Path]) -> None:
    """int8 blocks are cut from each rank's shards, not from the whole model, so the sharded run
    quantizes differently: it must stay as close to the twin as the twin's int8 run is to its
    exact run (the quantization noise itself), and send the shards' int8 bytes."""
    sharded, twin = load(both[0] / "diloco_int8", 4), load(both[1] / "diloco_int8", 2)
    exact = load(both[1] / "diloco", 2)
    noise = max_diff(twin[0]["params"], exact[0]["params"])
    assert 1e-5 < noise < 1e-2
    for rank in range(4):
        assert max_diff(sharded[rank]["params"], twin[rank // 2]["params"]) < 2 * noise
    assert max_diff(sharded[0]["params"], sharded[2]["params"]) == 0.0  # all workers on one anchor
    exact_bytes = load(both[0] / "diloco", 4)[0]["stats"]["global"]["bytes"]
    assert sharded[0]["stats"]["global"]["bytes"] < exact_bytes / 2


def test_each_rank_holds_its_shards_of_the_outer_state(both: tuple[Path, Path]) -> None:
    sharded, twin = load(both[0] / "diloco", 4), load(both[1] / "diloco", 2)
    for kind in ("parameters", "inner", "outer"):
        assert sharded[0]["held"][kind] + sharded[1]["held"][kind] == twin[0]["held"][kind], kind
        assert sharded[0]["held"][kind] < twin[0]["held"][kind]


@pytest.mark.parametrize(
    ("mutation", "config"), [("all_reduce_always", "local"), ("all_reduce_never", "post_local")]
)
def test_the_comparison_catches_a_wrong_gradient_all_reduce(
    both: tuple[Path, Path], tmp_path: Path, mutation: str, config: str
) -> None:
    mutated = load(run(tmp_path, 4, 2, config, mutation) / config, 4)
    twin = load(both[1] / config, 2)
    assert max_diff(mutated[0]["params"], twin[0]["params"]) > 100 * TOL


EXPECTED_ERRORS = {
    "no_mesh": "pass mesh=",
    "not_sharded": "the model is not sharded",
    "mesh_1d": "mesh must be 2-D with mesh_dim_names=('replicate', 'shard')",
    "mesh_names": "got 2-D with names ('dp', 'fsdp')",
    "hsdp": "sharded over a 2-D mesh (FSDP's HSDP)",
    "root_plain": "parameter '1.weight' is not sharded",
    "mesh_and_comm": "pass mesh= alone",
    "hierarchical": "hierarchical schedules are not supported with sharded",
    "buffers": "buffers='average' is not supported with sharded models",
    "compression_state": "compression of sharded models needs optimizer_state='local'",
    "averaged_model": "averaged_model() of a sharded model needs into=",
    "simulator": "sharded (fully_shard) models need torch.distributed",
}


def test_bad_inputs_get_one_clear_error_on_every_rank(tmp_path: Path) -> None:
    launch(2, [str(HERE / "sharded_worker.py"), "bad_inputs", str(tmp_path)])
    seen = [json.loads((tmp_path / f"errors{r}.json").read_text()) for r in range(2)]
    assert seen[0] == seen[1]
    assert seen[0].keys() == EXPECTED_ERRORS.keys()
    for case, expected in EXPECTED_ERRORS.items():
        assert seen[0][case] is not None and expected in seen[0][case], (case, seen[0][case])
        assert "\n" not in seen[0][case]


def resume(out: Path, config: str, save_at: int) -> None:
    """Train with S = 2, writing a DCP checkpoint after step ``save_at``; then load it with S = 2
    and with S = 1 (unsharded workers) and train on."""
    worker = [str(HERE / "sharded_worker.py"), "resume", config, str(out)]
    launch(4, [*worker, "2", "save", str(save_at)])
    launch(4, [*worker, "2", "load", str(save_at)])


def test_resume_from_dcp_is_bit_for_bit_with_an_average_in_flight_and_reshards(tmp_path: Path) -> None:
    """DiLoCo with τ = 1, saved after step 4: the average started after step 3 is in flight."""
    resume(tmp_path, "diloco_overlap", save_at=4)
    launch(2, [str(HERE / "sharded_worker.py"), "resume", "diloco_overlap", str(tmp_path), "1", "load", "4"])
    for rank in range(4):
        full, resumed = load(tmp_path / "full", 4)[rank], load(tmp_path / "resumed-S2", 4)[rank]
        assert max_diff(full["params"], resumed["params"]) == 0.0, rank
        counts = [
            {k: v for k, v in s["global"].items() if k != "seconds"}
            for s in (full["stats"], resumed["stats"])
        ]
        assert counts[0] == counts[1]
    saved = [torch.load(tmp_path / f"saved-rank{r}.pt", weights_only=False) for r in range(4)]
    assert max_diff(saved[0]["params"], saved[2]["params"]) > 1e-3  # the two workers' models differ
    for worker in range(2):  # S = 2 -> 1: each worker's own model, anchor and step
        loaded = torch.load(tmp_path / f"loaded-S1-rank{worker}.pt", weights_only=False)
        assert max_diff(loaded["params"], saved[2 * worker]["params"]) == 0.0
        assert loaded["t"] == 4
        resumed = load(tmp_path / "resumed-S1", 2)[worker]
        assert max_diff(resumed["params"], load(tmp_path / "full", 4)[2 * worker]["params"]) < TOL
    anchors = [torch.load(tmp_path / f"loaded-S{s}-rank0.pt", weights_only=False)["anchor"] for s in (1, 2)]
    full_anchor = torch.cat([a.flatten() for a in anchors[0]])
    shard_anchor = torch.cat([a.flatten() for a in anchors[1]])
    assert shard_anchor.numel() < full_anchor.numel()
    assert set(shard_anchor.tolist()) <= set(full_anchor.tolist())  # rank 0's shards of the anchor


def test_compressed_resume_is_bit_for_bit_and_refuses_another_shard_count(tmp_path: Path) -> None:
    resume(tmp_path, "diloco_int8", save_at=5)
    for rank in range(4):
        full, resumed = load(tmp_path / "full", 4)[rank], load(tmp_path / "resumed-S2", 4)[rank]
        assert max_diff(full["params"], resumed["params"]) == 0.0, rank
    with pytest.raises(AssertionError, match="compression residuals load only at the S they were saved at"):
        launch(2, [str(HERE / "sharded_worker.py"), "resume", "diloco_int8", str(tmp_path), "1", "load", "5"])


# The harness: the text task's tiny GPT, 39 steps (4 mini-batch steps, then H = 2), rows every 10
LM_RUN = [*LM, "--epochs", "0.001", "--dropout", "0.0", "--checkpoint-every", "1"]


def harness(nproc: int, out: Path, *flags: str, **kwargs) -> str:
    return launch(nproc, ["-m", "localsgd", "train", *LM_RUN, *flags, "--out", str(out)], **kwargs)[1]


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@needs_sotu
def test_harness_sharded_run_matches_its_unsharded_twin(tmp_path: Path) -> None:
    """``--shard-size 2`` on 4 processes against 2 unsharded workers: the same run up to reduction
    order (measured after 39 AdamW steps: 2.5e-5 on the parameters, valid loss equal to 1e-15), with
    half the bytes per process."""
    harness(4, tmp_path / "sharded", "--shard-size", "2")
    harness(2, tmp_path / "twin")
    a, b = (torch.load(tmp_path / d / "model.pt", weights_only=True)["model"] for d in ("sharded", "twin"))
    assert max_diff(a, b) < 1e-3
    sharded, twin = rows(tmp_path / "sharded"), rows(tmp_path / "twin")
    assert [r["step"] for r in sharded] == [r["step"] for r in twin]
    for x, y in zip(sharded, twin, strict=True):
        assert abs(x["valid_loss"] - y["valid_loss"]) < 1e-4 and abs(x["train_loss"] - y["train_loss"]) < 1e-4
        assert x["rounds"] == y["rounds"]
        assert 0.45 < x["bytes"]["global"] / y["bytes"]["global"] < 0.55  # rank 0 sends its shards
    config = json.loads((tmp_path / "sharded" / "config.json").read_text())["config"]
    assert config["shard_size"] == 2 and config["workers"] == 2


@needs_sotu
def test_harness_sharded_run_restarted_after_sigkill_resumes_bit_for_bit(tmp_path: Path) -> None:
    """torchrun --max-restarts 1, one of the 4 processes SIGKILLed before a random step: the group
    restarts from the last DCP checkpoint and ends with the uninterrupted run's model and rows."""
    seed = int(os.environ.get("LOCALSGD_TEST_SEED", random.randrange(2**31)))
    rng = random.Random(seed)
    rank, step = rng.randrange(4), rng.randrange(10, 39)  # after the first checkpoint (step 10)
    context = f"kill rank {rank} at step {step} (LOCALSGD_TEST_SEED={seed} repeats it)"
    harness(4, tmp_path / "full", "--shard-size", "2")
    log = launch(
        4,
        [
            str(HERE / "restart_worker.py"),
            "train",
            *LM_RUN,
            "--shard-size",
            "2",
            "--out",
            str(tmp_path / "restarted"),
        ],
        options=("--max-restarts", "1"),
        env={"KILL_RANK": str(rank), "KILL_AT_STEP": str(step)},
    )[1]
    assert "exitcode: -9" in log or "Connection" in log, f"no process was killed, {context}:\n{log}"
    same_run(tmp_path / "full", tmp_path / "restarted", context)
    assert list((tmp_path / "restarted" / "checkpoints").glob("step-*/dcp/.metadata"))  # written by DCP


def test_shard_size_settings_are_checked_before_any_work(monkeypatch: pytest.MonkeyPatch) -> None:
    from localsgd.harness.config import Config, ConfigError
    from localsgd.harness.runtime import resolve_workers

    bad = {
        "shard_size (S) = 3 must divide local_batch_size (B_loc) = 8": {"local_batch_size": 8, "shard_size": 3},
        "shard_size (S) = 2 does not support hierarchical schedules (block_steps = 2)": {
            "shard_size": 2, "local_steps": 2, "block_steps": 2, "workers_per_block": 2,
        },
        "shard_size (S) = 2 does not support buffers = 'average'": {"shard_size": 2, "buffers": "average"},
        "shard_size (S) = 2 does not support the LSTM": {
            "shard_size": 2, "dataset": "text", "model": "lstm", "local_batch_size": 8,
        },
        "shard_size (S) = 2 does not support compression with optimizer_state other than 'local'": {
            "shard_size": 2, "local_steps": 4, "compress": "int8", "optimizer_state": "average",
        },
        "shard_size must be": {"shard_size": 0},
    }  # fmt: skip
    for message, settings in bad.items():
        with pytest.raises(ConfigError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
            Config(**settings).validate()
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ConfigError, match=r"^shard_size \(S\) = 2 needs torchrun"):
        resolve_workers(Config(shard_size=2))
    monkeypatch.setenv("WORLD_SIZE", "6")
    with pytest.raises(
        ConfigError, match=r"^torchrun started 6 processes, which shard_size \(S\) = 4 does not"
    ):
        resolve_workers(Config(shard_size=4))
    assert resolve_workers(Config(shard_size=2)).workers == 3  # K = W / S
    with pytest.raises(
        ConfigError,
        match=r"^workers \(K\) = 6 but torchrun started 6 processes \(3 workers of S = 2\); start 12 processes",
    ):
        resolve_workers(Config(shard_size=2, workers=6))


def test_dcp_load_refuses_a_folder_whose_save_did_not_finish(tmp_path: Path) -> None:
    from localsgd import LocalSGD, Schedule, dcp

    model = torch.nn.Linear(2, 2)
    opt = LocalSGD(torch.optim.SGD(model.parameters(), lr=0.1), model, Schedule.local(2))
    (tmp_path / "__0_0.distcp").write_bytes(b"partial")  # data written, .metadata (written last) not
    with pytest.raises(
        ValueError, match=r"not a complete DCP checkpoint \(no .metadata: the save did not finish\)"
    ):
        dcp.load(tmp_path, model, opt)
    with pytest.raises(TypeError, match=r"optimizer must be a localsgd\.LocalSGD, got SGD"):
        dcp.load(tmp_path, model, opt.optimizer)


def test_the_sharded_benchmark_runs_on_cpu(tmp_path: Path) -> None:
    """benchmarks/sharded.py at a tiny size: each process holds 1/S of what S = 1 holds."""
    import subprocess
    import sys

    out = tmp_path / "sharded.json"
    script = HERE.parent / "benchmarks" / "sharded.py"
    args = [
        "--width",
        "32",
        "--depth",
        "2",
        "--heads",
        "2",
        "--context",
        "16",
        "--steps",
        "2",
        "--shards",
        "1",
        "2",
    ]
    done = subprocess.run(
        [sys.executable, str(script), *args, "--out", str(out)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    rows = json.loads(out.read_text())["rows"]
    held = {
        s: sum(r["parameters"] + r["inner_state"] + r["localsgd_state"] for r in rows if r["shards"] == s)
        for s in (1, 2)
    }
    assert (
        0.45 < held[2] / held[1] < 0.55
    )  # summed over the 4 processes: two copies of the model instead of four
    assert all(r["averaging_buffers"] == 0 for r in rows)


def test_streamed_fragments_resume_bit_for_bit_and_refuse_another_shard_count(tmp_path: Path) -> None:
    """Streaming DiLoCo on sharded workers (N = 2, mix, τ = 1), saved after step 5 with fragment 1's
    pseudo-gradient in flight: resumed at S = 2 bit for bit; at S = 1 refused in one line."""
    resume(tmp_path, "diloco_fragments", save_at=5)
    for rank in range(4):
        full, resumed = load(tmp_path / "full", 4)[rank], load(tmp_path / "resumed-S2", 4)[rank]
        assert max_diff(full["params"], resumed["params"]) == 0.0, rank
    with pytest.raises(AssertionError, match="fragments' states load only at the S they were saved at"):
        launch(
            2,
            [str(HERE / "sharded_worker.py"), "resume", "diloco_fragments", str(tmp_path), "1", "load", "5"],
        )
