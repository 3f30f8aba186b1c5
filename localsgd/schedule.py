"""When workers communicate: pure functions of the global step index.

Conventions (one for every schedule, see docs/design.md):

* ``t`` is the 0-based index of an optimizer step: ``t`` steps have been taken before it.
* Steps ``t < switch_step`` (the paper's t') are the mini-batch phase: gradients are averaged over
  all K workers before the optimizer step, so every worker takes the same update (H = 1).
* From ``t >= switch_step`` on, workers take local steps. Averaging periods count from the switch:
  with ``u = t + 1 - switch_step`` local steps done, the parameters are averaged after the step
  whenever ``u`` is a multiple of the period. Every local period therefore has exactly H steps,
  even when t' is not a multiple of H.
* Hierarchical: blocks of K' workers average every H local steps, all K workers every H * H_b
  local steps (the global average then replaces the block average).
* A level whose period is 1 averages gradients instead of parameters (true mini-batch SGD within
  that level), so ``local_steps=1`` is mini-batch SGD with global batch K * B_loc.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import Enum
from typing import Any

from localsgd._validate import check_int


class Level(str, Enum):
    """A communication level: all K workers, or one block of K' workers."""

    GLOBAL = "global"
    BLOCK = "block"


@dataclass(frozen=True)
class Sync:
    """What happens at one step: gradient averaging before it, parameter averaging after it."""

    gradients: Level | None = None
    parameters: Level | None = None


@dataclass(frozen=True)
class Schedule:
    """Local, post-local and hierarchical local SGD as one schedule.

    Args:
        local_steps: H, local steps between two averages (of the blocks if ``block_steps`` is set).
        switch_step: t', the number of initial mini-batch SGD steps (0: local SGD from the start).
        block_steps: H_b, block averages between two global averages; ``None`` for a flat schedule.
    """

    local_steps: int = 1
    switch_step: int = 0
    block_steps: int | None = None

    def __post_init__(self) -> None:
        check_int("local_steps (H)", self.local_steps, 1)
        check_int("switch_step (t')", self.switch_step, 0)
        if self.block_steps is not None:
            check_int("block_steps (H_b)", self.block_steps, 1)

    @classmethod
    def local(cls, local_steps: int) -> Schedule:
        """Local SGD: average every H steps from the start."""
        return cls(local_steps=local_steps)

    @classmethod
    def post_local(cls, local_steps: int, switch_step: int) -> Schedule:
        """Post-local SGD: mini-batch SGD for t' steps, then local SGD with H steps."""
        return cls(local_steps=local_steps, switch_step=switch_step)

    @classmethod
    def hierarchical(cls, local_steps: int, block_steps: int, switch_step: int = 0) -> Schedule:
        """Hierarchical local SGD: blocks every H steps, everyone every H * H_b steps."""
        return cls(local_steps=local_steps, switch_step=switch_step, block_steps=block_steps)

    @property
    def is_hierarchical(self) -> bool:
        return self.block_steps is not None

    def period(self, level: Level) -> int:
        """Local steps between two averages at ``level`` (after the switch)."""
        if level is Level.BLOCK:
            if self.block_steps is None:
                raise ValueError("a flat schedule has no block level; set block_steps (H_b)")
            return self.local_steps
        return self.local_steps * (self.block_steps or 1)

    def levels(self) -> tuple[Level, ...]:
        """The levels this schedule communicates at, outermost first."""
        return (Level.GLOBAL, Level.BLOCK) if self.is_hierarchical else (Level.GLOBAL,)

    def sync_at(self, t: int) -> Sync:
        """The communication of step ``t`` (0-based)."""
        if t < 0:
            raise ValueError(f"step index t must be >= 0, got {t}")
        if t < self.switch_step:
            return Sync(gradients=Level.GLOBAL)
        u = t + 1 - self.switch_step
        gradients = parameters = None
        for level in self.levels():  # outermost first: a global average replaces a block one
            period = self.period(level)
            if period == 1:
                gradients = gradients or level
            elif u % period == 0:
                parameters = parameters or level
        return Sync(gradients=gradients, parameters=parameters)

    def fragment_at(self, t: int, fragments: int) -> int | None:
        """Streaming (N = ``fragments``): the fragment whose sync point step ``t`` (0-based) ends,
        or None. The global period H·H_b is cut into N sub-periods of P = H·H_b / N steps; after
        the switch, the k-th sync point (``u = (k + 1)·P`` local steps done) is fragment k mod N's,
        so each fragment syncs once every H·H_b steps, the N in turn (N = 1: the global averages)."""
        period = self.period(Level.GLOBAL)
        if fragments < 1 or period % fragments:
            raise ValueError(f"fragments (N) = {fragments} must divide the global period H·H_b = {period}")
        u = t + 1 - self.switch_step
        sub = period // fragments
        if u <= 0 or u % sub:
            return None
        return (u // sub - 1) % fragments

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Schedule:
        return cls(**d)

    def __str__(self) -> str:
        s = f"H={self.local_steps}"
        if self.switch_step:
            s += f", t'={self.switch_step}"
        if self.block_steps is not None:
            s += f", H_b={self.block_steps}"
        return f"Schedule({s})"
