"""CLI commands for the 'store' area: `longitudinal store info|verify [STORE]`."""

from __future__ import annotations

import typer

from longitudinal.commands._common import console, err_console, fail, print_locations, settings_of, with_store

STORE_ARG = typer.Argument(None, help="Cohort store URL (path or s3://...); default: the settings' store.")


def _human_bytes(n: int) -> str:
    if n < 0:
        return "unknown"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1024
    return f"{n} B"


def _open(ctx: typer.Context, store: str | None, recover: bool):  # noqa: ANN202 (CohortStore, imported lazily)
    """The store named on the command line (or in settings), after printing the locations; clean failure."""
    from storage.store import CohortStore

    settings = settings_of(ctx)
    settings = with_store(settings, store)
    print_locations(settings, ("home", "store"))
    try:
        return CohortStore.open(settings.store_url, recover=recover)
    except (FileNotFoundError, ValueError) as exc:
        fail(str(exc))


def register(app: typer.Typer) -> None:
    """Add the `store` command group to the root app."""
    store_app = typer.Typer(help="Inspect and check the chunked Zarr cohort store.", no_args_is_help=True)

    @store_app.command("info")
    def info(ctx: typer.Context, store: str | None = STORE_ARG) -> None:
        """Summarise the store: patients, sessions, channels, grid, spacing, size, schema version."""
        from rich.table import Table

        summary = _open(ctx, store, recover=False).info()
        table = Table(title="cohort store", show_header=False, title_justify="left")
        rows = {
            "url": summary["url"],
            "schema version": str(summary["schema_version"]),
            "created by": str(summary["created_by"]),
            "patients": str(summary["patients"]),
            "sessions": str(summary["sessions"]),
            "channels": ", ".join(summary["channels"]) or "-",
            "grid (z, y, x) voxels": ", ".join(summary["grids_zyx"]) or "-",
            "spacing (z, y, x) mm": ", ".join(summary["spacings_mm_zyx"]) or "-",
            "size on disk": _human_bytes(summary["size_bytes"]),
        }
        for key, value in rows.items():
            table.add_row(f"[bold]{key}[/bold]", value)
        console.print(table)

    @store_app.command("verify")
    def verify(
        ctx: typer.Context,
        store: str | None = STORE_ARG,
        repair: bool = typer.Option(
            False, "--repair", help="First finish or roll back writes abandoned by crashed writers."
        ),
    ) -> None:
        """Check schema, arrays, time axis, index consistency and data checksums; exit 1 on any fault."""
        cohort = _open(ctx, store, recover=repair)
        problems = cohort.verify()
        if problems:
            for line in problems:
                err_console.print(f"  [red]FAULT[/red] {line}")
            fail(f"{len(problems)} fault(s) in {cohort.url}")
        console.print(f"[green]OK[/green] {cohort.url}: no faults")

    app.add_typer(store_app, name="store")
