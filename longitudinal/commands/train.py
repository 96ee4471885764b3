"""CLI commands for the 'train' area: `longitudinal train`, `longitudinal calibrate` and `longitudinal evaluate`;
plus the torchrun launch of a tracked training that the train-forecaster flow uses on a multi-GPU node."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
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
    out = console if console.is_terminal else Console(width=max(console.width, 200))
    # On a terminal narrower than the table, the least used columns go (never cut numbers); --json keeps all.
    hidden = []
    for key in _NARROW_DROP_ORDER:
        if _table_width(rows, present) <= out.width:
            break
        hidden += [c[1] for c in present if c[0] == key]
        present = [c for c in present if c[0] != key]
    if hidden:
        title += f" ({len(hidden)} columns hidden to fit the terminal: a wider one or --json shows them)"
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
    # Piped output (logs, benchmarks) is printed at full width (above) rather than squeezed into 80 columns.
    out.print(table)


# Columns of the evaluation table dropped first when it does not fit the terminal.
_NARROW_DROP_ORDER = ("ged", "coverage95_raw", "coverage80_raw", "mse", "ssim", "hd95_mm", "dice_enhancing",
                      "crps_ml", "skill_volume_error_ml", "skill_dice_whole")


def _table_width(rows: list[dict[str, Any]], cols: list[tuple[str, str, str]]) -> int:
    """About how wide the evaluation table is (cells, padding and borders)."""
    widths = [max([len("horizon (days)")] + [len(str(r.get("horizon", ""))) for r in rows]),
              max([len("model")] + [len(str(r.get("model", ""))) for r in rows])]
    widths += [max(len(head), 7) for _key, head, _fmt in cols]
    return sum(w + 3 for w in widths) + 1


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
        eval_samples: int = typer.Option(8, "--eval-samples", min=1,
                                         help="With --track: samples per target of a sampled model in the "
                                              "gate and test evaluation."),
        dask_address: str | None = typer.Option(None, "--dask-address", envvar="LONGITUDINAL_DASK_ADDRESS",
                                                help="With --track: calibrate and evaluate on the Dask cluster "
                                                     "at this scheduler (tcp://HOST:8786)."),
        eval_workers: int = typer.Option(1, "--eval-workers", min=1,
                                         help="With --track: calibrate and evaluate on a local Dask cluster of "
                                              "N worker processes (1: in this process)."),
        summary_json: Path | None = typer.Option(None, "--summary-json",
                                                 help="With --track: write the run's summary (MLflow run, "
                                                      "version, aliases, gate) as JSON here."),
        flow_run_id: str | None = typer.Option(None, "--flow-run-id", hidden=True,
                                               help="Prefect flow-run id to tag the MLflow run with."),
    ) -> None:
        """Train a forecasting model on the store's training split (resumes a run folder by default).

        Under torchrun (``torchrun --nproc_per_node N -m longitudinal train ...``) every process trains
        data-parallel and only rank 0 prints, logs, evaluates and registers."""
        from rich.markup import escape

        from longitudinal.training.config import load_train_config
        from longitudinal.training.fit import fit
        from longitudinal.training.logger import JsonlLogger
        from longitudinal.training.steps import DistContext

        settings = with_store(settings_of(ctx), store)
        store_url = settings.store_url
        main = DistContext.from_env().is_main
        try:
            cfg = load_train_config(config, model=model, budget_s=budget_s, steps=steps)
        except ValueError as exc:
            fail(escape(str(exc)))
        if track:
            engine = _engine(dask_address, eval_workers, "--eval-workers")
            _train_tracked(settings, store_url, cfg, register_as, eval_samples=eval_samples, engine=engine,
                           summary_json=summary_json, flow_run_id=flow_run_id, main=main)
            return
        run = run_dir or settings.runs_path / cfg.model
        if main:
            print_locations(settings, ("store", "runs"))
            console.print(f"run folder: {run}")
        try:
            res = fit(cfg, store_url, run, JsonlLogger(run), resume=not fresh, progress=console.print)
        except (ValueError, FileNotFoundError) as exc:
            fail(escape(str(exc)))
        if not main:
            return
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
        dask_address: str | None = typer.Option(None, "--dask-address", envvar="LONGITUDINAL_DASK_ADDRESS",
                                                help="Forecast the patients on the Dask cluster at this "
                                                     "scheduler (tcp://HOST:8786)."),
        workers: int = typer.Option(1, "--workers", min=1,
                                    help="Forecast the patients on a local Dask cluster of N worker processes "
                                         "(1: in this process)."),
    ) -> None:
        """Refit a sampled model's volume-interval calibration on more held-out patients (no retraining)."""
        from contextlib import nullcontext

        from rich.markup import escape

        from longitudinal.training.recalibrate import recalibrate_run

        settings = with_store(settings_of(ctx), store)
        store_url = settings.store_url
        engine = _engine(dask_address, workers)
        print_locations(settings, ("store",))
        if engine is not None:
            console.print(f"[bold]dask[/bold] patients are forecast on {engine.describe()}")
        try:
            # Entered, the engine is the default of the calibration's evaluation (one cluster for both
            # checkpoints).
            with engine if engine is not None else nullcontext():
                out = recalibrate_run(run_dir, store_url, _patients(patients, part="val") or [], targets,
                                      progress=console.print, form=form)
        except (ValueError, FileNotFoundError) as exc:
            fail(escape(str(exc)))
        w = out.whole
        console.print(f"[bold]calibrated[/bold] {', '.join(str(p) for p in out.checkpoints)} on {w.n} targets of "
                      f"{w.n_patients} patients ({w.form} scores); horizon bins split at {list(w.edges_days)} d "
                      f"holding {w.bin_sizes()} targets")
        from longitudinal.models.checkpoint import Checkpoint

        own = sorted({k.partition(":")[2] for k in Checkpoint.load(out.checkpoints[-1]).calibration if ":" in k})
        console.print(f"treatment strata with a calibration of their own: {', '.join(own) or 'none'} "
                      "(the others use the pooled one)")

    @app.command()
    def evaluate(
        ctx: typer.Context,
        model: str = typer.Option(..., "--model", help="Checkpoint path, a baseline kind (lci, linear), NAME@ALIAS, "
                                                       "NAME/VERSION, models:/... or runs:/..."),
        store: str | None = typer.Option(None, "--store", help="Cohort store URL (default: settings)."),
        json_path: Path | None = typer.Option(None, "--json",
                                              help="Write the rows per (treatment stratum, horizon) as JSON here."),
        targets_csv: Path | None = typer.Option(None, "--targets-csv",
                                                help="Write one row per (patient, target, model) as CSV here: "
                                                     "days after the last context scan, treated_gap, Dice, "
                                                     "volume error, intervals, coverage."),
        patients: str | None = typer.Option(None, "--patients",
                                            help="Comma-separated patient ids, or a split.json to use its "
                                                 "test patients (default: every patient)."),
        n_samples: int = typer.Option(8, "--samples", min=1, help="Samples per target for sampled models."),
        dask_address: str | None = typer.Option(None, "--dask-address", envvar="LONGITUDINAL_DASK_ADDRESS",
                                                help="Forecast the patients on the Dask cluster at this "
                                                     "scheduler (tcp://HOST:8786); the same table."),
        workers: int = typer.Option(1, "--workers", min=1,
                                    help="Forecast the patients on a local Dask cluster of N worker processes "
                                         "(1: in this process); the same table."),
    ) -> None:
        """Forecast every later scan from the earlier ones; print the per-horizon table (with LCI and linear) of
        every target, then of the targets with an untreated gap and of those with a treatment in the gap."""
        from rich.markup import escape

        from longitudinal.tracking.run import evaluate_model_ref

        settings = with_store(settings_of(ctx), store)
        store_url = settings.store_url
        pids = _patients(patients)
        engine = _engine(dask_address, workers)
        print_locations(settings, ("store",))
        if engine is not None:
            console.print(f"[bold]dask[/bold] patients are forecast on {engine.describe()}")
        try:
            report = evaluate_model_ref(model, settings, store_url, pids, n_samples=n_samples, engine=engine,
                                        progress=console.print if engine is not None else None)
        except (ValueError, FileNotFoundError) as exc:
            fail(escape(str(exc)))
        except OSError as exc:  # the scheduler cannot be reached
            fail(escape(f"{engine.describe() if engine else 'evaluation'}: {type(exc).__name__}: {exc}"))
        print_strata_tables(report)
        if json_path is not None:
            from dataclasses import replace

            from longitudinal.evaluation.strata import stratum_rows

            console.print(f"rows written to {replace(report, rows=stratum_rows(report)).to_json(json_path)}", soft_wrap=True)
        if targets_csv is not None:
            from longitudinal.evaluation.strata import write_targets_csv

            console.print(f"per-target rows written to {write_targets_csv(report.records, targets_csv)}")


