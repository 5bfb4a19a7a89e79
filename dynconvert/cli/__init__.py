"""cli: the command line: this module holds the app, the error/exit wrapper, shared options; one module per command group.
May import: every stage and the API (the top of the stack); each command imports what it runs when it runs."""

from __future__ import annotations

import functools
import signal
import sys
from dataclasses import fields
from typing import List, Optional

import typer
from typer.core import TyperGroup

try:  # typer >= 0.22 carries its own copy of click
    from typer._click import exceptions as click_errors
except ImportError:  # pragma: no cover
    from click import exceptions as click_errors
from rich.console import Console
from rich.text import Text

from ..errors import DynError

# The order `dynconvert --help` lists the commands in (the command modules register them in another).
ORDER = ("convert", "report", "export", "bench", "verify", "archs", "version", "finetune", "eval", "demo")


class Commands(TyperGroup):
    """Usage errors (a missing argument, an unknown command or option) end in one `error:` line
    and exit 2, like every other error, instead of typer's multi-line box."""

    def list_commands(self, ctx):
        return sorted(self.commands, key=lambda n: ORDER.index(n) if n in ORDER else len(ORDER))

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        args = _optional_value(list(sys.argv[1:] if args is None else args), "export", "--onnx")
        try:
            rc = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click_errors.NoArgsIsHelpError as e:  # bare `dynconvert`: the help, as before
            typer.echo(e.format_message())
            rc = 0
        except click_errors.UsageError as e:
            where = e.ctx.command_path if e.ctx else "dynconvert"
            if where == "dynconvert" and args[:1] and args[0] in self.commands:  # errors raised while parsing options
                where += f" {args[0]}"
            msg = e.format_message().rstrip(".")
            typer.echo(f"error: {msg[:1].lower() + msg[1:]}; see `{where} --help`", err=True)
            rc = 2
        except click_errors.ClickException as e:
            typer.echo(f"error: {e.format_message()}", err=True)
            rc = e.exit_code
        except typer.Abort:  # end of input while a prompt waited
            typer.echo("error: aborted", err=True)
            rc = 1
        if standalone_mode:
            sys.exit(rc or 0)
        return rc


def _optional_value(args: list[str], command: str, option: str) -> list[str]:
    """Let ``command``'s ``option`` stand without its value (click options cannot): an empty value
    then asks for the default, derived from the input's name."""
    if args[:1] == [command] and option in args:
        i = args.index(option)
        if i + 1 == len(args) or args[i + 1].startswith("-"):
            args.insert(i + 1, "")
    return args


def default(options, name: str):
    """A field's default in an options dataclass: the one source of the CLI's defaults."""
    f = next(f for f in fields(options) if f.name == name)
    return f.default


def shown(options, name: str) -> str:
    """The default, for the --help of a flag that stays None unless given (so that a recipe can fill it)."""
    return f" [default: {default(options, name)}]"


app = typer.Typer(
    cls=Commands,
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Convert pretrained vision models into dynamics-based states (Pei & Wang, ICML 2023), "
    "fine-tune them, report the savings honestly and export for deployment.",
)
# Plain text: messages carry user data (paths, layer names) that rich markup would eat ("model[v2].dyn")
# or choke on ("[/x]"); colour comes from Text styles, never from markup inside a message.
console = Console(stderr=True, markup=False)
out = Console(markup=False)

def _on_sigterm(signum, frame):
    raise KeyboardInterrupt


def command(fn):
    """Register a CLI command whose user errors and interrupts end in one line and an exit code."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except DynError as e:
            console.print(Text.assemble(("error:", "red"), f" {e}"), highlight=False, soft_wrap=True)
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            console.print(Text.assemble(("interrupted", "red"), ": no partial output was written (an existing output is untouched)"))
            raise typer.Exit(130) from None

    return app.command()(wrapper)


# Options that several commands share, their help written once.
ORIGINAL_HELP = ("The checkpoint the .dyn was converted from (sha256-checked): needed to rebuild files converted from a "
                 "pickled module, TorchScript or a module in Python.")


def original_option(more: str = ""):
    return typer.Option(None, help=ORIGINAL_HELP + more)


def model_option():
    return typer.Option(None, help="The package.module:factory the file was converted with (needed for --model conversions).")


def trust_pickle_option():
    return typer.Option(False, "--trust-pickle", help="Allow a pickled/TorchScript --original: this RUNS CODE from the file.")


def _split(values: Optional[List[str]]) -> list[str]:
    return [p for v in values or [] for p in v.split(",") if p]


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _parse_size(text: str) -> tuple[int, int, int]:
    from ..io.data import parse_input_size

    return parse_input_size(text)


def main() -> None:
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        app()
    except KeyboardInterrupt:  # a signal landing outside a command (parsing flags, exiting): still exit 130, no traceback
        console.print(Text("interrupted", "red"))
        raise SystemExit(130) from None
    finally:
        # The command has finished (its output is whole or absent); a signal arriving while the
        # interpreter shuts down would only print a traceback from its threading module.
        _ignore_signals_on_the_way_out()


def _ignore_signals_on_the_way_out() -> None:
    """Ignore SIGINT/SIGTERM from here on. A signal can land between these very calls (its handler
    raises in the middle of them): the command is done by then, so that is retried, not reported."""
    while True:
        try:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            return
        except (KeyboardInterrupt, SystemExit):
            continue


# The command modules register their commands on `app` (they import the names above).
from . import convert, files, tools, train  # noqa: E402,F401
