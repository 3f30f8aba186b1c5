"""Post-local SGD in a Hugging Face Accelerate loop, 2 workers on the CPU (gloo), in one command:

    OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 2 examples/accelerate_post_local.py

Accelerate takes torchrun's processes (``Accelerator(cpu=True)`` on CPUs; without a config file,
``accelerate launch --cpu --num_processes 2`` starts a single process here, which trains as one
worker). Needs ``pip install 'localsgd[hf]'``. The loop is Accelerate's own; only ``prepare``
differs: it wraps the optimizer in ``LocalSGD`` and registers every rank's state for
``accelerator.save_state``, which writes to $TMPDIR/localsgd-accelerate-example after each epoch.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from localsgd import Schedule
from localsgd.integrations.accelerate import prepare


def main() -> None:
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),
        # DDP must not overwrite each worker's buffers (BatchNorm statistics) with rank 0's
        kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)],
    )
    torch.manual_seed(0)  # the same initial model on every worker (prepare also syncs it)
    model = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Linear(64, 2))
    data = torch.Generator().manual_seed(1)  # a toy task: the sign of x0 * x1
    x = torch.randn(8192, 20, generator=data)
    y = (x[:, 0] * x[:, 1] > 0).long()

    # Mini-batch SGD (DDP's all-reduce every step) for t' = 200 steps, then local SGD averaging
    # the models every H = 16 steps; DDP's all-reduce is off in the local steps.
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
    model, opt = prepare(accelerator, model, sgd, Schedule.post_local(local_steps=16, switch_step=200))
    # Accelerate gives each worker its own shard of the (shuffled) data.
    loader = accelerator.prepare(DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True))

    checkpoint = Path(tempfile.gettempdir()) / "localsgd-accelerate-example"
    for _ in range(5):
        for xb, yb in loader:
            with accelerator.accumulate(model):
                accelerator.backward(F.cross_entropy(model(xb), yb))
                opt.step()
                opt.zero_grad()
        # every rank's model and LocalSGD state: accelerator.load_state(checkpoint) resumes exactly
        accelerator.save_state(checkpoint)

    local_sgd = opt.optimizer  # the LocalSGD inside Accelerate's optimizer: step counter, rounds, bytes
    local_sgd.average_now()  # one model on every worker, for evaluation or saving
    with torch.no_grad():
        accuracy = (model(x.to(accelerator.device)).argmax(1).cpu() == y).float().mean().item()
    accelerator.print(
        f"after {local_sgd.t} steps: training accuracy {accuracy:.1%}; {local_sgd.stats['global']}"
    )
    accelerator.end_training()


if __name__ == "__main__":
    main()