def print_strata_tables(report: Any) -> None:
    """The evaluation table of every target, then one per treatment stratum (a stratum without targets is named
    in one line rather than printed as an empty table)."""
    from longitudinal.evaluation.strata import STRATUM_LABELS, stratum_counts, stratum_rows

    rows, counts = stratum_rows(report), stratum_counts(report)
    for stratum, label in STRATUM_LABELS.items():
        mine = [r for r in rows if r["stratum"] == stratum]
        if stratum == "all":
            print_evaluation_table(mine, f"{report.n_targets} targets, {len(report.patients)} patients")
        elif counts[stratum] == 0:
            console.print(f"{label}: no targets")
        else:
            print_evaluation_table(mine, f"{label}: {counts[stratum]} of {report.n_targets} targets")


def _engine(dask_address: str | None, workers: int, workers_flag: str = "--workers") -> Any:
    """The DaskEngine of ``--dask-address`` / ``--workers N`` (None: this process); fails on both or a bad
    address."""
    if dask_address and workers > 1:
        fail(f"{workers_flag} starts a local cluster; with --dask-address the cluster's workers set the "
             "parallelism")
    if not dask_address and workers <= 1:
        return None
    from longitudinal.evaluation.distributed import DaskEngine

    try:
        return DaskEngine(address=dask_address or None, workers=workers)
    except ValueError as exc:
        fail(str(exc))


