"""The `longitudinal` command. Each command parses, makes one library call, and prints.

Commands live in longitudinal/commands/<area>.py, each exposing ``register(app)``; heavy libraries are
imported inside command bodies so `longitudinal --help` stays fast.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import typer

from longitudinal.settings import PseudonymKeyError, get_settings

app = typer.Typer(
    name="longitudinal",
    help="Longitudinal tumour-growth forecasting: synth, ingest, store, train, evaluate, forecast, stack.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

# One module per area; each owns its commands.
COMMAND_MODULES = ("synth", "ingest", "store", "train", "models", "forecast", "stack")


@app.callback()
def _root(
    ctx: typer.Context,
    home: Path | None = typer.Option(None, "--home", help="Workspace root (env LONGITUDINAL_HOME)."),
) -> None:
    from longitudinal.commands._common import fit_width

    fit_width()
    ctx.obj = get_settings(home=home)


for _name in COMMAND_MODULES:
    importlib.import_module(f"longitudinal.commands.{_name}").register(app)


def main() -> None:
    try:
        app()
    except PseudonymKeyError as exc:
        # Raised wherever the key is first needed; one clear line, not a traceback from deep inside ingest.
        from longitudinal.commands._common import err_console

        err_console.print(f"[bold red]error:[/bold red] {exc}")
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
