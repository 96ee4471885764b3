"""CLI commands for the 'train' area: `longitudinal train`, `longitudinal calibrate` and `longitudinal evaluate`."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import typer

from longitudinal.commands._common import console, fail, print_locations, settings_of, with_store


def print_evaluation_table(rows: list[dict[str, Any]], title: str = "forecast evaluation") -> None:
    """Per-horizon table: one line per (horizon bin, model); skill columns are against LCI. cov80/cov95/CRPS
    are the calibrated volume intervals of a sampled model (raw cov: its samples as drawn)."""
    from rich.console import Console
    from rich.table import Table

    cols = [("n", "n", "{:d}"), ("dice_whole", "Dice WT", "{:.3f}"), ("dice_enhancing", "Dice EC", "{:.3f}"),
            ("hd95_mm", "HD95 mm", "{:.2f}"), ("volume_error_ml", "|dV| ml", "{:.3f}"), ("mse", "MSE", "{:.4f}"),
            ("ssim", "SSIM", "{:.3f}"), ("coverage80", "cov80", "{:.2f}"), ("coverage95", "cov95", "{:.2f}"),
            ("crps_ml", "CRPS ml", "{:.3f}"), ("coverage80_raw", "raw cov80", "{:.2f}"),
            ("coverage95_raw", "raw cov95", "{:.2f}"), ("ged", "GED", "{:.3f}"), ("skill_dice_whole", "skill Dice", "{:+.2f}"),
            ("skill_volume_error_ml", "skill |dV|", "{:+.2f}")]
    present = [c for c in cols if any(c[0] in r for r in rows)]
    table = Table(title=title, title_justify="left")
    table.add_column("horizon (days)")
    table.add_column("model")
    for _, head, _ in present:
        table.add_column(head, justify="right")
    last = None
    for r in rows:
        cells = []
        for key, _, fmt in present:
            v = r.get(key)
            if v is None or (isinstance(v, float) and math.isnan(v)):
                cells.append("-")
            else:
                cells.append(fmt.format(int(v)) if fmt == "{:d}" else fmt.format(v))
        if last is not None and r["horizon"] != last:
            table.add_section()
        last = r["horizon"]
        table.add_row(r["horizon"], r["model"], *cells)
    # Piped output (logs, benchmarks) would squeeze the wide table into 80 columns: print it at full width.
    out = console if console.is_terminal else Console(width=max(console.width, 200))
    out.print(table)


def register(app: typer.Typer) -> None:
    """Add `train`, `calibrate` and `evaluate` to the root app."""

    @app.command()
    def train(
        ctx: typer.Context,
        store: str | None = typer.Option(None, "--store", help="Cohort store URL (default: settings)."),
        model: str | None = typer.Option(None, "--model", help="Model kind: tfm, np, lci, linear."),
        config: Path | None = typer.Option(None, "--config", exists=True, dir_okay=False,
                                           help="TrainConfig as YAML or JSON (unset keys: tuned defaults)."),
        budget_s: float | None = typer.Option(None, "--budget-s", help="Wall-clock training budget (s)."),
        steps: int | None = typer.Option(None, "--steps", help="Stop after this many optimiser steps."),
        run_dir: Path | None = typer.Option(None, "--run-dir", help="Run folder (default: runs/<model>)."),
        fresh: bool = typer.Option(False, "--fresh", help="Ignore an existing checkpoint in the run folder."),
        track: bool = typer.Option(True, "--track/--no-track",
                                   help="Default: the train-forecaster flow's twin (MLflow run, evaluation, "
                                        "registry version, champion gate; run folder keyed by config + store). "
                                        "--no-track: a plain fit logged to JSONL in --run-dir."),
        register_as: str | None = typer.Option(None, "--register-as",
                                               help="Registered model name with --track "
                                                    "(default tumor-growth-forecaster)."),
    ) -> None:
        """Train a forecasting model on the store's training split (resumes a run folder by default)."""
        from rich.markup import escape

        from longitudinal.training.config import load_train_config
        from longitudinal.training.fit import fit
        from longitudinal.training.logger import JsonlLogger

        settings = with_store(settings_of(ctx), store)
        store_url = settings.store_url
        try:
            cfg = load_train_config(config, model=model, budget_s=budget_s, steps=steps)
        except ValueError as exc:
            fail(escape(str(exc)))
        if track:
            _train_tracked(settings, store_url, cfg, register_as)
            return
        run = run_dir or settings.runs_path / cfg.model
        print_locations(settings, ("store", "runs"))
        console.print(f"run folder: {run}")
        try:
            res = fit(cfg, store_url, run, JsonlLogger(run), resume=not fresh, progress=console.print)
        except (ValueError, FileNotFoundError) as exc:
            fail(escape(str(exc)))
        best = "-" if res.best_metric is None else f"{res.best_metric:.3f}"
        console.print(f"[bold]model[/bold] {res.checkpoint}  steps {res.steps}  {res.wall_s:.0f} s  "
                      f"best val Dice {best}  split {res.split.split_id} ({res.split_path})")

    @app.command()
    def calibrate(
        ctx: typer.Context,
        run_dir: Path = typer.Argument(..., help="A finished training run folder (holds config.json, split.json)."),
        patients: str = typer.Option(..., "--patients",
                                     help="Comma-separated held-out patient ids, or a split.json to use its "
                                          "validation patients (never the run's training or test patients)."),
        store: str | None = typer.Option(None, "--store", help="Cohort store URL (default: settings)."),
        targets: int | None = typer.Option(None, "--targets", min=1,
                                           help="At most this many targets (default: the run's calib_targets)."),
        form: str | None = typer.Option(None, "--form",
                                        help="Conformal scores: scaled (by |median - linear forecast|) or "
                                             "symmetric (default: the run's calib_form, scaled)."),
    ) -> None:
        """Refit a sampled model's volume-interval calibration on more held-out patients (no retraining)."""
        from rich.markup import escape

        from longitudinal.training.recalibrate import recalibrate_run

        settings = with_store(settings_of(ctx), store)
        store_url = settings.store_url
        print_locations(settings, ("store",))
        try:
            out = recalibrate_run(run_dir, store_url, _patients(patients, part="val") or [], targets,
                                  progress=console.print, form=form)
        except (ValueError, FileNotFoundError) as exc:
            fail(escape(str(exc)))
        w = out.whole
        console.print(f"[bold]calibrated[/bold] {', '.join(str(p) for p in out.checkpoints)} on {w.n} targets of "
                      f"{w.n_patients} patients ({w.form} scores); horizon bins split at {list(w.edges_days)} d "
                      f"holding {w.bin_sizes()} targets")

    @app.command()
    def evaluate(
        ctx: typer.Context,
        model: str = typer.Option(..., "--model", help="Checkpoint path, a baseline kind (lci, linear), NAME@ALIAS, "
                                                       "NAME/VERSION, models:/... or runs:/..."),
        store: str | None = typer.Option(None, "--store", help="Cohort store URL (default: settings)."),
        json_path: Path | None = typer.Option(None, "--json", help="Write the per-horizon rows as JSON here."),
        patients: str | None = typer.Option(None, "--patients",
                                            help="Comma-separated patient ids, or a split.json to use its "
                                                 "test patients (default: every patient)."),
        n_samples: int = typer.Option(8, "--samples", min=1, help="Samples per target for sampled models."),
    ) -> None:
        """Forecast every later scan from the earlier ones; print the per-horizon table (with LCI and linear)."""
        from rich.markup import escape

        from longitudinal.tracking.run import evaluate_model_ref

        settings = with_store(settings_of(ctx), store)
        store_url = settings.store_url
        pids = _patients(patients)
        print_locations(settings, ("store",))
        try:
            report = evaluate_model_ref(model, settings, store_url, pids, n_samples=n_samples)
        except (ValueError, FileNotFoundError) as exc:
            fail(escape(str(exc)))
        print_evaluation_table(report.rows, f"{report.n_targets} targets, {len(report.patients)} patients")
        if json_path is not None:
            console.print(f"rows written to {report.to_json(json_path)}")


