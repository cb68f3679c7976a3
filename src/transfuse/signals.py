"""Termination signals as exceptions, so an interrupted command cleans up like Ctrl-C does.

SIGINT already raises ``KeyboardInterrupt``; SIGTERM (what ``timeout``, docker and Slurm send) and SIGHUP (a
closed terminal) would otherwise end the process at once, leaving the writer's temporary dir behind.  Inside
``exit_on_termination_signals()`` they raise ``Terminated`` in the main thread instead, so every ``with`` block
and ``finally`` runs (the writer removes its temp dir).  A second signal while cleaning up is ignored, so a
repeated ``kill`` cannot cut the cleanup short; SIGKILL cannot be caught, which is why the next writer for the
same target removes leftovers whose process is gone.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


class Terminated(BaseException):  # noqa: N818 - like KeyboardInterrupt, not an error of the program
    """Raised in the main thread when a termination signal arrives."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.signal_name = signal.Signals(signum).name
        super().__init__(f"terminated by {self.signal_name}")


@contextmanager
def exit_on_termination_signals() -> Iterator[None]:
    """Turn SIGTERM / SIGHUP into ``Terminated`` while the block runs (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired = False

    def handler(signum: int, frame: FrameType | None) -> None:
        nonlocal fired
        if fired:
            return  # already unwinding: let the cleanup finish
        fired = True
        raise Terminated(signum)

    previous = {sig: signal.signal(sig, handler) for sig in SIGNALS}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
