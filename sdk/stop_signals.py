"""Stopping long work cleanly: Ctrl+C (SIGINT), SIGTERM and SIGHUP (the terminal or SSH session
closed) end a run between two units of work.

``dereflect video`` checks the flag between frames and finishes its file; training checks it
between steps and saves a checkpoint to resume from. Either way the command then exits with
128 + the signal's number (130, 143, 129), as a process killed by it would.
"""

from __future__ import annotations

import signal
import threading
from typing import Any, Dict, Optional

#: The signals that stop a run cleanly, by name; a handler is installed only over the default one
#: (``nohup`` ignores SIGHUP, and then it stays ignored).
SIGNAL_NAMES = ("SIGINT", "SIGTERM", "SIGHUP")


class StopSignals:
    """SIGINT, SIGTERM and SIGHUP set :attr:`received` (the first signal's name) instead of stopping the process.

    Installed only from the main thread and only over the default handlers, so an application's
    own handlers win. A second signal while the work is being wound up is ignored: winding up takes
    moments, and being killed then would lose what the run had made.
    """

    def __init__(self) -> None:
        self.received: Optional[str] = None
        self.previous: Dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for name in SIGNAL_NAMES:
                sig = getattr(signal, name, None)
                if sig is None:  # SIGHUP on Windows
                    continue
                default = signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL
                if signal.getsignal(sig) is default:
                    self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.received is None:
            self.received = signal.Signals(signum).name

    def __exit__(self, *_exc: Any) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def exit_status(name: str) -> int:
    """The exit status of a run stopped by signal ``name`` ("SIGINT": 130, "SIGTERM": 143, "SIGHUP": 129)."""
    return 128 + signal.Signals[name].value