def _train_tracked(settings: Any, store_url: str, cfg: Any, register_as: str | None, eval_samples: int = 8,
                   engine: Any = None, summary_json: Path | None = None, flow_run_id: str | None = None,
                   main: bool = True) -> None:
    """`train --track`: one call to run_training (the same function as the train-forecaster flow), then print
    the MLflow run, the registry version, its aliases and the gate's decision. Under torchrun the other ranks
    print nothing (run_training returns None there)."""
    from rich.markup import escape

    from longitudinal.tracking.run import run_training

    if main:
        print_locations(settings, ("store", "runs", "mlflow"))
        if engine is not None:
            console.print(f"[bold]dask[/bold] calibration and evaluation run on {engine.describe()}")
    try:
        out = run_training(settings, store_url, cfg, register_as=register_as, flow_run_id=flow_run_id,
                           eval_samples=eval_samples, engine=engine)
    except (ValueError, FileNotFoundError) as exc:
        fail(escape(str(exc)))
    if out is None:
        return
    if summary_json is not None:
        summary_json.parent.mkdir(parents=True, exist_ok=True)
        summary_json.write_text(json.dumps(out.summary(), indent=2))
    d = out.decision.tags() if out.decision is not None else {}
    console.print(f"[bold]MLflow run[/bold] {out.run_id} ({'resumed' if out.resumed else 'new'})  "
                  f"run folder {out.run_dir}")
    console.print(f"[bold]model[/bold] {out.model_uri}  [bold]registered[/bold] {out.registered_name} "
                  f"v{out.version} ({'new' if out.created_version else 'existing'})  "
                  f"aliases: {', '.join(out.aliases) or '-'}")
    console.print(f"[bold]gate[/bold] {d.get('gate.decision', 'decided before')}: "
                  f"{escape(d.get('gate.reasons', ''))}")


