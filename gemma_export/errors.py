"""How the CLI ends: one line naming the cause and a fix, a non-zero exit, a traceback only with --debug."""

from __future__ import annotations

import logging
import signal
import sys
import warnings
import traceback
from collections.abc import Callable

import click

from model.errors import UserError
from model.interrupts import Terminated, raise_if_interrupted, signals_recorded

EXIT_USER_ERROR = 2
EXIT_UNEXPECTED = 1
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 128 + signal.SIGTERM  # 143, what a shell reports for a process killed by SIGTERM


def run_cli(group: click.Group, args: list[str] | None = None) -> int:
    debug = "--debug" in (sys.argv[1:] if args is None else args)
    if not debug:  # tracer/exporter/coremltools warnings are for developers; --debug shows them
        warnings.filterwarnings("ignore")
        logging.disable(logging.WARNING)
    try:
        with signals_recorded():
            # Without standalone mode click *returns* the code of ctx.exit(n) instead of raising it.
            code = group.main(args=args, prog_name="gemma-export", standalone_mode=False) or 0
            raise_if_interrupted()  # a Ctrl-C that a library swallowed must not end as a success
            return code
    except click.exceptions.Exit as done:
        return done.exit_code
    except click.Abort:
        return _fail("interrupted", "", EXIT_INTERRUPTED, debug)
    except KeyboardInterrupt:
        return _fail("interrupted", "", EXIT_INTERRUPTED, debug)
    except Terminated:
        return _fail("terminated (SIGTERM)", "", EXIT_TERMINATED, debug)
    except click.UsageError as error:
        command = error.ctx.command_path if error.ctx else "gemma-export"
        return _fail(error.format_message(), f"see `{command} --help`", EXIT_USER_ERROR, debug)
    except UserError as error:
        return _fail(error.cause, error.fix, EXIT_USER_ERROR, debug)
    except Exception as error:  # noqa: BLE001 — the last line of defence: one line, not a traceback
        return _fail(f"unexpected {type(error).__name__}: {error}", "rerun with --debug for the traceback",
                     EXIT_UNEXPECTED, debug)


def _fail(cause: str, fix: str, code: int, debug: bool) -> int:
    if debug:
        traceback.print_exc()
    message = " ".join(f"{cause}; {fix}".split()) if fix else " ".join(cause.split())
    click.echo(f"error: {message}", err=True)
    return code


def entry_point(group: click.Group) -> Callable[[], None]:
    def main() -> None:
        sys.exit(run_cli(group))
    return main
