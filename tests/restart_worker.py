"""``localsgd train`` under torchrun, with one fault injected: on the first attempt
(TORCHELASTIC_RESTART_COUNT=0) the worker of rank KILL_RANK SIGKILLs itself just before optimizer
step KILL_AT_STEP. torchrun --max-restarts then restarts the whole group, which must resume from
the last checkpoint by itself."""

from __future__ import annotations

import os
import signal
import sys

from localsgd.harness.cli import main
from localsgd.wrapper import LocalSGD

if os.environ["TORCHELASTIC_RESTART_COUNT"] == "0" and os.environ["RANK"] == os.environ["KILL_RANK"]:
    kill_at = int(os.environ["KILL_AT_STEP"])
    original = LocalSGD.step
    steps = 0

    def step(self, closure=None):  # type: ignore[no-untyped-def]
        global steps
        if steps == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        steps += 1
        return original(self, closure)

    LocalSGD.step = step  # type: ignore[method-assign]

sys.exit(main(sys.argv[1:]))
