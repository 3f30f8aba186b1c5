"""The outer step of DiLoCo and SlowMo: at a global average the workers' parameters are not simply
replaced by their mean. The engine keeps the anchor θ̄, the parameters after the last global
average; at the next one every worker sends its pseudo-gradient θ̄ − θ_k, their mean
Δ = θ̄ − mean_k θ_k is given to an outer optimizer as the gradient of θ̄, the outer optimizer steps
θ̄, and every worker continues from the new θ̄.

With ``torch.optim.SGD(lr=1)`` and no momentum the new anchor is θ̄ − Δ = mean_k θ_k: plain
averaging (to rounding). With one worker it is Lookahead (Zhang et al., 2019): θ̄ ← θ̄ + lr·(θ − θ̄).

Presets:

- ``diloco(lr=0.7, momentum=0.9)``: Nesterov SGD on Δ (Douillard et al., 2023, DiLoCo).
- ``slowmo(lr=1.0, momentum=0.5)``: slow momentum (Wang et al., ICLR 2020, Algorithm 1, as in
  fairscale's ``SlowMoDistributedDataParallel``): u ← β·u + Δ/γ, θ̄ ← θ̄ − α·γ·u, with γ the inner
  learning rate at that round. Dividing by γ keeps u in gradient units, so after an inner LR decay
  the momentum carried over shrinks with the LR; with a constant γ it is heavy-ball SGD on Δ with
  lr α. This is the formula we follow: it is the paper's and the reference implementation's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from localsgd.pieces import Layout

OuterOptimizerFactory = Callable[[list[torch.Tensor]], torch.optim.Optimizer]


def diloco(lr: float = 0.7, momentum: float = 0.9) -> OuterOptimizerFactory:
    """DiLoCo's outer optimizer: SGD with Nesterov momentum on the pseudo-gradient."""
    _check_hyper(lr, momentum)
    # foreach: in place over all tensors at once (the default on CPU is a Python loop that allocates
    # the Nesterov gradient anew at every step); the same arithmetic, bit for bit
    return lambda anchor: torch.optim.SGD(
        anchor, lr=lr, momentum=momentum, nesterov=momentum > 0, foreach=True
    )


def slowmo(lr: float = 1.0, momentum: float = 0.5) -> OuterOptimizerFactory:
    """SlowMo's slow momentum β (``momentum``) and slow learning rate α (``lr``)."""
    _check_hyper(lr, momentum)
    return lambda anchor: SlowMo(anchor, lr=lr, momentum=momentum)


def _check_hyper(lr: float, momentum: float) -> None:
    if not (isinstance(lr, int | float) and lr > 0):
        raise ValueError(f"outer lr must be a number > 0, got {lr!r}")
    if not (isinstance(momentum, int | float) and 0 <= momentum < 1):
        raise ValueError(f"outer momentum must be a number in [0, 1), got {momentum!r}")


class SlowMo(torch.optim.Optimizer):
    """Slow momentum: u ← β·u + Δ/γ, θ̄ ← θ̄ − α·γ·u (Wang et al., 2020).

    ``lr`` is α, ``momentum`` is β. γ is ``group["inner_lr"]``, which the engine sets to the inner
    optimizer's learning rate before each outer step.
    """

    def __init__(self, params: Iterable[torch.Tensor], lr: float = 1.0, momentum: float = 0.5) -> None:
        super().__init__(params, {"lr": lr, "momentum": momentum, "inner_lr": None})

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            gamma = group["inner_lr"]
            if gamma is None or gamma <= 0:
                raise ValueError(f"SlowMo needs the inner learning rate γ > 0 (inner_lr), got {gamma!r}")
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                u = state["momentum_buffer"]
                u.mul_(group["momentum"]).add_(p.grad, alpha=1 / gamma)
                p.add_(u, alpha=-group["lr"] * gamma)


