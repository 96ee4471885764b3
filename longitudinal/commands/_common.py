"""Shared CLI helpers: one console, location printing, and clean failures without tracebacks."""

from __future__ import annotations

import os
from typing import NoReturn

import typer
from rich.console import Console
from rich.markup import escape

from longitudinal.settings import Settings


def output_width() -> int | None:
    """None (rich follows the terminal's width) when the process has a terminal or COLUMNS is set; otherwise, as
    in a CI log or ``> file``, a width at which whole table rows fit instead of being cut at 80 columns."""
    if os.environ.get("COLUMNS"):
        return None
    for fd in (1, 2, 0):
        try:
            os.get_terminal_size(fd)
            return None
        except OSError:
            continue
    return 160


console = Console(width=output_width())
err_console = Console(stderr=True, width=output_width())


def fit_width() -> None:
    """Set both consoles' width for this invocation (``output_width``): a process that runs several commands
    (a Python API caller, a test) sees each one's own COLUMNS and terminal, not those at import time."""
    for c in (console, err_console):
        c.width = output_width()  # type: ignore[assignment]  # None: rich measures the terminal / COLUMNS

# Library messages name Python arguments; a CLI user needs the option that does the same.
_CLI_WORDS = {
    "(use create=True to make one)": "(create one with `longitudinal ingest SOURCE --store URL`, or run `make demo`)",
    "use a new run folder or resume=False": "use another --run-dir, or --fresh to start over",
    "resume=False": "--fresh",
}


def cli_words(message: str) -> str:
    """``message`` with the Python-API advice it may carry replaced by the CLI options that do the same."""
    for api, cli in _CLI_WORDS.items():
        message = message.replace(api, cli)
    return message


def settings_of(ctx: typer.Context) -> Settings:
    """The Settings built by the root callback (falls back to the environment)."""
    obj = ctx.find_root().obj
    return obj if isinstance(obj, Settings) else Settings()


def with_store(settings: Settings, store: str | None) -> Settings:
    """``settings`` with a command's --store applied, so the locations printed are the ones used."""
    return settings.model_copy(update={"store": store}) if store else settings


def print_locations(settings: Settings, keys: tuple[str, ...] | None = None) -> None:
    """Print the locations a command uses, so a user always knows where things go."""
    locs = {k: v for k, v in settings.locations().items() if keys is None or k in keys}
    console.print("locations", markup=False)
    pad = max((len(k) for k in locs), default=0)
    for key, value in locs.items():
        # Whole paths on one line, however narrow the output: a cut path is no location.
        console.print(f" [bold]{key:<{pad}}[/bold]  {escape(value)}", soft_wrap=True)


def fail(message: str, code: int = 1) -> NoReturn:
    """Print a clear error (no traceback) and exit non-zero."""
    err_console.print(f"[bold red]error:[/bold red] {cli_words(message)}")
    raise typer.Exit(code)
