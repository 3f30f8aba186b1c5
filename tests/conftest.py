"""Suite-wide checks. With LOCALSGD_REQUIRE_DATA=1 (set by .ci/run) a missing dataset stops the
run with an error instead of letting every end-to-end test skip."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parents[2] / "shared/data"
CIFAR10 = DATA / "cifar-10-batches-py"
SOTU = DATA / "sotu"


def pytest_sessionstart(session: pytest.Session) -> None:
    if os.environ.get("LOCALSGD_REQUIRE_DATA") != "1":
        return
    if not (CIFAR10 / "data_batch_1").is_file():
        raise pytest.UsageError(
            f"LOCALSGD_REQUIRE_DATA=1 but CIFAR-10 is not at {CIFAR10} (the end-to-end train, resume "
            "and fault tests need it); put the official cifar-10-batches-py folder there"
        )
    if not any(SOTU.glob("*.txt")):
        raise pytest.UsageError(
            f"LOCALSGD_REQUIRE_DATA=1 but the SOTU corpus is not at {SOTU} (the text task's end-to-end "
            "tests need it); put its folder of .txt files there"
        )