def _train_tracked(settings: Any, store_url: str, cfg: Any, register_as: str | None) -> None:
    """`train --track`: one call to run_training (the same function as the train-forecaster flow), then print
    the MLflow run, the registry version, its aliases and the gate's decision."""
    from rich.markup import escape

    from longitudinal.tracking.run import run_training

    print_locations(settings, ("store", "runs", "mlflow"))
    try:
        out = run_training(settings, store_url, cfg, register_as=register_as)
    except (ValueError, FileNotFoundError) as exc:
        fail(escape(str(exc)))
    d = out.decision.tags() if out.decision is not None else {}
    console.print(f"[bold]MLflow run[/bold] {out.run_id} ({'resumed' if out.resumed else 'new'})  "
                  f"run folder {out.run_dir}")
    console.print(f"[bold]model[/bold] {out.model_uri}  [bold]registered[/bold] {out.registered_name} "
                  f"v{out.version} ({'new' if out.created_version else 'existing'})  "
                  f"aliases: {', '.join(out.aliases) or '-'}")
    console.print(f"[bold]gate[/bold] {d.get('gate.decision', 'decided before')}: "
                  f"{escape(d.get('gate.reasons', ''))}")


def _patients(spec: str | None, part: str = "test") -> list[str] | None:
    """Patient ids from a comma-separated list, or the ``part`` patients of a split.json."""
    if not spec:
        return None
    path = Path(spec)
    if path.suffix == ".json" and path.exists():
        from longitudinal.data.splits import Split

        return list(getattr(Split.load(path), part))
    return [p.strip() for p in spec.split(",") if p.strip()]
