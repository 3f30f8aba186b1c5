"""What the framework integrations share: their arguments, and moving a worker's state."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from localsgd.policy import POLICY_FIELDS, Policy, as_policy
from localsgd.schedule import Schedule


def take_policy(schedule: Schedule, policy: Policy | None, kwargs: dict[str, Any]) -> Policy:
    """Check ``schedule`` and take the policy's keywords out of ``kwargs`` (the rest are the
    framework's): the ``Policy`` they, or ``policy``, name."""
    if not isinstance(schedule, Schedule):
        raise TypeError(f"schedule must be a localsgd.Schedule, got {type(schedule).__name__}")
    return as_policy(policy, {name: kwargs.pop(name) for name in list(kwargs) if name in POLICY_FIELDS})


def copy_to(obj: Any, device: torch.device | str = "cpu") -> Any:
    """A copy of a nested state (dicts, lists, tuples) with every tensor on ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to(device, copy=True)
    if isinstance(obj, Mapping):
        return {k: copy_to(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(copy_to(v, device) for v in obj)
    return obj
