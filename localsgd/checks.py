"""Cross-worker safety: every worker must average the same tensors under the same schedule.

A mismatch would make the flat buffers of two workers differ in size (a hang or a crash deep in the
backend) or pair unrelated values (silent corruption). ``check_workers`` exchanges a small JSON
description of each worker before the first collective that touches model data and raises one clear
error naming the first difference.
"""

from __future__ import annotations

import json
from typing import Any

from torch import nn

from localsgd.comm import Communicator
from localsgd.sharding import local


def describe(model: nn.Module, settings: dict[str, Any]) -> dict[str, Any]:
    """What must agree across workers: tensor names, shapes and dtypes, and the settings."""

    def rows(named) -> list[list[Any]]:  # a sharded model's: this rank's shards
        return [[name, list(local(t).shape), str(t.dtype).removeprefix("torch.")] for name, t in named]

    return {
        "settings": settings,
        "parameters": rows(model.named_parameters()),
        "buffers": rows(model.named_buffers()),
    }


def _first_difference(a: dict[str, Any], b: dict[str, Any], k: int) -> str | None:
    for kind in ("parameters", "buffers"):
        rows_a, rows_b = a[kind], b[kind]
        for i, (ra, rb) in enumerate(zip(rows_a, rows_b, strict=False)):
            if ra != rb:
                return f"{kind[:-1]} #{i} is {_row(ra)} on worker 0 but {_row(rb)} on worker {k}"
        if len(rows_a) != len(rows_b):
            n = min(len(rows_a), len(rows_b))
            owner = 0 if len(rows_a) > n else k
            extra = (rows_a if owner == 0 else rows_b)[n]
            return (
                f"worker 0 has {len(rows_a)} {kind} and worker {k} has {len(rows_b)}; "
                f"{_row(extra)} is only on worker {owner}"
            )
    for key, value in a["settings"].items():
        if value != b["settings"].get(key):
            return f"setting {key} is {value!r} on worker 0 but {b['settings'].get(key)!r} on worker {k}"
    return None


def _row(row: list[Any]) -> str:
    name, shape, dtype = row
    return f"{name!r} {tuple(shape)} {dtype}"


def check_workers(comm: Communicator, descriptions: list[dict[str, Any]]) -> None:
    """Raise ``ValueError`` on every worker if any worker's description differs from worker 0's."""
    blobs = comm.all_gather_bytes([json.dumps(d, sort_keys=True).encode() for d in descriptions])
    if all(blob == blobs[0] for blob in blobs):
        return
    first = json.loads(blobs[0])
    for k, blob in enumerate(blobs[1:], start=1):
        diff = _first_difference(first, json.loads(blob), k)
        if diff is not None:
            raise ValueError(f"localsgd: workers disagree before the first average: {diff}")
    raise ValueError("localsgd: workers disagree before the first average (their settings differ)")
