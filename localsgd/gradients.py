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
        self.used = [False] * len(self.params)  # per worker: whether it had every gradient (last gather)
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
        if all(used):  # the usual case: no copy from the host (a synchronisation on a GPU)
            self.flags[k].fill_(1.0)
        else:
            self.flags[k].copy_(torch.tensor(used, dtype=torch.float32))
        self.used[k] = all(used)
        return [*self.windows[k], self.flags[k]]

    def scatter(self, k: int) -> None:
        """After the average: each parameter some worker had a gradient for gets its window as
        ``.grad``, the others None."""
        # A gradient this worker had is in the mean whatever the others had: the flags need to be
        # read (a host synchronisation) only if this worker lacked one.
        flags = [1.0] * len(self.params[k]) if self.used[k] else self.flags[k].tolist()
        for i, (p, w, u) in enumerate(zip(self.params[k], self.windows[k], flags, strict=True)):
            self.reached[k][i] = u > 0
            p.grad = w if u > 0 else None

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
