"""How the CLI ends: one line naming the cause and a fix, a non-zero exit, a traceback only with --debug."""

from __future__ import annotations

import logging
import signal
import sys
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import click

from model.errors import UserError
from model.interrupts import Terminated, raise_if_interrupted, signals_recorded

EXIT_USER_ERROR = 2
EXIT_UNEXPECTED = 1
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 128 + signal.SIGTERM  # 143, what a shell reports for a process killed by SIGTERM


@dataclass
class RunOptions:
    """The group's own options, as click parsed them: `run_cli` passes one in as click's `obj` and reads it
    back after the command, however the command ended."""

    debug: bool = False


def _set_debug(context: click.Context, _parameter: click.Parameter, debug: bool) -> None:
    context.ensure_object(RunOptions).debug = debug
    if not debug:  # tracer/exporter/coremltools warnings are for developers; --debug shows them
        warnings.filterwarnings("ignore")
        logging.disable(logging.WARNING)


# For the group that `run_cli` runs. Eager: parsed before the command's options, so the warnings are set first.
debug_option = click.option("--debug", is_flag=True, is_eager=True, expose_value=False, callback=_set_debug,
                            help="Show full tracebacks (and library warnings) on errors.")


def run_cli(group: click.Group, args: list[str] | None = None, until_exit: bool = False) -> int:
    """Run one command of `group` and return its exit code. `until_exit`: the caller is the process's entry
    point and exits with this code, so SIGINT/SIGTERM are then ignored, not put back (see `signals_recorded`)."""
    options = RunOptions()
    try:
        with signals_recorded(until_exit):
            return _exit_code(group, args, options)
    except (KeyboardInterrupt, Terminated) as late:
        # The handlers raise a command's first signal only: this one came while the command was already ending
        # (printing another error's line, or putting the handlers back). It ends as an interruption all the same.
        return _fail_for_signal(late, options.debug)


def _exit_code(group: click.Group, args: list[str] | None, options: RunOptions) -> int:
    try:
        return _command_code(group, args, options)
    except click.exceptions.Exit as done:
        return done.exit_code
    except click.Abort:  # click's name for a KeyboardInterrupt that reached it
        return _fail("interrupted", "", EXIT_INTERRUPTED, options.debug)
    except (KeyboardInterrupt, Terminated) as received:
        return _fail_for_signal(received, options.debug)
    except click.UsageError as error:
        command = error.ctx.command_path if error.ctx else "gemma-export"
        return _fail(error.format_message(), f"see `{command} --help`", EXIT_USER_ERROR, options.debug)
    except UserError as error:
        return _fail(error.cause, error.fix, EXIT_USER_ERROR, options.debug)
    except Exception as error:  # noqa: BLE001 — the last line of defence: one line, not a traceback
        return _fail(f"unexpected {type(error).__name__}: {error}", "rerun with --debug for the traceback",
                     EXIT_UNEXPECTED, options.debug)


def _command_code(group: click.Group, args: list[str] | None, options: RunOptions) -> int:
    try:
        # Without standalone mode click *returns* the code of ctx.exit(n) instead of raising it.
        return group.main(args=args, prog_name="gemma-export", standalone_mode=False, obj=options) or 0
    finally:
        # A recorded signal is why the command stopped, however it ended: a library may have swallowed the
        # exception (a success) or raised an error of its own while unwinding from it (exit 1, "unexpected").
        raise_if_interrupted()


def _fail_for_signal(received: BaseException, debug: bool) -> int:
    if isinstance(received, Terminated):
        return _fail("terminated (SIGTERM)", "", EXIT_TERMINATED, debug)
    return _fail("interrupted", "", EXIT_INTERRUPTED, debug)


def _fail(cause: str, fix: str, code: int, debug: bool) -> int:
    if debug:
        traceback.print_exc()
    message = " ".join(str(UserError(cause, fix)).split())
    click.echo(f"error: {message}", err=True)
    return code


def entry_point(group: click.Group) -> Callable[[], None]:
    def main() -> None:
        code = run_cli(group, until_exit=True)
        _forget_keyboard_interrupts_that_left_an_exec()
        sys.exit(code)
    return main


def _forget_keyboard_interrupts_that_left_an_exec() -> None:
    """CPython marks a KeyboardInterrupt that leaves an `exec()`/`eval()` of a string as unhandled, even when a
    caller catches it later, and a `python -m` run whose mark is set ends by killing itself with SIGINT instead
    of exiting with its code (CPython's "exit properly after an uncaught ^C", bpo-1054041). The ONNX exporter
    alone runs thousands of such execs (dataclasses, namedtuples, generated code), so a Ctrl-C landing in one
    turned exit 130 into a death by SIGINT. Each string exec clears the mark when it starts and sets it only
    if it ends by a KeyboardInterrupt; this one ends normally, and with the signals ignored from here on
    (`until_exit`) no later one can set the mark again."""
    exec("pass")
