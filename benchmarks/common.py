"""What every benchmark stores next to its rows: the command, the machine and the code's commit."""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def commit() -> str:
    """The code's git commit, with ``+dirty`` if the library or the benchmarks differ from it."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))  # this checkout's localsgd, not another installed one
    from localsgd.harness.rundir import source_commit

    return source_commit(("localsgd", "benchmarks/*.py")) or "unknown"


def machine(**extra: Any) -> dict[str, Any]:
    import torch

    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),  # AVX2, AVX512, ...: the kernels used
        **extra,
    }


def write_result(path: str | Path, result: dict[str, Any], **machine_extra: Any) -> None:
    """Write ``result`` as JSON, after the command that produced it, the machine and the commit
    (atomically: a file that exists is complete)."""
    script = Path(sys.argv[0]).name
    head = {
        "command": f"python benchmarks/{script} " + " ".join(sys.argv[1:]),
        "commit": commit(),
        "machine": machine(**machine_extra),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({**head, **result}, indent=1) + "\n")
    tmp.replace(path)
