"""Gradients as windows of flat buffers, so that averaging them copies nothing (what
``DistributedDataParallel(gradient_as_bucket_view=True)`` does, here for local SGD's mini-batch
phase and any level whose period is 1).

At the first gradient average each worker's gradients are copied into one flat buffer per dtype
and device (``FlatAverager.pack_``) and ``p.grad`` is rebound to its window. From then on
``backward`` accumulates into the windows in place (autograd adds into an existing ``.grad``),
the average is one in-place collective, and ``Engine.zero_grad`` zeroes the windows instead of
freeing every gradient for autograd to allocate again.

Plain PyTorch's ``zero_grad(set_to_none=True)`` leaves ``p.grad`` None until backward reaches
``p``, and optimizers skip such parameters (no weight decay, no momentum). The windows keep that
meaning: a hook on each parameter records that backward reached it, and a window backward did not
reach since ``zero_grad`` is unbound (``p.grad = None``) before the optimizer step. A gradient
that is not its window any more (the wrapped optimizer's own ``zero_grad`` set it to None and
backward allocated a new one, or the user assigned it) is copied in and rebound at the next
average: one copy instead of the copied path's two.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import torch
from torch import nn

from localsgd.averaging import FlatAverager


def fill_flags_(flags: torch.Tensor, had: list[bool]) -> torch.Tensor:
    """One float per parameter, 1 where this worker has a gradient. Averaged with the gradients,
    a flag is > 0 afterwards iff some worker had that gradient. All ones (the usual case) is
    filled on the device: no copy from the host, which on a GPU would wait for it."""
    if all(had):
        return flags.fill_(1.0)
    return flags.copy_(torch.tensor(had, dtype=torch.float32))


def read_flags(flags: torch.Tensor, had: list[bool]) -> list[bool]:
    """After the average: which parameters some worker had a gradient for. A gradient this worker
    had is in the mean whatever the others had, so the device is read only if it lacked one."""
    if all(had):
        return [True] * len(had)
    return [u > 0 for u in flags.tolist()]


class CopiedGradients:
    """Gradients averaged by copying (DDP's own buckets hold them, or the parameters are not
    packed): a missing gradient is averaged as zero, and afterwards a parameter gets the mean iff
    some worker had a gradient for it, else None."""

    def __init__(self) -> None:
        self._filled: list[tuple[list[nn.Parameter], list[torch.Tensor], torch.Tensor, list[bool]]] = []

    def gather(self, params: list[nn.Parameter]) -> list[torch.Tensor]:
        """One worker's gradients (zeros where None) and flags, ready to average."""
        had = [p.grad is not None for p in params]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flags = fill_flags_(torch.empty(len(params), device=params[0].device), had)
        self._filled.append((params, grads, flags, had))
        return [*grads, flags]

    def scatter(self) -> None:
        """After the average: every gathered worker's ``.grad`` is the mean, or None."""
        for params, grads, flags, had in self._filled:
            for p, g, some in zip(params, grads, read_flags(flags, had), strict=True):
                p.grad = g if some else None
        self._filled = []


def _reached(ref: weakref.ref, k: int, i: int, _param: torch.Tensor) -> None:
    grads = ref()
    if grads is not None:
        grads.reached[k][i] = True


