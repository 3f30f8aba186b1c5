"""Each worker's own random streams, the same in the simulator (K workers in one process) and under
torchrun (one per process), and saved in checkpoints; or, per step, from (seed, worker, step)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch


class WorkerRandom:
    """Each worker's own random streams: a generator for its data (augmentation) and its own state
    of torch's global generator, which dropout draws from, swapped in around its forward pass. Both
    depend on the worker's index only: the same in both runtimes, and saved in checkpoints."""

    def __init__(
        self, seed: int, workers: list[int], device: torch.device, part: int = 0, per_step: bool = False
    ) -> None:
        self.device, self.seed, self.part, self.per_step = device, seed, part, per_step
        self.data = {k: torch.Generator(device=device).manual_seed(seed * 100_003 + k) for k in workers}
        # part: which of a sharded worker's processes this is (its data stream is the worker's, its
        # dropout draws its own)
        self.torch = {k: self._fresh(seed * 100_003 + k + 7_919 + part * 15_485_863) for k in workers}

    def at(self, t: int) -> None:
        """Before step ``t``: with ``per_step``, every stream starts again from (seed, k, t), so that
        what step t draws does not depend on the steps before it (a healed worker draws what it
        would have); otherwise nothing."""
        if not self.per_step:
            return
        for k, generator in self.data.items():
            base = (self.seed * 1_000_003 + k) * 1_000_000_007 + t
            generator.manual_seed(base % 2**63)
            self.torch[k] = self._fresh((base + 7_919 + self.part * 15_485_863) % 2**63)

    def _fresh(self, seed: int) -> list[torch.Tensor]:
        with torch.random.fork_rng(devices=self._devices(), device_type=self.device.type):
            torch.manual_seed(seed)
            return self._get()

    def _devices(self) -> list[torch.device]:
        return [self.device] if self.device.type == "cuda" else []

    def _get(self) -> list[torch.Tensor]:
        states = [torch.get_rng_state()]
        if self.device.type == "cuda":
            states.append(torch.cuda.get_rng_state(self.device))
        return states

    @contextmanager
    def of(self, k: int) -> Iterator[None]:
        """Worker ``k``'s global random state inside the block; the caller's restored after."""
        with torch.random.fork_rng(devices=self._devices(), device_type=self.device.type):
            torch.set_rng_state(self.torch[k][0])
            if self.device.type == "cuda":
                torch.cuda.set_rng_state(self.torch[k][1], self.device)
            yield
            self.torch[k] = self._get()

    def state(self) -> dict[str, Any]:
        return {"data": {k: g.get_state() for k, g in self.data.items()}, "torch": self.torch}

    def load(self, state: dict[str, Any]) -> None:
        for k, g in self.data.items():
            g.set_state(state["data"][k])
        self.torch = state.get("torch", self.torch)
