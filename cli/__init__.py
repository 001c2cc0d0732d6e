"""The `aico-node` command line: the only package that imports node, relay and simulations together."""

import os
import sys
import traceback

import typer
from rich.markup import escape

from cli import data, history, lifecycle, tools  # noqa: F401  (each registers its commands on the app)
from cli.common import app, console, first_of, settings, user_facing_errors

PROG_NAME = "aico-node"
USAGE_EXIT = 2
REFUSED_EXIT = 1


def main() -> None:
    """Run the `aico-node` command line; exit 2 for a usage error, 1 for a refused operation, never a traceback."""
    os.umask(0o077)  # every file the node writes in its home is the owner's alone
    sys.exit(run(sys.argv[1:]))


def run(args: list[str]) -> int:
    """Run the command line on `args` and return its exit code; errors are one or two lines on stderr."""
    command = typer.main.get_command(app)
    lifecycle.tune_interpreter()
    try:
        result = command.main(args, prog_name=PROG_NAME, standalone_mode=False)
    except typer.TyperException as error:  # click's usage errors (exit code 2) and its other refusals
        if type(error).__name__ == "NoArgsIsHelpError":  # a command group given no command: its help is the answer
            console.print(error.format_message(), markup=False, highlight=False)
        else:
            _say(error.format_message(), _usage_hint(error) if error.exit_code == USAGE_EXIT else None)
        return error.exit_code
    except typer.Abort:
        _say("aborted")
        return REFUSED_EXIT
    except Exception as error:
        if settings.debug:
            traceback.print_exc()
        explained = first_of(error, user_facing_errors())
        if explained is not None:
            _say(str(explained))
        elif isinstance(error, OSError):  # the machine refused: a full disk, a permission, a missing folder
            _say(f"{error.strerror or error}" + (f": {error.filename}" if error.filename else ""))
        else:
            _say(f"internal error: {type(error).__name__}: {error} (run with --debug for the traceback)")
        return REFUSED_EXIT
    return result if isinstance(result, int) else 0


def _usage_hint(error: typer.TyperException) -> str:
    """Where to read the right usage: the help of the command the error is about."""
    context = getattr(error, "ctx", None)
    command_path = context.command_path if context is not None else PROG_NAME
    return f"`{command_path} --help` shows how to use it"


def _say(message: str, hint: str | None = None) -> None:
    console.print(f"[red]error:[/red] {escape(message)}", highlight=False)
    if hint:
        console.print(hint, markup=False, highlight=False)
