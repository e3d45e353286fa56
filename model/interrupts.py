"""Ctrl-C (SIGINT) and SIGTERM that are never lost, and that end a command the same way whenever they come.

Python turns SIGINT into KeyboardInterrupt at the next bytecode, wherever that is. Third-party code with a
bare `except:` swallows it: coremltools wraps its optional imports that way (`import transformers` in
coremltools/_deps takes seconds) and has more in its torch frontend, so a Ctrl-C half a second into a Core ML
export was eaten and the export went on to publish and exit 0. The handlers installed by `signals_recorded`
therefore also *record* the signal, and the places that must not go on after one — each export step, the
publishing of a bundle, the end of a command — call `raise_if_interrupted()`, which raises it again.

Only the first signal of a command is raised: its exception is already unwinding the command when a second
Ctrl-C comes, and raising that one too would cut the clean-up short or escape the CLI's handling, so that the
process ended by the signal (wait status -2) instead of with exit 130. Code that must run whole holds signals
with a flag the handler reads, not with `pthread_sigmask`: a mask holds a signal in the calling thread only,
and the kernel hands a process-directed signal to any thread that does not block it (onnxruntime's and
torch's workers), whose delivery then runs the Python handler in the main thread all the same. The handler
itself always runs in the main thread, whichever thread took the signal, so a flag it reads is enough.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

HANDLED = (signal.SIGINT, signal.SIGTERM)


class Terminated(BaseException):
    """SIGTERM as an exception, like KeyboardInterrupt for SIGINT: it unwinds every `with` block, so an
    export's staging folder is removed and its lock released. A BaseException, so that the `except
    Exception` of code that carries on past one broken backend does not swallow it."""


_received: signal.Signals | None = None  # the first SIGINT/SIGTERM since the handlers were installed
_holding = 0  # how many `signals_held` blocks are open: while any is, the handler records without raising


def _exception_for(received: signal.Signals) -> BaseException:
    return KeyboardInterrupt() if received == signal.SIGINT else Terminated()


def _record(signal_number: int, frame: object) -> None:
    global _received
    if _received is not None:
        return  # the first one is already stopping the command (or will, at the next raise_if_interrupted)
    _received = signal.Signals(signal_number)
    if not _holding:
        raise _exception_for(_received)


def raise_if_interrupted() -> None:
    """Raise the recorded SIGINT/SIGTERM again: one that some library caught must still stop the work."""
    if _received is not None:
        raise _exception_for(_received)


def _handlers_installed() -> bool:
    return signal.getsignal(signal.SIGTERM) is _record


@contextmanager
def signals_recorded(until_exit: bool = False) -> Iterator[None]:
    """Install the recording handlers for the block (main thread only: elsewhere Python refuses handlers);
    inside another such block, that one's handlers serve. SIGINT keeps being ignored where the parent ignores it
    (a background job), as Python's own handler does.

    When the block ends, the previous handlers are put back; with `until_exit` (the CLI process, whose exit
    code is decided when the block ends) both signals are ignored instead, for the rest of the process's life:
    Python puts SIGINT's default disposition back at interpreter shutdown, and a late Ctrl-C would then end
    the process by the signal instead of by the exit code it chose."""
    global _received, _holding
    if threading.current_thread() is not threading.main_thread() or _handlers_installed():
        yield
        return
    _received, _holding = None, 1  # one that comes while the handlers go in is recorded, not raised outside
    previous = {handled: signal.getsignal(handled) for handled in HANDLED}
    signal.signal(signal.SIGTERM, _record)
    if previous[signal.SIGINT] is signal.default_int_handler:
        signal.signal(signal.SIGINT, _record)
    try:
        _holding = 0
        raise_if_interrupted()
        yield
    finally:
        _holding = 1  # a handler still pending runs inside signal.signal() below: it must only record
        for handled in HANDLED:
            if signal.getsignal(handled) is _record:
                signal.signal(handled, signal.SIG_IGN if until_exit else previous[handled])
        if not until_exit:
            _received, _holding = None, 0


@contextmanager
def signals_held() -> Iterator[None]:
    """Record SIGINT/SIGTERM during the block without raising them there."""
    global _holding
    _holding += 1
    try:
        yield
    finally:
        _holding -= 1


@contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM until the block ends: the two renames of a swap, or a cleanup, then finish whole and
    an interruption that came during the block is raised right after it (one that came before is already
    being raised, or will be at the next `raise_if_interrupted`)."""
    with signals_recorded():  # the CLI's when it runs one; a library caller gets them for the block
        received_before = _received
        with signals_held():
            yield
        arrived_during = _received if received_before is None and not _holding else None
    if arrived_during is not None:
        raise _exception_for(arrived_during)
