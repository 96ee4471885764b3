"""CLI commands for the 'synth' area: `longitudinal synth OUT --patients N --seed S --preset tiny|default
[--treated-fraction F]`."""

from __future__ import annotations

from pathlib import Path

import typer

from longitudinal.commands._common import console, fail, print_locations, settings_of


def synth_cmd(
    ctx: typer.Context,
    out: Path | None = typer.Argument(None, help="BIDS folder to write (default: the workspace data location)."),
    patients: int = typer.Option(8, "--patients", "-n", min=1, help="Number of synthetic patients."),
    seed: int = typer.Option(0, "--seed", min=0, help="Cohort seed: the same seed gives the same cohort."),
    preset: str = typer.Option("default", "--preset", help="tiny (4 mm, for tests) | default (2 mm)."),
    treated_fraction: float = typer.Option(
        0.5, "--treated-fraction", min=0.0, max=1.0,
        help="Share of patients treated after their baseline scan (resection, radiotherapy, temozolomide); "
             "they get sub-*_treatments.tsv.",
    ),
) -> None:
    """Write a synthetic longitudinal glioma cohort (Fisher-Kolmogorov growth on MNI152) as BIDS; about half
    the patients are treated (``--treated-fraction``)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from longitudinal.synth import generate_cohort

    settings = settings_of(ctx)
    target = out if out is not None else settings.data_path
    print_locations(settings, ("home", "data") if out is None else ("home",))
    console.print(f"[bold]writing[/bold] {target}")
    with Progress(TextColumn("patients"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=False) as bar:
        task = bar.add_task("synth", total=patients)
        try:
            summary = generate_cohort(
                target, patients, seed, preset,
                progress=lambda done, total: bar.update(task, completed=done, total=total),
                channel_map=settings.bids_channel_map, treated_fraction=treated_fraction,
            )
        except (ValueError, RuntimeError) as exc:
            fail(str(exc))

    table = Table(title=f"synthetic cohort ({summary.preset}, seed {summary.seed})", title_justify="left")
    for col in ("subject", "visits", "whole ml (min-max)", "D_w mm²/day", "rho /day", "treated"):
        table.add_column(col, justify="right")
    for p in summary.patients:
        table.add_row(f"sub-{p.subject}", str(p.n_visits), f"{p.min_whole_ml:.1f} - {p.max_whole_ml:.1f}",
                      f"{p.d_white:.3f}", f"{p.rho:.4f}", "yes" if p.treated else "no")
    console.print(table)
    lo, hi = summary.volume_range_ml
    console.print(
        f"patients {summary.n_patients}  visits {summary.n_visits}  whole-tumour volume {lo:.1f}-{hi:.1f} ml  "
        f"({summary.seconds:.1f} s)  ->  {summary.out}"
    )


def register(app: typer.Typer) -> None:
    """Add `longitudinal synth` to the root app."""
    app.command("synth")(synth_cmd)
