"""CLI commands for the 'store' area: `longitudinal store info|patients|verify|migrate [STORE]`."""

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
            "schema version": str(summary["schema_version"])
            + (" (read-only: run `longitudinal store migrate`)" if summary.get("read_only") else ""),
            "created by": str(summary["created_by"]),
            "patients": str(summary["patients"]),
            "sessions": str(summary["sessions"]),
            "treatment events": str(summary.get("treatment_events", 0)),
            "channels": ", ".join(summary["channels"]) or "-",
            "grid (z, y, x) voxels": ", ".join(summary["grids_zyx"]) or "-",
            "spacing (z, y, x) mm": ", ".join(summary["spacings_mm_zyx"]) or "-",
            "size on disk": _human_bytes(summary["size_bytes"]),
        }
        for key, value in rows.items():
            table.add_row(f"[bold]{key}[/bold]", value)
        console.print(table)

    @store_app.command("patients")
    def patients(ctx: typer.Context, store: str | None = STORE_ARG) -> None:
        """List the stored patients: pseudonym, scans, first and latest scan date (the store's shifted calendar),
        days between them and how many scans carry a tumour label."""
        from rich.table import Table

        cohort = _open(ctx, store, recover=False)
        ids = cohort.patient_ids()
        if not ids:
            console.print(f"{cohort.url} holds no patient yet: add some with `longitudinal ingest SOURCE`", soft_wrap=True)
            return
        table = Table(title=f"{len(ids)} patients", title_justify="left", caption_justify="left",
                      caption="dates: the store's shifted calendar (each patient's dates are moved by a secret "
                              "offset); forecast one with `longitudinal forecast PATIENT --in DAYS`")
        for col in ("patient", "scans", "first scan", "latest scan", "days", "labelled"):
            table.add_column(col, justify="left" if col == "patient" else "right", no_wrap=True)
        for pid in ids:
            sessions = cohort.sessions(pid)
            first, last = sessions[0], sessions[-1]
            table.add_row(pid, str(len(sessions)), (first.shifted_date or "-")[:10], (last.shifted_date or "-")[:10],
                          f"{last.days - first.days:.0f}", str(sum(s.has_label for s in sessions)))
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
        console.print(f"[green]OK[/green] {cohort.url}: no faults", soft_wrap=True)

    @store_app.command("migrate")
    def migrate(ctx: typer.Context, store: str | None = STORE_ARG) -> None:
        """Upgrade a store of an older schema version (v1: no treatments) to the current one, in place.

        Recovers abandoned writes and verifies first (any fault stops it, nothing changed); each patient gets
        an empty treatment history; the root's schema version is written last, in one atomic write, so a
        failure before leaves a sound old-version store and a rerun finishes. Stop older writers first.
        Exit 1 when the store cannot be migrated or is not sound afterwards.
        """
        from storage.store import MigrationError, migrate_store

        settings = with_store(settings_of(ctx), store)
        print_locations(settings, ("home", "store"))
        try:
            report = migrate_store(settings.store_url)
        except (FileNotFoundError, MigrationError, ValueError) as exc:
            fail(str(exc))
        except OSError as exc:  # e.g. StoreFullError ("disk full ..."): a rerun finishes the migration
            fail(f"migration interrupted: {exc}; the store is still at its old version, run migrate again")
        for step in report.steps:
            console.print(f"  {step}")
        if report.faults:
            for line in report.faults:
                err_console.print(f"  [red]FAULT[/red] {line}")
            fail(f"{len(report.faults)} fault(s) in {report.url} after the migration")
        what = (f"schema version {report.from_version} -> {report.to_version}" if report.migrated
                else f"already at schema version {report.to_version}")
        console.print(f"[green]OK[/green] {report.url}: {what}, no faults", soft_wrap=True)

    app.add_typer(store_app, name="store")
