"""``Policy``: how the engine averages, as one record. ``Engine``, ``Simulator`` and ``LocalSGD``
take it as ``policy=`` or as its fields' keywords (``buffers="average"``, ...), collected here by
``as_policy``; the defaults are the fields' own."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, Literal, TypedDict, get_args

import torch

from localsgd._validate import check_int, is_number
from localsgd.averaging import DEFAULT_BUCKET_BYTES, check_bucket_bytes
from localsgd.compression import Codec, make_codec
from localsgd.outer import OuterOptimizerFactory

BufferPolicy = Literal["local", "average"]
OptimizerStatePolicy = Literal["local", "average", "reset"]
BUFFER_POLICIES: tuple[str, ...] = get_args(BufferPolicy)
OPTIMIZER_STATE_POLICIES: tuple[str, ...] = get_args(OptimizerStatePolicy)
MergeRule = Literal["delta", "mix"]
MERGE_RULES: tuple[str, ...] = get_args(MergeRule)


def _check_choice(name: str, value: object, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class Policy:
    """The averaging policies; every value is checked at construction.

    Args:
        buffers: floating-point buffers (BatchNorm statistics) at averaging rounds: ``"local"``
            keeps each worker's own (the paper), ``"average"`` averages them. Integer buffers
            (``num_batches_tracked``) are never averaged.
        optimizer_state: at parameter averages, ``"local"`` keeps each worker's optimizer state
            (the paper), ``"average"`` averages its floating tensors (e.g. momentum), ``"reset"``
            clears it.
        bucket_bytes: largest flat buffer per collective for copied tensors (buffers, optimizer
            state); the packed parameters and gradient windows are one buffer per dtype and device.
        outer_optimizer: builds an optimizer over the anchor tensors (e.g. ``localsgd.outer.diloco()``):
            scheduled global averages then step the anchor with the averaged pseudo-gradient
            instead of plain averaging (``localsgd.outer``). Block averages stay plain.
        anchor_device: where the anchor and the outer optimizer's state live (default: with the
            parameters; ``"cpu"`` to save accelerator memory).
        compression: ``"bf16"``, ``"fp16"``, ``"int8"``, ``"sign"`` or a ``localsgd.compression.Codec``:
            scheduled global averages send the pseudo-gradient θ̄ − θ_k encoded, with error
            feedback (``localsgd.compression``). Without an outer optimizer the anchor is then
            stepped by plain SGD with lr 1 (θ̄ − mean Δ: plain averaging up to the compression).
        overlap_steps: τ. A scheduled global average is started after its step and applied τ
            local steps later, which keep training meanwhile (``rounds.DelayedAverage`` says how);
            0: blocking. Needs local buffer and optimizer-state policies, and τ < the schedule's
            global period (checked by the engine).
        max_grad_norm: clip each worker's gradient to this total 2-norm before its optimizer
            step: in local steps its own gradient, in steps that average gradients the average
            (so workers in the mini-batch phase stay identical). With gradient scalers the
            gradients are unscaled first. None: no clipping.
        fragments: N. Streaming DiLoCo: the parameters are cut into N contiguous fragments of
            equal bytes (to the element: a cut may fall inside a parameter), each with its own
            anchor and outer optimizer state; one fragment syncs every H·H_b / N steps, the N in
            turn, so each syncs once per global period and the link carries 1/N of the model at a
            time (``localsgd.streaming``). 1: the whole model at once. Or the fragments by name, in
            the order they sync: one module or parameter name (as in ``named_parameters()``; a
            module's name holds all its parameters) or a list of them per fragment, e.g.
            ``[["embed", "position"], "blocks.0", "blocks.1", ["ln", "decoder"]]``; every
            parameter must be in exactly one.
        merge: how an overlapped (τ > 0) or streamed sync lands on a worker. ``"delta"``: the
            average is sent at the sync point and applied τ steps later, keeping what the worker
            learned meanwhile, θ ← θ̄' + (θ − s). ``"mix"``: Streaming DiLoCo's rule as torchft
            implements it: the pseudo-gradient is taken τ steps before the sync point, and at the
            sync point θ ← lerp(θ̄', θ, alpha) (alpha = 0 discards the τ steps).
        alpha: the ``"mix"`` rule's weight of the worker's own parameters, in [0, 1].
    """

    buffers: BufferPolicy = "local"
    optimizer_state: OptimizerStatePolicy = "local"
    bucket_bytes: int = DEFAULT_BUCKET_BYTES
    outer_optimizer: OuterOptimizerFactory | None = None
    anchor_device: torch.device | str | None = None
    compression: Codec | str | None = None
    overlap_steps: int = 0
    max_grad_norm: float | None = None
    fragments: int | Sequence[str | Sequence[str]] = 1
    merge: MergeRule = "delta"
    alpha: float = 0.0

    def __post_init__(self) -> None:
        _check_choice("buffers", self.buffers, BUFFER_POLICIES)
        _check_choice("optimizer_state", self.optimizer_state, OPTIMIZER_STATE_POLICIES)
        norm = self.max_grad_norm
        if norm is not None and not (is_number(norm) and norm > 0):
            raise ValueError(f"max_grad_norm must be a number > 0 or None, got {norm!r}")
        check_bucket_bytes(self.bucket_bytes)
        if isinstance(self.compression, str):
            make_codec(self.compression)  # raises for an unknown name
        elif not (self.compression is None or isinstance(self.compression, Codec)):
            raise TypeError(
                f"compression must be a codec name or a localsgd.compression.Codec, "
                f"got {type(self.compression).__name__}"
            )
        tau = check_int("overlap_steps (τ)", self.overlap_steps, 0)
        if tau and (self.buffers != "local" or self.optimizer_state != "local"):
            raise ValueError(
                "overlap_steps > 0 needs buffers='local' and optimizer_state='local' (delaying their "
                "average is not supported)"
            )
        self._check_streaming()

    @property
    def fragment_count(self) -> int:
        """N: the number of fragments (given, or named)."""
        return self.fragments if isinstance(self.fragments, int) else len(self.fragments)

    @property
    def streams(self) -> bool:
        """Whether global averages go through ``localsgd.streaming`` (fragments, named or more
        than one, or the mix rule)."""
        return not isinstance(self.fragments, int) or self.fragment_count > 1 or self.merge == "mix"

    def _check_streaming(self) -> None:
        given = self.fragments
        if isinstance(given, int | str) or not isinstance(given, Sequence):
            check_int("fragments (N)", given, 1)
        else:  # named: a tuple of tuples of module or parameter names, one per fragment
            named = tuple((f,) if isinstance(f, str) else tuple(f) for f in given)
            ok = all(group and all(isinstance(n, str) and n for n in group) for group in named)
            if not named or not ok:
                raise ValueError(
                    f"fragments must be a number N or a list of module or parameter names (or lists of "
                    f"them) per fragment, none empty, got {given!r}"
                )
            object.__setattr__(self, "fragments", named)
        _check_choice("merge", self.merge, MERGE_RULES)
        if not (is_number(self.alpha) and 0 <= self.alpha <= 1):
            raise ValueError(f"alpha must be a number in [0, 1], got {self.alpha!r}")
        if self.alpha and self.merge != "mix":
            raise ValueError(f"alpha = {self.alpha!r} weighs the 'mix' rule; merge={self.merge!r} uses none")
        if self.streams and (self.buffers != "local" or self.optimizer_state != "local"):
            raise ValueError(
                "fragments > 1 and merge='mix' need buffers='local' and optimizer_state='local' (their "
                "averages are not streamed)"
            )


class PolicyKeywords(TypedDict, total=False):
    """``Policy``'s fields as keywords (``**policy_kwargs: Unpack[PolicyKeywords]``), for type
    checkers and IDEs; the defaults are ``Policy``'s."""

    buffers: BufferPolicy
    optimizer_state: OptimizerStatePolicy
    bucket_bytes: int
    outer_optimizer: OuterOptimizerFactory | None
    anchor_device: torch.device | str | None
    compression: Codec | str | None
    overlap_steps: int
    max_grad_norm: float | None
    fragments: int | Sequence[str | Sequence[str]]
    merge: MergeRule
    alpha: float


POLICY_FIELDS = tuple(f.name for f in fields(Policy))


def as_policy(policy: Policy | None, keywords: Mapping[str, Any]) -> Policy:
    """``policy``, or the ``Policy`` of these keywords (the constructors' convenience); not both."""
    for name in keywords:
        if name not in POLICY_FIELDS:
            raise TypeError(
                f"unexpected keyword argument {name!r}; the policy keywords are {', '.join(POLICY_FIELDS)}"
            )
    if policy is None:
        return Policy(**keywords)
    if not isinstance(policy, Policy):
        raise TypeError(f"policy must be a localsgd.Policy, got {type(policy).__name__}")
    if keywords:
        given = ", ".join(f"{name}=" for name in keywords)
        raise ValueError(f"pass policy= or its keywords, not both: got policy= and {given}")
    return policy
