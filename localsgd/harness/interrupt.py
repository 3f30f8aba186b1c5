"""Ctrl-C and SIGTERM as ordinary events of a training run: the loop notices the signal at the next
step boundary, stops there with one line and the conventional exit code (128 + the signal's
number), and ``--resume`` continues the run to the model an uninterrupted run gives."""

from __future__ import annotations

import signal
import threading
from types import FrameType

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(Exception):
    """The run stopped at a step boundary on a signal; ``checkpoint_step``: where it continues from
    (None: from the start); ``how``: what continues it."""

    def __init__(
        self,
        signum: int,
        step: int,
        checkpoint_step: int | None,
        how: str = "with --resume",
        where: str | None = None,
    ) -> None:
        self.signum, self.step, self.checkpoint_step = signum, step, checkpoint_step
        if where is None and checkpoint_step == step:
            where = "from there"
        elif where is None and checkpoint_step is not None:
            where = f"from the checkpoint of step {checkpoint_step}"
        elif where is None:
            where = "from the start: no checkpoint was written yet"
        name = signal.Signals(signum).name
        super().__init__(f"interrupted ({name}) at step {step}; continue {how} ({where})")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class Signals:
    """Records the first SIGINT or SIGTERM instead of dying of it, while installed (``install()``
    to ``restore()``). ``insist``: a second SIGINT raises KeyboardInterrupt at once (a user who
    presses Ctrl-C twice means it); under torchrun, where every worker gets torchrun's SIGTERM right
    after the terminal's SIGINT, pass False. Outside the main thread nothing is installed (Python
    delivers signals there only)."""

    def __init__(self, insist: bool) -> None:
        self.insist = insist
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> Signals:
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signum
        elif self.insist and signum == signal.SIGINT:
            raise KeyboardInterrupt

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)  # type: ignore[arg-type]
        self._previous.clear()