def torchrun_train_command(nproc_per_node: int, store_url: str, config_path: Path, summary_path: Path,
                           register_as: str | None = None, flow_run_id: str | None = None,
                           eval_samples: int = 8, dask_address: str | None = None) -> list[str]:
    """The argv of ``torchrun --standalone --nproc_per_node N -m longitudinal train --track ...`` (this
    interpreter's ``torch.distributed.run``): a tracked data-parallel training on one node, whose rank 0
    writes the run's summary to ``summary_path``."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(int(nproc_per_node)),
           "-m", "longitudinal", "train", "--track", "--store", str(store_url), "--config", str(config_path),
           "--summary-json", str(summary_path), "--eval-samples", str(int(eval_samples))]
    if register_as:
        cmd += ["--register-as", register_as]
    if flow_run_id:
        cmd += ["--flow-run-id", str(flow_run_id)]
    if dask_address:
        cmd += ["--dask-address", dask_address]
    return cmd


def train_with_torchrun(settings: Any, store_url: str, train_config: Any, nproc_per_node: int,
                        register_as: str | None = None, flow_run_id: str | None = None, eval_samples: int = 8,
                        dask_address: str | None = None, timeout_s: float | None = None) -> dict[str, Any]:
    """A tracked training as ``nproc_per_node`` data-parallel processes (``torchrun_train_command``) in
    ``settings``' workspace; returns rank 0's ``TrainOutcome.summary()``. The train-forecaster flow calls this
    on a node with several GPUs.

    train_config: a TrainConfig, a dict of its fields or a YAML/JSON path (missing fields: the defaults).
    The children inherit this environment plus the workspace, runs folder and tracking URI of ``settings``,
    so they track where this process would. Output goes to this process's stdout/stderr. Raises RuntimeError
    with the exit status when the launch fails."""
    from longitudinal.training.config import TrainConfig

    with tempfile.TemporaryDirectory(prefix="longitudinal-torchrun-") as tmp:
        work = Path(tmp)
        if isinstance(train_config, str | Path):
            config_path = Path(train_config).resolve()
        else:
            body = train_config.to_dict() if isinstance(train_config, TrainConfig) else dict(train_config)
            config_path = work / "train_config.json"
            config_path.write_text(json.dumps(body))
        summary_path = work / "summary.json"
        env = {**os.environ, "LONGITUDINAL_HOME": str(settings.home_dir),
               "LONGITUDINAL_RUNS_DIR": str(settings.runs_path),
               "LONGITUDINAL_MLFLOW_TRACKING_URI": settings.tracking_uri}
        cmd = torchrun_train_command(nproc_per_node, store_url, config_path, summary_path, register_as,
                                     flow_run_id, eval_samples, dask_address)
        proc = subprocess.run(cmd, env=env, timeout=timeout_s, check=False)
        if proc.returncode != 0 or not summary_path.exists():
            raise RuntimeError(f"tracked training under torchrun ({nproc_per_node} processes) failed with exit "
                               f"status {proc.returncode}: {' '.join(cmd)}")
        return json.loads(summary_path.read_text())


def _patients(spec: str | None, part: str = "test") -> list[str] | None:
    """Patient ids from a comma-separated list, or the ``part`` patients of a split.json."""
    if not spec:
        return None
    path = Path(spec)
    if path.suffix == ".json" and path.exists():
        from longitudinal.data.splits import Split

        return list(getattr(Split.load(path), part))
    return [p.strip() for p in spec.split(",") if p.strip()]
