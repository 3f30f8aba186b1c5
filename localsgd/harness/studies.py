"""The named studies: grids of runs (methods x seeds) on one protocol each, run by
``localsgd study`` (``study.py``) and reported by ``report.py``. Each entry says why its numbers
were chosen; the results pages in docs/results/ say what they showed."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from localsgd.harness.config import Config, ConfigError, from_mapping
from localsgd.harness.measures import Measures
from localsgd.harness.tasks import measures_of


@dataclass(frozen=True)
class Study:
    """``base`` settings for every run; ``methods`` name the settings that differ."""

    base: dict[str, Any]
    methods: dict[str, dict[str, Any]]
    seeds: tuple[int, ...] = (1, 2, 3)
    notes: str = ""
    baseline: str | None = None  # the method every other one is compared with, seed by seed
    versus: dict[str, str] = field(default_factory=dict)  # methods compared with another one instead
    sharpness_samples: int | None = None  # measure every run's models on this many training images

    @property
    def kept_models(self) -> bool:
        """Whether the runs keep models along the way (``save_models_at``): a phase study."""
        return bool(self.base.get("save_models_at"))

    @property
    def measures(self) -> Measures:
        """What the study's runs measure: their task's."""
        return measures_of(self.base.get("dataset", Config.dataset))

    def config(self, method: str, seed: int, data_dir: str | None, threads: int | None = None) -> Config:
        values = {**self.base, **self.methods[method], "seed": seed, "resume": True}
        if data_dir is not None:
            values["data_dir"] = data_dir
        if threads is not None:  # run control, like data_dir: a finished piece is reused either way
            values["threads"] = threads
        return from_mapping(values, f"study method {method!r}")


# cifar10-resnet8's protocol, shared by the studies built on it (docs/results/cifar10-resnet8.md).
RESNET8_PROTOCOL: dict[str, Any] = {
    "dataset": "cifar10",
    "model": "resnet8",
    "workers": 16,
    "local_batch_size": 32,
    "epochs": 16,
    "warmup_epochs": 2,
    "decay_at": [0.5, 0.75],
    "eval_local": "final",
    "progress": False,
}

STUDIES: dict[str, Study] = {
    # A seconds-long study that exercises the machinery (tests, first use on a new machine).
    "smoke": Study(
        base={
            "dataset": "cifar10",
            "model": "resnet20",
            "train_subset": 256,
            "test_subset": 200,
            "workers": 2,
            "local_batch_size": 16,
            "epochs": 2,
            "warmup_epochs": 0.5,
            "eval_local": "never",
            "progress": False,
        },
        methods={"mini-batch": {"local_steps": 1}, "post-local H=4": {"local_steps": 4, "switch_epoch": 1}},
        seeds=(1, 2),
        baseline="mini-batch",
    ),
    # The same for the text task: a GPT of 2 x 32 on windows of 32 bytes, 20 steps per run.
    "smoke-text": Study(
        base={
            "dataset": "text",
            "model": "gpt",
            "width": 32,
            "depth": 2,
            "heads": 2,
            "seq_len": 32,
            "workers": 2,
            "local_batch_size": 4,
            "epochs": 20 / 39_013,  # steps per epoch: (9,987,579 - 32) // (2 * 4) // 32
            "optimizer": "adamw",
            "peak_lr": 0.01,
            "lr_schedule": "cosine",
            "warmup_epochs": 0.0,
            "test_subset": 64,
            "row_steps": 10,
            "eval_local": "final",
            "progress": False,
        },
        methods={"mini-batch": {"local_steps": 1}, "local H=4": {"local_steps": 4}},
        seeds=(1, 2),
        baseline="mini-batch",
    ),
    # The scaled reproduction of the paper's CIFAR-10 comparison (docs/results/cifar10-resnet8.md says
    # why each number was chosen and what the pilot showed).
    "cifar10-resnet8": Study(
        base=RESNET8_PROTOCOL,
        methods={
            "small-batch": {"workers": 4},
            "large-batch": {},
            "local H=16": {"local_steps": 16},
            "post-local H=16": {"local_steps": 16, "switch_epoch": "first-decay"},
            "post-local H=32": {"local_steps": 32, "switch_epoch": "first-decay"},
            "hierarchical": {
                "workers_per_block": 4,
                "local_steps": 4,
                "block_steps": 4,
                "switch_epoch": "first-decay",
            },
        },
        notes="ResNet-8 on CIFAR-10, K=16 workers x B_loc=32 (global batch 512; small-batch: K=4, 128), "
        "16 epochs, paper LR rule (0.1 per 64 samples, linear warm-up from 0.1 over 2 epochs, x0.1 at "
        "epochs 8 and 12), switch t' at the first decay; hierarchical: K'=4, H=4, H_b=4.",
        baseline="large-batch",
    ),
    # Language modelling at equal tokens (issue: the paper's second task): the sotu-gpt demo's
    # GPT and AdamW recipe at K = 8, B_loc = 8 (8,192 tokens per step, as the demo), 1.5 epochs of
    # the SOTU training split (1,828 steps, 15M tokens), a row and an evaluation every 64 steps.
    # Pilot (128 steps of local H=16 at K = 8 on the AVX-512 VM, alone): 15,900-17,100 tokens/s,
    # 1.3 s per evaluation of the 512 validation windows, 11 s for the final one of the 8 local
    # models: about 16 minutes a run, 4 hours for the 15 runs, within the 5 CPU-hour budget.
    "sotu-lm": Study(
        base={
            "dataset": "text",
            "model": "gpt",
            "seq_len": 128,
            "workers": 8,
            "local_batch_size": 8,
            "epochs": 1.5,
            "optimizer": "adamw",
            "peak_lr": 3e-3,
            "weight_decay": 0.1,
            "lr_schedule": "cosine",
            "warmup_epochs": 0.05,
            "test_subset": 512,
            "row_steps": 64,
            "eval_local": "final",
            "progress": False,
        },
        methods={
            "H=1": {"local_steps": 1},
            "local H=16": {"local_steps": 16},
            "local H=64": {"local_steps": 64},
            "post-local H=16": {"local_steps": 16, "switch_epoch": 0.375},
            "diloco H=64": {"local_steps": 64, "outer_optimizer": "diloco"},
            # Streaming DiLoCo: 4 fragments, one synced every 16 steps, overlapped by τ = 1, mixed α = 0.5
            "diloco H=64 N=4 mix": {
                "local_steps": 64,
                "outer_optimizer": "diloco",
                "fragments": 4,
                "overlap_steps": 1,
                "merge": "mix",
                "alpha": 0.5,
            },
        },
        seeds=(1, 2, 3),
        notes="GPT 4 x 128 (0.84M parameters) on windows of 128 bytes of the SOTU split, K=8, B_loc=8, "
        "AdamW (peak 3e-3, betas 0.9/0.95, weight decay 0.1 off norms, biases and embeddings), warm-up "
        "0.05 epochs then cosine to 10%, 1.5 epochs; post-local: H=16 from 25% of training; DiLoCo: "
        "outer Nesterov SGD lr 0.7, momentum 0.9; Streaming DiLoCo: the same in N=4 fragments (tau=1, "
        "mix alpha 0.5), compared with DiLoCo H=64.",
        baseline="H=1",
        versus={"diloco H=64 N=4 mix": "diloco H=64"},
    ),
    # Does post-local SGD's gain need a long phase at the small LR (Gu et al., ICLR 2023)? The
    # cifar10-resnet8 protocol's first 8 epochs, then 48 epochs at the decayed LR with no second
    # decay; each run keeps its averaged model 8, 16, 32 and 40 epochs after t' and ends at 48, so
    # one run per seed measures every phase length (docs/results/cifar10-long-local.md). One thread
    # per run, two runs side by side: pilot (one epoch at K = 16, AVX-512 VM) 40.8 s alone on two
    # threads, 63 s each for two one-thread runs at once: 1.3x the throughput, about an hour a run,
    # so two pairs of runs fit in one sitting.
    "cifar10-long-local": Study(
        base={
            **RESNET8_PROTOCOL,
            "epochs": 56,
            "decay_at": [1 / 7],  # epoch 8
            "save_models_at": [16, 24, 40, 48],
            "eval_local": "never",
            "threads": 1,
        },
        methods={
            "large-batch": {},
            "post-local H=16": {"local_steps": 16, "switch_epoch": "first-decay"},
            "post-local H=64": {"local_steps": 64, "switch_epoch": "first-decay"},
        },
        seeds=(1, 2, 3),
        notes="ResNet-8 on CIFAR-10, K=16 x B_loc=32, paper LR rule with 2 warm-up epochs, one decay "
        "(x0.1) at epoch 8 = t', then 48 epochs at that LR; averaged model kept at epochs 16, 24, 40, 48 "
        "and 56 (phases of 8, 16, 32, 40, 48 epochs), each measured on 1024 clean training images.",
        baseline="large-batch",
        sharpness_samples=1024,
    ),
    # Outer optimizers and compressed averaging on the cifar10-resnet8 protocol's post-local H=16
    # row (issue: outer optimizers, compressed and overlapped averaging). The plain row is run
    # again beside them: the earlier study ran on another CPU, whose kernels round differently.
    "cifar10-outer": Study(
        base={**RESNET8_PROTOCOL, "local_steps": 16, "switch_epoch": "first-decay"},
        methods={
            "post-local H=16": {},
            "diloco": {"outer_optimizer": "diloco"},
            "slowmo": {"outer_optimizer": "slowmo"},
            "int8": {"compress": "int8"},
            "sign": {"compress": "sign"},
            # Streaming DiLoCo: 4 fragments, one synced every H/N = 4 steps, overlapped by τ = 1
            "diloco N=4 mix": {
                "outer_optimizer": "diloco",
                "fragments": 4,
                "overlap_steps": 1,
                "merge": "mix",
                "alpha": 0.5,
            },
            "diloco N=4 delta": {"outer_optimizer": "diloco", "fragments": 4, "overlap_steps": 1},
        },
        seeds=(1, 2, 3),
        notes="cifar10-resnet8's post-local H=16 (ResNet-8, K=16, B_loc=32, 16 epochs, t' at the first "
        "decay) with an outer optimizer (DiLoCo: Nesterov SGD lr 0.7, momentum 0.9; SlowMo: alpha 1, "
        "beta 0.5) or compressed pseudo-gradients (int8 and sign, blocks of 256, error feedback); "
        "Streaming DiLoCo (N = 4 fragments, tau = 1; mix with alpha 0.5 as the paper, or delta), "
        "compared with DiLoCo (N = 1).",
        baseline="post-local H=16",
        versus={"diloco N=4 mix": "diloco", "diloco N=4 delta": "diloco"},
    ),
    # The fault-tolerance accuracy comparison's arm without failures: cifar10-outer's post-local
    # H=16 and DiLoCo with per-step random streams, in the simulator (which equals fault-tolerant
    # workers without faults, tests/test_ft_train.py). The arm with one worker killed and restarted:
    # benchmarks/fault_tolerance_accuracy.py, the same settings as 16 fault-tolerant processes.
    "cifar10-ft": Study(
        base={
            **RESNET8_PROTOCOL,
            "local_steps": 16,
            "switch_epoch": "first-decay",
            "random_per_step": True,
            "eval_every": 4,
            "ordered_averaging": True,
        },
        methods={"post-local H=16": {}, "diloco": {"outer_optimizer": "diloco"}},
        seeds=(1, 2, 3),
        notes="cifar10-outer's post-local H=16 and DiLoCo (ResNet-8, K=16, B_loc=32, 16 epochs, t' at "
        "the first decay) with per-step random streams, evaluated every 4 epochs (each of the 16 "
        "fault-tolerant workers evaluates the average: 16 evaluations on 2 cores): the runs without "
        "a failure, beside the same runs with one worker killed and restarted "
        "(benchmarks/fault_tolerance_accuracy.py).",
        baseline="post-local H=16",
    ),
}


def get(name: str) -> Study:
    if name not in STUDIES:
        raise ConfigError(f"unknown study {name!r}; studies: {', '.join(STUDIES)}")
    return STUDIES[name]


def run_dir(root: Path, method: str, seed: int) -> Path:
    return root / method.replace(" ", "_").replace("=", "") / f"seed-{seed}"
