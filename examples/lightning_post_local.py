"""Post-local SGD under PyTorch Lightning, 2 workers on the CPU (gloo), in one command:

    OMP_NUM_THREADS=1 python examples/lightning_post_local.py

Lightning's own launcher starts the second process (run it as a script, not from a notebook);
under torchrun (``torchrun --standalone --nproc-per-node 2 examples/lightning_post_local.py``)
Lightning takes torchrun's processes instead. Needs ``pip install 'localsgd[lightning]'``.
"""

from __future__ import annotations

import os

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from localsgd import Schedule
from localsgd.integrations.lightning import LocalSGDStrategy

WORKERS = 2


class Classifier(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)  # the same initial model on every worker (the strategy also syncs it)
        self.net = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Linear(64, 2))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)


def main() -> None:
    data = torch.Generator().manual_seed(1)  # a toy task: the sign of x0 * x1
    x = torch.randn(8192, 20, generator=data)
    y = (x[:, 0] * x[:, 1] > 0).long()
    # Lightning's DistributedSampler gives each worker its own shard of the data.
    loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True)

    # Mini-batch SGD (DDP's all-reduce every step) for t' = 200 steps, then local SGD averaging
    # the models every H = 16 steps; DDP's all-reduce is off in the local steps.
    strategy = LocalSGDStrategy(Schedule.post_local(local_steps=16, switch_step=200))
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=WORKERS,
        strategy=strategy,
        max_epochs=5,
        logger=False,
        enable_checkpointing=False,  # with ModelCheckpoint, Trainer.fit(ckpt_path=...) resumes exactly
        enable_model_summary=False,
        enable_progress_bar=False,
    )
    model = Classifier()
    trainer.fit(model, loader)

    opt = strategy.engine  # the LocalSGD wrapper: step counter, rounds, bytes
    opt.average_now()  # one model on every worker, for evaluation or saving
    accuracy = (model.net(x).argmax(1) == y).float().mean().item()
    if dist.get_rank() == 0:
        print(f"after {opt.t} steps: training accuracy {accuracy:.1%}; {opt.stats['global']}")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
