"""CLI command for the 'forecast' area: `longitudinal forecast PATIENT (--at DATE | --in DAYS)... [--plan ...]`.

The CLI twin of the Prefect flow ``forecast-patient`` (flows/forecast.py): both call
``longitudinal.forecast.forecast_patient``. Expected failures print one message and exit 2 (a query to change:
bad dates, days or scan arguments) or 1 (unknown patient, no model, channel mismatch, unreadable store).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from longitudinal.commands._common import console, fail, print_locations, settings_of, with_store


def _ml(v: float) -> str:
    """Volumes to 4 significant digits (2 decimals below 10 ml) so the table fits 80 columns."""
    return f"{v:.2f}" if abs(v) < 10 else f"{v:.4g}"


def _table(result: Any, queries: list[Any], under: str) -> Any:
    """The volume table of ``queries`` (the forecasts under one treatment history, named by ``under``)."""
    from rich import box
    from rich.table import Table

    version = f" v{result.version}" if result.version else ""
    calendars = sorted({q.calendar for q in queries if q.calendar})
    table = Table(title=f"forecast {result.patient} ({result.model}{version}, {result.n_samples} samples){under}",
                  title_justify="left", box=box.SIMPLE_HEAD,
                  caption=f"dates: {', '.join(calendars)} calendar" if calendars else None, caption_justify="left")
    for col in ("day", "+days", "date", "tumour", "median ml", "80%", "95%"):
        table.add_column(col, justify="right", no_wrap=True)
    for q in queries:
        for i, (kind, v) in enumerate((("whole", q.volume_whole_ml), ("enhancing", q.volume_enhancing_ml))):
            lead = [f"{q.days:.0f}", f"{q.days_after_last_scan:+.0f}", q.date or "-"] if i == 0 else ["", "", ""]
            if i == 0 and not q.trusted:
                lead[0] += " !"
            table.add_row(*lead, kind, _ml(v.median), f"{_ml(v.lo80)}-{_ml(v.hi80)}", f"{_ml(v.lo95)}-{_ml(v.hi95)}",
                          style=None if q.trusted else "red")
        table.add_section()
    return table


def _plan_line(event: Any) -> str:
    """One planned event for the user: days since baseline and, where the patient has dates, the dates."""
    dates = event.start_date if event.end_days <= event.start_days else f"{event.start_date} to {event.end_date}"
    return event.describe_days() + (f" ({dates}, {event.calendar} calendar)" if event.start_date else "")


def print_forecast_table(result: Any) -> None:
    """Two rows per query (whole tumour, enhancing core): days, days after the latest scan, date, volume median
    and the 80% / 95% intervals in ml; fits 80 columns. A query whose forecast cannot be trusted (the tumour does
    not fit the model's field of view) is marked ``!`` in red, with its reasons printed under the table. With a
    treatment plan: the planned events, then one table under the recorded history and one under the plan."""
    from rich.markup import escape

    planned = [q.counterfactual for q in result.queries if q.counterfactual is not None]
    if planned:
        console.print("[bold]counterfactual plan[/bold] (added to the recorded treatment history):")
        for e in result.plan:
            console.print(f"  - {escape(_plan_line(e))}")
        console.print(_table(result, result.queries, ": recorded history"))
        console.print(_table(result, planned, ": under the plan"))
    else:
        console.print(_table(result, result.queries, ""))
    bad = [q for q in [*result.queries, *planned] if not q.trusted]
    if bad:
        when = ", ".join(f"day {q.days:.0f} ({q.days_after_last_scan:+.0f} d)" for q in bad)
        console.print(f"[bold red]warning: not trustworthy at {when}:[/bold red]")
        for reason in dict.fromkeys(r for q in bad for r in q.warnings()):
            console.print(f"[red]  - {escape(reason)}[/red]")
        console.print("[red]The model sees a crop around the tumour; a tumour larger than it, or growing past "
                      "it, is cut at the crop's border, so these volumes are too small. Do not use them.[/red]")
    # Under a plan a query can change treatment stratum, and so what serves it.
    for label, queries in (("", result.queries), (" under the plan", planned)):
        when = ", ".join(f"{q.days_after_last_scan:+.0f} d: {q.served_by}" for q in queries if q.served_by != "model")
        if when:
            console.print(f"served{label} by a simple baseline at {when} (the model did worse at that horizon, "
                          "with or without a treatment in the gap as here, on its validation patients)"
                          + ("; these baselines ignore treatment" if planned else ""))
    whole = result.intervals.get("whole") or {}
    used = sorted({q.interval_calibration for q in result.queries if q.interval_calibration}
                  | {q.counterfactual.interval_calibration for q in result.queries
                     if q.counterfactual is not None and q.counterfactual.interval_calibration})
    for key in used:
        basis = result.intervals.get(key) or {}
        stratum = {"whole": "", "whole:treated": ", treatment in the gap",
                   "whole:untreated": ", no treatment in the gap"}.get(key, f", {key}")
        console.print(f"volume intervals{stratum}: calibrated on {basis.get('calibration_targets')} targets of "
                      f"{basis.get('calibration_patients')} held-out patients ({basis.get('method')})")
    if not used and whole and not whole.get("calibrated"):
        console.print(f"volume intervals: {whole['method']}, {whole['note']}")


def register(app: typer.Typer) -> None:
    """Add `longitudinal forecast` to the root app."""

    @app.command()
    def forecast(
        ctx: typer.Context,
        patient: str = typer.Argument(..., help="Patient pseudonym in the store (or its raw id where this site's "
                                                "pseudonym key is present; then --at dates are real dates)."),
        store: str | None = typer.Option(None, "--store", help="Cohort store URL (default: settings)."),
        at: list[str] = typer.Option([], "--at", help="Query date YYYY-MM-DD (repeatable). With a pseudonym: the "
                                                      "store's shifted calendar; with a raw id or --scan: real."),
        in_days: list[float] = typer.Option([], "--in", help="Query DAYS after the latest scan (repeatable)."),
        day: list[float] = typer.Option([], "--days-since-baseline", "--day",
                                        help="Query DAYS since the baseline scan (repeatable)."),
        model: str | None = typer.Option(None, "--model", help="NAME@ALIAS, NAME/VERSION, models:/..., runs:/... "
                                                               "or a checkpoint (default <registered>@champion)."),
        samples: int = typer.Option(32, "--samples", help="Samples per query (intervals need several)."),
        out: Path | None = typer.Option(None, "--out", help="Output folder (default: forecasts/<patient>)."),
        scan: list[str] = typer.Option([], "--scan", help="DATE:CHANNEL=PATH of a patient in no store "
                                                          "(repeatable; CHANNEL T1c, FLAIR or label)."),
        scans_csv: Path | None = typer.Option(None, "--scans-csv", help="CSV date,channel,path[,label_path] of a "
                                                                        "patient in no store."),
        seed: int = typer.Option(0, "--seed", help="Sampling seed."),
        plan: list[str] = typer.Option([], "--plan", help="Planned treatment KIND@START[:END] (repeatable; KIND "
                                                          "surgery, radiotherapy or chemotherapy; START/END dates "
                                                          "as --at, or +DAYS after the latest scan): also forecast "
                                                          "under the recorded history plus the plan."),
    ) -> None:
        """Forecast a patient at future dates: NIfTI maps in the native space of the latest scan, volumes with
        80%/95% intervals (JSON), a plot, and a table here."""
        from rich.markup import escape

        from longitudinal.forecast import ForecastError, ForecastRequest, Queries, forecast_patient
        from longitudinal.predict.plan import parse_plan

        settings = with_store(settings_of(ctx), store)
        print_locations(settings, ("store", "forecasts", "mlflow"))
        try:
            request = ForecastRequest(
                patient, Queries.of(in_days, at, day), store_url=store, model_ref=model, n_samples=samples,
                out_dir=out, scans=tuple(scan), scans_csv=scans_csv, seed=seed, plan=parse_plan(plan),
            )
            result = forecast_patient(settings, request)
        except ForecastError as exc:
            fail(escape(str(exc)), exc.exit_code)
        print_forecast_table(result)
        console.print(f"[bold]files[/bold]   {result.out_dir}", soft_wrap=True)
        console.print(f"[bold]summary[/bold] {result.summary_path}", soft_wrap=True)
        console.print(f"[bold]plot[/bold]    {result.plot_path}", soft_wrap=True)
        console.print(f"native grid of {result.native.session}: shape {list(result.native.shape)}; "
                      f"{result.seconds:.2f} s")