class PackedGradients:
    """The gradient windows of this process's workers.

    Args:
        averager: averages the windows (its packed tensors become the windows).
        params_per_worker: each worker's parameters that require a gradient, in model order.
        optimized_per_worker: each worker's parameters its optimizer holds (``zero_grad`` clears
            those, as the optimizer's own ``zero_grad`` would, and only those).
    """

    def __init__(
        self,
        averager: FlatAverager,
        params_per_worker: Sequence[Sequence[nn.Parameter]],
        optimized_per_worker: Sequence[Sequence[torch.Tensor]],
    ) -> None:
        self.averager = averager
        self.params = [list(ps) for ps in params_per_worker]
        self.windows = [
            [torch.zeros(p.shape, dtype=p.dtype, device=p.device) for p in ps] for ps in self.params
        ]
        # Per worker and parameter: 1 if it has a gradient. Averaged in the same buffer as the
        # gradients (a separate collective would cost another round of latency): > 0 afterwards
        # iff some worker had one.
        device = self.params[0][0].device
        self.flags = [torch.zeros(len(ps), dtype=torch.float32, device=device) for ps in self.params]
        if not averager.pack_([[*ws, f] for ws, f in zip(self.windows, self.flags, strict=True)]):
            raise RuntimeError("could not lay the gradient windows out in flat buffers")  # fresh tensors pack
        ids = [{id(p) for p in opt} for opt in optimized_per_worker]
        self.optimized = [[id(p) in mine for p in ps] for ps, mine in zip(self.params, ids, strict=True)]
        # optimized parameters without a window (no gradient required when the windows were made)
        windowed = [{id(p) for p in ps} for ps in self.params]
        pairs = zip(optimized_per_worker, windowed, strict=True)
        self.others = [[p for p in opt if id(p) not in mine] for opt, mine in pairs]
        self.reached = [[False] * len(ps) for ps in self.params]
        self.had: list[list[bool]] = [[] for _ in self.params]  # per worker: its gradients at the last gather
        ref = weakref.ref(self)  # the hooks must not keep the buffers alive after the engine is gone
        self._hooks = [
            p.register_post_accumulate_grad_hook(lambda param, k=k, i=i: _reached(ref, k, i, param))
            for k, ps in enumerate(self.params)
            for i, p in enumerate(ps)
        ]

    def holds(self, k: int, params: Sequence[nn.Parameter]) -> bool:
        """Whether ``params`` are exactly the parameters worker ``k``'s windows were made for."""
        mine = self.params[k]
        return len(params) == len(mine) and all(a is b for a, b in zip(params, mine, strict=True))

    @torch.no_grad()
    def gather(self, k: int) -> list[torch.Tensor]:
        """Worker ``k``'s gradients in their windows and its flags, ready to average in place (a
        parameter without a gradient is averaged as zero, as the copied path does)."""
        used = []
        for i, (p, w) in enumerate(zip(self.params[k], self.windows[k], strict=True)):
            g = p.grad
            if g is w:
                used.append(self.reached[k][i])
            elif g is None:
                w.zero_()
                used.append(False)
            else:
                w.copy_(g)
                used.append(True)
        fill_flags_(self.flags[k], used)
        self.had[k] = used
        return [*self.windows[k], self.flags[k]]

    def scatter(self, k: int) -> None:
        """After the average: each parameter some worker had a gradient for gets its window as
        ``.grad``, the others None."""
        some = read_flags(self.flags[k], self.had[k])
        for i, (p, w, u) in enumerate(zip(self.params[k], self.windows[k], some, strict=True)):
            self.reached[k][i] = u
            p.grad = w if u else None

    def unbind_unreached(self) -> None:
        """``p.grad = None`` where plain PyTorch would have None: windows backward did not reach."""
        for ps, ws, reached in zip(self.params, self.windows, self.reached, strict=True):
            if all(reached):
                continue
            for p, w, r in zip(ps, ws, reached, strict=True):
                if not r and p.grad is w:
                    p.grad = None

    @torch.no_grad()
    def zero_(self, set_to_none: bool) -> None:
        """The optimizers' ``zero_grad``: zero the windows in place (with ``set_to_none`` they
        count as not reached); any other gradient is set to None or zeroed as usual."""
        zero, others = [], []
        for k, (ps, ws) in enumerate(zip(self.params, self.windows, strict=True)):
            for i, (p, w) in enumerate(zip(ps, ws, strict=True)):
                if not self.optimized[k][i]:
                    continue
                if p.grad is w:
                    zero.append(w)
                    self.reached[k][i] &= not set_to_none
                else:
                    others.append(p)
            others += self.others[k]
        for p in others:  # as torch.optim.Optimizer.zero_grad
            if p.grad is None:
                continue
            if set_to_none:
                p.grad = None
            else:
                if p.grad.grad_fn is not None:
                    p.grad.detach_()
                else:
                    p.grad.requires_grad_(False)
                zero.append(p.grad)
        if zero:
            torch._foreach_zero_(zero)
