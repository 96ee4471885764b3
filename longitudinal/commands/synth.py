"""CLI commands for the 'synth' area: `longitudinal synth OUT --patients N --seed S --preset tiny|default|hard
[--treated-fraction F] [--layout bids|lumiere]`."""

from __future__ import annotations

from pathlib import Path

import typer

from longitudinal.commands._common import console, fail, print_locations, settings_of

LAYOUTS = ("bids", "lumiere")


def synth_cmd(
    ctx: typer.Context,
    out: Path | None = typer.Argument(
        None, help="Folder to write (default: the workspace data location; '<it>-lumiere' for --layout lumiere)."),
    patients: int = typer.Option(8, "--patients", "-n", min=1, help="Number of synthetic patients."),
    seed: int = typer.Option(0, "--seed", min=0, help="Cohort seed: the same seed gives the same cohort."),
    preset: str = typer.Option("default", "--preset",
                               help="tiny (4 mm, for tests) | default (2 mm) | hard (2 mm; tumours past 150 ml, "
                                    "wide resections, strong bias)."),
    treated_fraction: float = typer.Option(
        0.5, "--treated-fraction", min=0.0, max=1.0,
        help="Share of patients treated after their baseline scan (resection, radiotherapy, temozolomide); "
             "they get sub-*_treatments.tsv.",
    ),
    layout: str = typer.Option(
        "bids", "--layout",
        help="bids | lumiere (Imaging/Patient-*/week-*/ with CT1/FLAIR and a DeepBraTumIA-coded mask; "
             "treatments.csv and groundtruth.json beside Imaging/).",
    ),
) -> None:
    """Write a synthetic longitudinal glioma cohort (Fisher-Kolmogorov growth on MNI152) as BIDS, or in the
    LUMIERE layout; about half the patients are treated (``--treated-fraction``)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from longitudinal.synth import generate_cohort, write_lumiere_cohort

    if layout not in LAYOUTS:
        fail(f"--layout {layout!r} is not one of {', '.join(LAYOUTS)}")
    settings = settings_of(ctx)
    default = settings.data_path if layout == "bids" else settings.data_path.with_name(
        settings.data_path.name + "-lumiere")
    target = out if out is not None else default
    print_locations(settings, ("home", "data") if out is None else ("home",))
    console.print(f"[bold]writing[/bold] {target}")
    folders: dict[str, list[str]] = {}
    with Progress(TextColumn("patients"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=False) as bar:
        task = bar.add_task("synth", total=patients)

        def progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        try:
            if layout == "lumiere":
                written = write_lumiere_cohort(
                    target, patients, seed, preset, progress, treated_fraction=treated_fraction,
                    channel_map=settings.lumiere_channel_map, segmentation=settings.lumiere_segmentation,
                )
                summary, folders = written.summary, written.folders
                summary.out = written.out
            else:
                summary = generate_cohort(target, patients, seed, preset, progress=progress,
                                          channel_map=settings.bids_channel_map, treated_fraction=treated_fraction)
        except (ValueError, RuntimeError) as exc:
            fail(str(exc))

    table = Table(title=f"synthetic cohort ({summary.preset}, seed {summary.seed})", title_justify="left")
    for col in ("subject", "visits", "whole ml (min-max)", "D_w mm²/day", "rho /day", "treated"):
        table.add_column(col, justify="right")
    for p in summary.patients:
        name = f"Patient-{p.subject}" if layout == "lumiere" else f"sub-{p.subject}"
        table.add_row(name, str(p.n_visits), f"{p.min_whole_ml:.1f} - {p.max_whole_ml:.1f}",
                      f"{p.d_white:.3f}", f"{p.rho:.4f}", "yes" if p.treated else "no")
    console.print(table)
    for name, weeks in folders.items():
        console.print(f"{name}: {' '.join(weeks)}", soft_wrap=True)
    lo, hi = summary.volume_range_ml
    console.print(
        f"patients {summary.n_patients}  visits {summary.n_visits}  whole-tumour volume {lo:.1f}-{hi:.1f} ml  "
        f"({summary.seconds:.1f} s)  ->  {summary.out}"
    )


def register(app: typer.Typer) -> None:
    """Add `longitudinal synth` to the root app."""
    app.command("synth")(synth_cmd)
