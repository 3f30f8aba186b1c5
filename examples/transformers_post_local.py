"""Post-local SGD in a Hugging Face Trainer, 2 workers on the CPU (gloo), in one command:

    OMP_NUM_THREADS=1 torchrun --nproc-per-node 2 examples/transformers_post_local.py

A 2-layer GPT-2 built from its config (nothing is downloaded) learns to continue counting
sequences (start and stride random, modulo 64). Needs ``pip install 'localsgd[hf]'``.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset
from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments

from localsgd import Schedule
from localsgd.integrations.transformers import LocalSGDTrainer

VOCAB, SEQ = 64, 32


class Counting(Dataset):
    def __init__(self, n: int) -> None:
        g = torch.Generator().manual_seed(0)
        start = torch.randint(0, VOCAB, (n, 1), generator=g)
        stride = torch.randint(1, 8, (n, 1), generator=g)
        self.ids = (start + stride * torch.arange(SEQ)) % VOCAB

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def main() -> None:
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=VOCAB, n_positions=SEQ, n_embd=64, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0
    )
    model = GPT2LMHeadModel(config)
    model.loss_type = "ForCausalLM"  # GPT2LMHeadModel's class name names none; the Trainer asks
    args = TrainingArguments(
        output_dir="runs/transformers-example",
        per_device_train_batch_size=16,
        max_steps=300,
        learning_rate=3e-3,
        lr_scheduler_type="constant",
        logging_steps=50,
        logging_first_step=True,
        save_strategy="no",  # with checkpoints, train(resume_from_checkpoint=...) resumes exactly
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
    )
    # Mini-batch SGD (DDP's all-reduce every step) for t' = 100 steps, then local SGD averaging
    # the models every H = 16 steps; nothing is sent in the local steps.
    trainer = LocalSGDTrainer(
        model=model,
        args=args,
        train_dataset=Counting(300 * 16 * 2),
        schedule=Schedule.post_local(local_steps=16, switch_step=100),
    )
    trainer.train()
    trainer.localsgd.average_now()  # the workers' mean, e.g. before trainer.save_model()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    stats = trainer.localsgd.stats["global"]
    if trainer.is_world_process_zero():
        print(
            f"after {trainer.localsgd.t} steps: training loss {losses[0]:.2f}->{losses[-1]:.2f} "
            f"(logged every {args.logging_steps} steps), rounds={stats.rounds} "
            f"(mini-batch SGD: {trainer.localsgd.t})"
        )


if __name__ == "__main__":
    main()
