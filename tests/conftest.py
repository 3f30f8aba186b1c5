"""Suite-wide checks. With LOCALSGD_REQUIRE_DATA=1 (set by .ci/run) a missing dataset stops the
run with an error instead of letting every end-to-end test skip."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

CIFAR10 = Path(__file__).resolve().parents[2] / "shared/data/cifar-10-batches-py"


def pytest_sessionstart(session: pytest.Session) -> None:
    if os.environ.get("LOCALSGD_REQUIRE_DATA") == "1" and not (CIFAR10 / "data_batch_1").is_file():
        raise pytest.UsageError(
            f"LOCALSGD_REQUIRE_DATA=1 but CIFAR-10 is not at {CIFAR10} (the end-to-end train, resume "
            "and fault tests need it); put the official cifar-10-batches-py folder there"
        )
