"""Shared CLI helpers: one console, location printing, and clean failures without tracebacks."""

from __future__ import annotations

from typing import NoReturn

import typer
from rich.console import Console
from rich.table import Table

from longitudinal.settings import Settings

console = Console()
err_console = Console(stderr=True)


def settings_of(ctx: typer.Context) -> Settings:
    """The Settings built by the root callback (falls back to the environment)."""
    obj = ctx.find_root().obj
    return obj if isinstance(obj, Settings) else Settings()


def with_store(settings: Settings, store: str | None) -> Settings:
    """``settings`` with a command's --store applied, so the locations printed are the ones used."""
    return settings.model_copy(update={"store": store}) if store else settings


def print_locations(settings: Settings, keys: tuple[str, ...] | None = None) -> None:
    """Print the locations a command uses, so a user always knows where things go."""
    locs = settings.locations()
    table = Table(title="locations", show_header=False, box=None, title_justify="left")
    for key, value in locs.items():
        if keys is None or key in keys:
            table.add_row(f"[bold]{key}[/bold]", value)
    console.print(table)


def fail(message: str, code: int = 1) -> NoReturn:
    """Print a clear error (no traceback) and exit non-zero."""
    err_console.print(f"[bold red]error:[/bold red] {message}")
    raise typer.Exit(code)
