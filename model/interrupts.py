"""Ctrl-C (SIGINT) and SIGTERM that are never lost.

Python turns SIGINT into KeyboardInterrupt at the next bytecode, wherever that is. Third-party code with a
bare `except:` swallows it: coremltools wraps its optional imports that way (`import transformers` in
coremltools/_deps takes seconds) and has more in its torch frontend, so a Ctrl-C half a second into a Core ML
export was eaten and the export went on to publish and exit 0. The handlers installed by `signals_recorded`
therefore also *record* the signal, and the places that must not go on after one — each export step, the
publishing of a bundle, the end of a command — call `raise_if_interrupted()`, which raises it again.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class Terminated(BaseException):
    """SIGTERM as an exception, like KeyboardInterrupt for SIGINT: it unwinds every `with` block, so an
    export's staging folder is removed and its lock released. A BaseException, so that the `except
    Exception` of code that carries on past one broken backend does not swallow it."""


_received: signal.Signals | None = None


def _exception_for(received: signal.Signals) -> BaseException:
    return KeyboardInterrupt() if received == signal.SIGINT else Terminated()


def _record_and_raise(signal_number: int, frame: object) -> None:
    global _received
    _received = signal.Signals(signal_number)
    raise _exception_for(_received)


def raise_if_interrupted() -> None:
    """Raise the recorded SIGINT/SIGTERM again: one that some library caught must still stop the work."""
    if _received is not None:
        raise _exception_for(_received)


@contextmanager
def signals_recorded() -> Iterator[None]:
    """Install the recording handlers for the block (main thread only: elsewhere Python refuses handlers).
    SIGINT keeps being ignored where the parent ignores it (a background job), as Python's own handler does."""
    global _received
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _received = None
    previous_term = signal.signal(signal.SIGTERM, _record_and_raise)
    previous_int = signal.getsignal(signal.SIGINT)
    if previous_int is signal.default_int_handler:
        signal.signal(signal.SIGINT, _record_and_raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous_term)
        signal.signal(signal.SIGINT, previous_int)
        _received = None


@contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM until the block ends: the two renames of a swap, or a cleanup, then finish whole and
    the interruption is raised right after (the kernel keeps a blocked signal pending)."""
    if not hasattr(signal, "pthread_sigmask"):  # Windows
        yield
        return
    held = {signal.SIGINT, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
