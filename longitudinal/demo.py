"""`make demo`: the main job end to end on the embedded synthetic cohort, with progress throughout.

synth (Fisher-Kolmogorov cohort as BIDS) -> ingest (validate, de-identify, register, Zarr store) -> train
(tracked in MLflow, registered, gated) -> forecast a held-out patient -> print where every output is.

Sizes are chosen to finish in about 10 minutes on 2 CPU cores; override with LONGITUDINAL_DEMO_PATIENTS and
LONGITUDINAL_DEMO_TRAIN_S. Re-running reuses the cohort and the store (ingest is idempotent) and resumes or
reuses the training run.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.panel import Panel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from longitudinal.settings import Settings

console = Console()

DEMO_PATIENTS = int(os.environ.get("LONGITUDINAL_DEMO_PATIENTS", "14"))
DEMO_TRAIN_S = float(os.environ.get("LONGITUDINAL_DEMO_TRAIN_S", "120"))
# Forecast samples per evaluation target: enough for intervals, few enough to keep the demo short.
DEMO_EVAL_SAMPLES = 4
DEMO_SEED = 7


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console,
    )


def _step(n: int, title: str) -> None:
    console.rule(f"[bold cyan]{n}/5  {title}")


def run_synth(settings: Settings) -> Path:
    """Generate the synthetic cohort once; a marker records its parameters so reruns reuse it."""
    from longitudinal.synth import generate_cohort

    out = settings.data_path
    marker = out / ".demo-cohort.json"
    params = {"patients": DEMO_PATIENTS, "seed": DEMO_SEED, "preset": "default"}
    if marker.exists() and json.loads(marker.read_text()) == params:
        console.print(f"cohort already generated at {out} ({DEMO_PATIENTS} patients), reusing it")
        return out
    with _progress() as prog:
        task = prog.add_task("synthesising patients", total=DEMO_PATIENTS)
        summary = generate_cohort(out, DEMO_PATIENTS, DEMO_SEED, preset="default",
                                  progress=lambda done, total: prog.update(task, completed=done))
    table = Table(title="synthetic cohort")
    for col in ("subject", "visits", "whole volume ml (min-max)", "D_w mm²/day", "rho /day"):
        table.add_column(col)
    for row in summary.patients:
        table.add_row(row.subject, str(row.n_visits), f"{row.min_whole_ml:.1f} - {row.max_whole_ml:.1f}",
                      f"{row.d_white:.3f}", f"{row.rho:.3f}")
    console.print(table)
    marker.write_text(json.dumps(params))
    return out


def run_ingest(settings: Settings, source: Path) -> None:
    from longitudinal.ingest import ingest_cohort

    with _progress() as prog:
        task = prog.add_task("ingesting patients", total=None)

        def progress(done: int, total: int, *_: object) -> None:
            prog.update(task, completed=done, total=total)

        report = ingest_cohort(source, settings.store_url, settings, workers=2, progress=progress)
    console.print(
        f"stored {report.stored} sessions, skipped {report.skipped} already present, "
        f"quarantined {report.quarantined} (report: {report.report_path})"
    )
    if report.exit_code() != 0:
        raise SystemExit(f"ingest failed: {report.problems or report.failed_patients}")


def run_train(settings: Settings):  # noqa: ANN201 (TrainOutcome; imported lazily)
    from longitudinal.tracking.run import run_training
    from longitudinal.training.config import load_train_config

    # The tuned default configuration, with only the wall-clock budget cut down for the demo.
    cfg = load_train_config(budget_s=DEMO_TRAIN_S)
    console.print(f"training {cfg.model} for at most {DEMO_TRAIN_S:.0f} s on the CPU (tracked in MLflow)")
    outcome = run_training(settings, settings.store_url, cfg, eval_samples=DEMO_EVAL_SAMPLES)
    table = Table(title="held-out evaluation (test split): model vs baselines")
    for col in ("model", "horizon", "n", "dice_whole", "volume_error_ml"):
        table.add_column(col)
    for row in outcome.test_rows:
        table.add_row(str(row["model"]), str(row["horizon"]), str(row["n"]), f"{row['dice_whole']:.3f}",
                      f"{row['volume_error_ml']:.2f}")
    console.print(table)
    console.print(f"MLflow run {outcome.run_id}; registered {outcome.registered_name} v{outcome.version} "
                  f"aliases {outcome.aliases}")
    return outcome


def run_forecast(settings: Settings, outcome) -> object:  # noqa: ANN001
    from longitudinal.forecast import ForecastRequest, Queries, forecast_patient

    split = json.loads((outcome.run_dir / "split.json").read_text())
    patient = sorted(split["test"])[0]
    model_ref = f"{outcome.registered_name}/{outcome.version}"
    console.print(f"forecasting held-out patient {patient} with {model_ref} at +90, +180 and +365 days")
    from longitudinal.commands.forecast import print_forecast_table

    request = ForecastRequest(patient, Queries(in_days=(90.0, 180.0, 365.0)), store_url=settings.store_url,
                              model_ref=model_ref, n_samples=32)
    result = forecast_patient(settings, request)
    print_forecast_table(result)
    return result


def main() -> None:
    settings = Settings()
    t0 = time.perf_counter()
    console.print(Panel.fit(f"longitudinal demo: {DEMO_PATIENTS} synthetic patients, workspace {settings.home_dir}"))
    _step(1, "synthesise a longitudinal glioma cohort (BIDS)")
    source = run_synth(settings)
    _step(2, "ingest: validate, de-identify, register, store")
    run_ingest(settings, source)
    _step(3, "train, evaluate against baselines, track, register")
    outcome = run_train(settings)
    _step(4, "forecast a held-out patient")
    result = run_forecast(settings, outcome)
    _step(5, "where everything is")
    out = Table(show_header=False, box=None)
    out.add_column(style="bold", no_wrap=True)
    out.add_column(overflow="fold")
    out.add_row("cohort (BIDS)", str(source))
    out.add_row("store", settings.store_url)
    out.add_row("ingest reports", str(settings.reports_path))
    out.add_row("training run", str(outcome.run_dir))
    mlflow_bin = Path(sys.executable).parent / "mlflow"
    out.add_row("MLflow UI", f"{mlflow_bin} ui --backend-store-uri {settings.tracking_uri} "
                "--port 5000  (then open http://127.0.0.1:5000)")
    out.add_row("forecast files", str(result.out_dir))
    out.add_row("forecast plot", str(result.plot_path))
    console.print(out)
    console.print(f"[green]demo finished in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