class OuterStep:
    """The anchor θ̄ and the outer optimizer of this process's workers. All of them continue from
    the same θ̄ after a global average, so one anchor serves the K workers of the simulator.

    Args:
        params: worker 0's parameters (the anchor starts as a copy of them).
        make_optimizer: builds the outer optimizer over the anchor tensors.
        anchor_device: where the anchor and the outer optimizer's state live (default: with each
            parameter). ``"cpu"`` saves accelerator memory at the cost of copies at each round.
    """

    def __init__(
        self,
        params: list[torch.Tensor],
        make_optimizer: OuterOptimizerFactory,
        anchor_device: torch.device | str | None = None,
        layout: Layout | None = None,
    ) -> None:
        self.layout = layout  # how ``params`` group the parameters' pieces (state is saved per piece)
        device = None if anchor_device is None else torch.device(anchor_device)
        self.anchor = [p.detach().to(device or p.device, copy=True) for p in params]
        self.optimizer = make_optimizer(self.anchor)
        if not isinstance(self.optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"the outer optimizer factory must return a torch.optim.Optimizer, got "
                f"{type(self.optimizer).__name__}"
            )
        self.current = False  # whether the anchor holds the parameters of the last global average

    def describe(self) -> dict[str, Any]:
        """What every worker must agree on."""
        skip = ("params", "inner_lr")
        groups = [{k: v for k, v in g.items() if k not in skip} for g in self.optimizer.param_groups]
        return {"optimizer": type(self.optimizer).__name__, "groups": repr(groups)}

    @torch.no_grad()
    def reset_(self, params: list[torch.Tensor]) -> None:
        """Anchor ← ``params`` (after a mini-batch phase every worker holds the same parameters)."""
        for a, p in zip(self.anchor, params, strict=True):
            a.copy_(p)
        self.current = True

    @torch.no_grad()
    def to_pseudo_gradients_(self, params_per_worker: list[list[torch.Tensor]]) -> None:
        """θ_k ← θ̄ − θ_k in place, so that averaging them gives Δ."""
        for params in params_per_worker:
            for p, a in zip(params, self.anchor, strict=True):
                torch.sub(a.to(p.device, non_blocking=True), p, out=p)  # one pass

    @torch.no_grad()
    def advance_(self, delta: list[torch.Tensor], inner_lr: float) -> None:
        """Step the anchor with the averaged pseudo-gradient Δ as its gradient."""
        for a, d in zip(self.anchor, delta, strict=True):
            # Δ itself, not a copy: the callers overwrite it afterwards (what the outer optimizer
            # does to its gradient cannot matter)
            a.grad = d.to(a.device)
        for group in self.optimizer.param_groups:
            if "inner_lr" in group:
                group["inner_lr"] = inner_lr
        self.optimizer.step()
        for a in self.anchor:
            a.grad = None
        self.current = True

    @torch.no_grad()
    def step_(self, params_per_worker: list[list[torch.Tensor]], inner_lr: float) -> None:
        """Given Δ in every worker's parameters: step the anchor, then θ_k ← θ̄ for every worker."""
        self.advance_(params_per_worker[0], inner_lr)
        for params in params_per_worker:
            torch._foreach_copy_(params, [a.to(p.device) for p, a in zip(params, self.anchor, strict=True)])

    def state_dict(self) -> dict[str, Any]:
        """The anchor and the outer optimizer's state, one tensor per piece of a parameter (a whole
        parameter's shaped like it), however the anchor's tensors group them."""
        anchor = [a.detach().clone() for a in self._split(self.anchor)]
        return {
            "anchor": anchor,
            "optimizer": self._split_optimizer(self.optimizer.state_dict()),
            "current": self.current,
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        for a, saved in zip(self.anchor, self._join(state["anchor"]), strict=True):
            a.copy_(saved)
        self.optimizer.load_state_dict(self._join_optimizer(state["optimizer"]))
        self.current = bool(state["current"])

    def _split(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        return tensors if self.layout is None else self.layout.split(tensors)

    def _join(self, pieces: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.layout is not None:
            return self.layout.join(pieces)
        mine, saved = [tuple(a.shape) for a in self.anchor], [tuple(p.shape) for p in pieces]
        if mine != saved:
            raise ValueError(f"the checkpoint's anchor has tensors of shapes {saved}, this run's {mine}")
        return pieces

    def _split_optimizer(self, saved: dict[str, Any]) -> dict[str, Any]:
        """The outer optimizer's state dict, per piece: a tensor the size of anchor j is cut like
        it, anything else (a step count) repeated for each of its pieces."""
        layout = self.layout
        if layout is None:
            return saved
        state, cut_keys = {}, {}
        for j, per_anchor in saved["state"].items():
            shape = self.anchor[j].shape
            cut = {
                k: layout.split_one(j, v)
                for k, v in per_anchor.items()
                if torch.is_tensor(v) and v.shape == shape
            }
            for q, piece in enumerate(layout.pieces_of(j)):
                state[piece] = {k: cut[k][q].clone() if k in cut else v for k, v in per_anchor.items()}
                cut_keys[piece] = sorted(cut)
        groups = [
            {**g, "params": [piece for j in g["params"] for piece in layout.pieces_of(j)]}
            for g in saved["param_groups"]
        ]
        return {"state": state, "param_groups": groups, "cut": cut_keys}

    def _join_optimizer(self, saved: dict[str, Any]) -> dict[str, Any]:
        """``_split_optimizer`` undone."""
        layout = self.layout
        if layout is None:
            return saved
        state = {}
        for j in range(len(self.anchor)):
            first = layout.pieces_of(j)[0]
            pieces = [saved["state"].get(piece) for piece in layout.pieces_of(j)]
            if pieces[0] is None:
                continue
            if "cut" in saved:
                cut = saved["cut"][first]
            else:  # saved before states were kept per piece: each anchor tensor was one parameter
                cut = [
                    k for k, v in pieces[0].items() if torch.is_tensor(v) and v.shape == layout.shapes[j][0]
                ]
            state[j] = {
                k: layout.join_one(j, [p[k] for p in pieces]) if k in cut else v for k, v in pieces[0].items()
            }
        owner = {layout.pieces_of(j)[0]: j for j in range(len(self.anchor))}
        groups = [
            {**g, "params": [owner[i] for i in g["params"] if i in owner]} for g in saved["param_groups"]
        ]
        return {"state": state, "param_groups": groups}
