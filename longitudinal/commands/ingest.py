"""CLI commands for the 'ingest' area: ``longitudinal ingest SOURCE [--store STORE] [--workers N | --dask-address
tcp://HOST:PORT] [--allowed-root DIR] [--treatments FILE.csv] [--source auto|bids|manifest|dicom|lumiere]
[--lumiere-segmentation NAME|PATH]``.

The CLI twin of the ``ingest-cohort`` flow: both call ``longitudinal.ingest`` (this one through
``ingest_cohort``). Exit status: 0 when the run completed, even with quarantined sessions (their number is
printed); 1 when nothing could be ingested; 2 when the store could not be written. Refused treatment rows are printed with their file and line; they do
not change the exit status.
"""

from __future__ import annotations

from pathlib import Path

import typer

from longitudinal.commands._common import console, fail, print_locations, settings_of, with_store
from longitudinal.settings import SOURCE_KINDS, Settings


def register(app: typer.Typer) -> None:
    """Add this area's commands to the root app."""

    @app.command("ingest")
    def ingest(
        ctx: typer.Context,
        source: Path = typer.Argument(
            ..., help="BIDS folder, manifest CSV, folder of DICOM series, or LUMIERE folder (Patient-*/week-*)."),
        store: str | None = typer.Option(None, "--store", help="Cohort store URL (default: the workspace's)."),
        workers: int = typer.Option(1, "--workers", min=1, help="Patients processed in parallel."),
        spacing: float | None = typer.Option(None, "--spacing", min=0.1, help="Target isotropic spacing (mm)."),
        affine: bool = typer.Option(False, "--affine", help="Affine instead of rigid registration."),
        dask_address: str | None = typer.Option(
            None, "--dask-address", envvar="LONGITUDINAL_DASK_ADDRESS",
            help="Run patients on an existing Dask cluster (tcp://HOST:PORT of its scheduler) instead of threads; "
                 "the source (and a local store) must be at the same path on every worker.",
        ),
        allowed_root: Path | None = typer.Option(
            None, "--allowed-root",
            help="Read only files that resolve (symlinks followed) inside this folder; a manifest line naming "
                 "any other file is quarantined.",
        ),
        treatments: Path | None = typer.Option(
            None, "--treatments",
            help="CSV of treatment events: patient_id,date,treatment[,end_date] (treatment: surgery, "
                 "radiotherapy or chemotherapy; ISO dates; ids as in the source). BIDS subjects' "
                 "sub-*_treatments.tsv are read anyway.",
        ),
        source_kind: str | None = typer.Option(
            None, "--source",
            help="Source layout: auto, bids, manifest, dicom or lumiere (default: LONGITUDINAL_SOURCE_KIND, "
                 "else auto: detected).",
        ),
        lumiere_segmentation: str | None = typer.Option(
            None, "--lumiere-segmentation",
            help="LUMIERE mask: deepbratumia (default), deepbratumia-atlas (with the atlas-space images) or "
                 "hd-glio-auto, or a path relative to the week folder.",
        ),
    ) -> None:
        """Discover, de-identify, validate, register and store a cohort (idempotent; appends new sessions)."""
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
        from rich.table import Table

        from longitudinal.ingest import IngestConfig, ingest_cohort
        from longitudinal.registration.rigid import RegistrationConfig

        settings = settings_of(ctx)
        if spacing is not None:
            settings = settings.model_copy(update={"target_spacing_mm": spacing})
        settings = with_store(settings, store)
        print_locations(settings, ("store", "reports"))
        settings = _with_layout(settings, source_kind, lumiere_segmentation)
        if not source.exists():
            fail(f"source {source} does not exist")
        if treatments is not None and not treatments.exists():
            fail(f"treatments file {treatments} does not exist")
        if allowed_root is not None:
            if not allowed_root.is_dir():
                fail(f"--allowed-root {allowed_root} is not a folder")
            settings = settings.model_copy(update={"allowed_root": allowed_root.resolve()})
        if dask_address and workers > 1:
            fail("--workers sets local threads; with --dask-address the cluster's workers set the parallelism")
        if dask_address and "://" not in dask_address:
            fail(f"--dask-address must be a scheduler address such as tcp://HOST:8786, got {dask_address!r}")
        config = IngestConfig(registration=RegistrationConfig(kind="affine" if affine else "rigid"))
        if dask_address:
            console.print(f"[bold]dask[/bold] patients run on the cluster at {dask_address}")

        with Progress(
            TextColumn("[bold]ingest[/bold]"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("{task.description}"), console=console, transient=False,
            disable=not console.is_terminal,
        ) as bar:
            job = bar.add_task("patients", total=None)

            def progress(done: int, total: int, outcome) -> None:
                bar.update(job, completed=done, total=total, description=outcome.patient_id)

            try:
                report = ingest_cohort(source, settings.store_url, settings, workers=workers, progress=progress,
                                       config=config, dask_address=dask_address, treatments=treatments)
            except (OSError, ValueError) as exc:
                fail(f"ingest failed: {exc}", code=2)

        table = Table(title="ingest", show_header=False, box=None, title_justify="left")
        for key, value in report.summary().items():
            table.add_row(f"[bold]{key}[/bold]", str(value))
        console.print(table)
        for problem in report.problems:
            console.print(f"[yellow]source problem:[/yellow] {problem}")
        if report.quarantined:
            console.print(f"[yellow]{report.quarantined} session(s) quarantined[/yellow]; reasons in {report.report_path}", soft_wrap=True)
        if report.treatments_quarantined:
            console.print(f"[yellow]{report.treatments_quarantined} treatment row(s) refused[/yellow]:")
            for p in report.patients:
                for t in p.treatments:
                    if t.status == "quarantined":
                        console.print(f"  {p.patient_id}: {'; '.join(t.reasons)}", soft_wrap=True)
        code = report.exit_code()
        if code == 1:
            fail("nothing could be ingested (every session was quarantined or the source is empty)", code=1)
        if code == 2:
            for p in report.patients:
                if p.error:  # e.g. "StoreFullError: disk full (no space left on the store's device) ..."
                    console.print(f"[red]store write failed[/red] {p.patient_id}: {p.error}")
            fail(f"the store could not be written for {len(report.failed_patients)} patient(s)", code=2)


def _with_layout(settings: Settings, source_kind: str | None, lumiere_segmentation: str | None) -> Settings:
    """``settings`` with ``--source`` and ``--lumiere-segmentation`` applied; exits naming every bad value."""
    from longitudinal.ingest.lumiere import LumiereLayout, segmentation_settings

    problems: list[str] = []
    update: dict[str, object] = {}
    if source_kind is not None and source_kind not in SOURCE_KINDS:
        problems.append(f"--source {source_kind!r} is not one of {', '.join(SOURCE_KINDS)}")
    elif source_kind is not None:
        update["source_kind"] = source_kind
    if lumiere_segmentation is not None:
        try:
            update.update(segmentation_settings(lumiere_segmentation))
        except ValueError as exc:
            problems.append(str(exc))
    settings = settings.model_copy(update=update)
    if settings.source_kind == "lumiere" or lumiere_segmentation is not None:
        problems += LumiereLayout.of(settings).problems()
    if problems:
        fail("; ".join(problems))
    return settings
