"""`make demo`: the main job end to end on the embedded synthetic cohort, with progress throughout.

synth (Fisher-Kolmogorov cohort as BIDS) -> ingest (validate, de-identify, register, Zarr store) -> train a fixed
number of steps (tracked in MLflow, evaluated against the baselines, registered, gated) -> forecast a held-out
patient (a treated one first) under its recorded treatment history and under a radiotherapy plan -> a verdict in
plain words and the commands to try next.

Training is budgeted in STEPS, so an idle laptop and a busy server train the same model; a busy machine only
takes longer. A wall-clock safety stop ends training early only if the machine is far slower than expected, and
the verdict then says so loudly. PyTorch uses one thread when the machine is already busy at the start (two
threads on two busy cores wait on each other: ten times slower per step), all cores otherwise.

Sizes: LONGITUDINAL_DEMO_PATIENTS (14), LONGITUDINAL_DEMO_STEPS (200), LONGITUDINAL_DEMO_MAX_TRAIN_S (3600, the
safety stop), LONGITUDINAL_DEMO_THREADS (chosen from the load). Re-running reuses the cohort and the store (ingest
is idempotent) and resumes or reuses the training run.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.panel import Panel
from rich.table import Table

from longitudinal.demo_progress import (
    Bar,
    Reporter,
    capture,
    console,
    duration,
    set_threads,
)
from longitudinal.settings import Settings

DEMO_PATIENTS = int(os.environ.get("LONGITUDINAL_DEMO_PATIENTS", "14"))
DEMO_STEPS = int(os.environ.get("LONGITUDINAL_DEMO_STEPS", "200"))
DEMO_MAX_TRAIN_S = float(os.environ.get("LONGITUDINAL_DEMO_MAX_TRAIN_S", "3600"))
# Forecast samples per evaluation target: enough for intervals, few enough to keep the demo short.
DEMO_EVAL_SAMPLES = 4
DEMO_SEED = 7
# The counterfactual the demo asks: "and if a six-week course of radiotherapy starts two weeks after the last scan?"
DEMO_PLAN_TEXT = "radiotherapy@+14:+56"
# Days after the latest scan; a year ahead, fast-growing synthetic tumours outgrow the crop's growth margin.
DEMO_QUERY_DAYS = (90.0, 180.0)
# Training prints a line every this many steps (the progress bar's resolution).
DEMO_LOG_EVERY = 5
N_STEPS = 5


def _step(n: int, title: str) -> float:
    console.rule(f"[bold cyan]{n}/{N_STEPS}  {title}")
    return time.perf_counter()


def _done(t0: float) -> None:
    console.print(f"[dim]done in {duration(time.perf_counter() - t0)}[/dim]")


def run_synth(settings: Settings) -> Path:
    """Generate the synthetic cohort once; a marker records its parameters so reruns reuse it."""
    from longitudinal.synth import generate_cohort

    out = settings.data_path
    marker = out / ".demo-cohort.json"
    params = {"patients": DEMO_PATIENTS, "seed": DEMO_SEED, "preset": "default"}
    if marker.exists() and json.loads(marker.read_text()) == params:
        console.print(f"cohort already generated at {out} ({DEMO_PATIENTS} patients), reusing it")
        return out
    with Bar("synthesising patients", DEMO_PATIENTS) as bar:
        summary = generate_cohort(out, DEMO_PATIENTS, DEMO_SEED, preset="default",
                                  progress=lambda done, total: bar.update(done, total))
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

    with Bar("ingesting patients", None) as bar:
        report = ingest_cohort(source, settings.store_url, settings, workers=2,
                               progress=lambda done, total, *_: bar.update(done, total))
    console.print(
        f"stored {report.stored} sessions, skipped {report.skipped} already present, "
        f"quarantined {report.quarantined}; {report.treatments_stored} treatment events stored "
        f"(report: {report.report_path})"
    )
    if report.exit_code() != 0:
        raise SystemExit(f"ingest failed: {report.problems or report.failed_patients}")


def demo_train_config() -> Any:
    """The tuned default configuration with a fixed number of steps (the same training on any machine) and a
    generous wall-clock safety stop."""
    from longitudinal.training.config import load_train_config

    return load_train_config(steps=DEMO_STEPS, budget_s=DEMO_MAX_TRAIN_S, log_every=DEMO_LOG_EVERY)


def run_train(settings: Settings) -> Any:  # TrainOutcome (imported lazily)
    from longitudinal.tracking.run import run_training

    cfg = demo_train_config()
    console.print(f"training {cfg.model} for {cfg.steps} steps on the CPU (tracked in MLflow; safety stop after "
                  f"{duration(cfg.budget_s)}), then calibrating its volume intervals, scoring it against the "
                  "last-scan and linear baselines, registering it and gating it")
    reporter = Reporter(console, int(cfg.steps))
    with reporter.active(), capture(reporter):
        outcome = run_training(settings, settings.store_url, cfg, eval_samples=DEMO_EVAL_SAMPLES)
    if outcome.test_rows:
        table = Table(title="held-out evaluation (test patients): model vs baselines")
        for col in ("model", "horizon (days)", "n", "Dice (whole)", "volume error ml"):
            table.add_column(col, justify="left" if col == "model" else "right")
        for row in outcome.test_rows:
            if not row.get("n"):
                continue
            table.add_row(str(row["model"]), str(row["horizon"]), str(row["n"]), f"{row['dice_whole']:.3f}",
                          f"{row['volume_error_ml']:.2f}")
        console.print(table)
    console.print(f"MLflow run {outcome.run_id}; registered {outcome.registered_name} v{outcome.version}, "
                  f"aliases {', '.join(outcome.aliases) or '-'}"
                  + ("" if not outcome.resumed or outcome.decision is not None else " (finished earlier, reused)"))
    return outcome


def _latest_volume_ml(store: Any, pid: str) -> float:
    import numpy as np

    arr = store.arrays(pid)
    return float((np.asarray(arr.label[-1]) > 0).sum()) * float(np.prod(arr.spacing_mm)) / 1000.0


def _demo_plan() -> list[Any]:
    from longitudinal.forecast import PlannedTreatment

    return [PlannedTreatment.parse(DEMO_PLAN_TEXT)]


def run_forecast(settings: Settings, groups: Sequence[Sequence[str]], model_ref: str) -> Any:
    """Forecast the first patient (group by group; in each, treated patients first, so the summary shows a treatment
    history, then the smallest latest tumour first) whose forecast fits the model's field of view; the last one
    tried when none does (its warnings are printed)."""
    from longitudinal.commands.forecast import print_forecast_table
    from longitudinal.forecast import ForecastRequest, Queries, forecast_patient
    from storage.store import CohortStore

    store = CohortStore.open(settings.store_url, recover=False)
    order = [p for group in groups
             for p in sorted(group, key=lambda p: (not store.patient_treatments(p), _latest_volume_ml(store, p)))]
    result = None
    for pid in order:
        request = ForecastRequest(pid, Queries(in_days=DEMO_QUERY_DAYS), store_url=settings.store_url,
                                  model_ref=model_ref, n_samples=32, plan=_demo_plan())
        result = forecast_patient(settings, request)
        if not result.warnings():
            break
        if pid != order[-1]:
            console.print(f"{pid}: its tumour does not fit the model's field of view; trying another held-out "
                          "patient")
    console.print(f"held-out patient {result.patient} forecast with {model_ref} at +90 and +180 days, under "
                  f"its recorded treatment history and under a plan: {DEMO_PLAN_TEXT}")
    print_forecast_table(result)
    return result


# --- the verdict ------------------------------------------------------------------------------------------
@dataclass
class Verdict:
    """The demo's last word: ``lines`` in plain language, ``ok`` False when something needs the user's action."""

    lines: list[str] = field(default_factory=list)
    ok: bool = True
    champion: bool = False


def _pooled(rows: Sequence[Mapping[str, Any]], model: str) -> Mapping[str, Any] | None:
    return next((r for r in rows if r.get("model") == model and r.get("horizon") == "all"), None)


def verdict(*, steps_done: int, steps_planned: int, safety_stop_s: float | None, tags: Mapping[str, str],
            test_rows: Sequence[Mapping[str, Any]], name: str, version: str, champion: str | None,
            train_cmd: str) -> Verdict:
    """How the model did against the baselines, whether it became champion and, if not, why and what to do.

    tags: the registered version's tags (``gate.*``); test_rows: the held-out evaluation rows (candidate named
    ``candidate``); champion: the version holding ``champion`` now (None: none); train_cmd: how to train more."""
    v = Verdict()
    if steps_done < steps_planned:
        v.ok = False
        v.lines.append(f"[bold red]TRAINING WAS CUT SHORT: {steps_done} of {steps_planned} steps, stopped by the "
                       f"{safety_stop_s or 0:.0f} s safety limit. This machine was far slower than expected (busy?), "
                       "so this model is weaker than the demo intends and the results below are not the demo's. "
                       "Rerun `make demo` when the machine is quieter, or raise LONGITUDINAL_DEMO_MAX_TRAIN_S.[/bold red]")
    else:
        v.lines.append(f"Training ran its {steps_planned} steps, as it does on any machine.")
    cand, lci, lin = (_pooled(test_rows, m) for m in ("candidate", "lci", "linear"))
    if cand and lci and lin:
        n = int(cand.get("n", 0))
        beats = [label for label, ref in (("the last-scan baseline", lci), ("linear extrapolation", lin))
                 if cand["dice_whole"] > ref["dice_whole"] and cand["volume_error_ml"] < ref["volume_error_ml"]]
        figures = (f"Dice {cand['dice_whole']:.3f} vs last scan {lci['dice_whole']:.3f} and linear "
                   f"{lin['dice_whole']:.3f}; volume error {cand['volume_error_ml']:.1f} ml vs "
                   f"{lci['volume_error_ml']:.1f} and {lin['volume_error_ml']:.1f} ml")
        if len(beats) == 2:
            v.lines.append(f"On {n} forecasts of held-out patients it beat both baselines ({figures}).")
        elif beats:
            v.lines.append(f"On {n} forecasts of held-out patients it beat {beats[0]} but not "
                           f"{'linear extrapolation' if 'last' in beats[0] else 'the last-scan baseline'} "
                           f"({figures}). With this few patients and steps that can happen; train longer for a "
                           f"better model: {train_cmd}")
        else:
            v.lines.append(f"On {n} forecasts of held-out patients it did not beat the baselines ({figures}); "
                           f"train longer: {train_cmd}")
    decision = tags.get("gate.decision")
    ref = f"{name} v{version}"
    if decision == "promoted" and champion == str(version):
        v.champion = True
        v.lines.append(f"It beat the last-scan baseline on the validation patients too (the promotion gate), so "
                       f"{ref} is now the champion: forecasts without --model use it.")
    elif decision == "promoted":
        v.lines.append(f"{ref} passed the gate, but the champion is now v{champion}.")
        v.champion = champion is not None
    else:
        v.ok = False
        why = _gate_reasons(tags)
        now = (f"The champion stays v{champion}, so forecasts without --model use that one."
               if champion else
               f"There is no champion, so forecast commands need --model {name}/{version} (as printed below).")
        v.lines.append(f"{ref} did NOT become champion: on the validation patients {why}. {now} "
                       f"To get a better model, train longer: {train_cmd}")
        v.champion = champion is not None
    return v


def _gate_reasons(tags: Mapping[str, str]) -> str:
    """The gate's failed comparisons in words, from the version's figures."""

    def f(key: str) -> float | None:
        try:
            return float(tags[key])
        except (KeyError, ValueError):
            return None

    d, e = f("gate.val_dice_whole"), f("gate.val_volume_error_ml")
    out = []
    for who, prefix in (("the last scan", "gate.lci"), ("the champion", "gate.champion")):
        rd, re_ = f(f"{prefix}_dice_whole"), f(f"{prefix}_volume_error_ml")
        if d is not None and rd is not None and not d > rd:
            out.append(f"its Dice {d:.3f} was not above {who}'s {rd:.3f}")
        if e is not None and re_ is not None and not e < re_:
            out.append(f"its volume error {e:.1f} ml was not below {who}'s {re_:.1f} ml")
    return "; ".join(out) or tags.get("gate.reasons", "it did not beat the references")


def treatments_text(settings: Settings, patient: str) -> str:
    """A stored patient's treatment events, one per line: kind, days since the baseline scan (whole days) and
    the date in the store's shifted calendar; "none recorded" for an untreated patient."""
    from storage.store import CohortStore

    events = CohortStore.open(settings.store_url, recover=False).patient_treatments(patient)
    lines = []
    for e in events:
        if e.end_days is None:
            lines.append(f"{e.kind}: day {e.start_days:.0f} ({e.start_date})")
        else:
            lines.append(f"{e.kind}: days {e.start_days:.0f}-{e.end_days:.0f} ({e.start_date} to {e.end_date})")
    return "\n".join(lines) or "none recorded"


def _here(path: Path) -> str:
    """``path`` relative to the current folder when inside it (commands to copy from the repository root)."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _trained_steps(checkpoint: Path) -> int:
    from longitudinal.models.checkpoint import Checkpoint

    try:
        return int(Checkpoint.load(checkpoint).provenance.get("step") or 0)
    except (OSError, ValueError, KeyError):
        return 0


def main() -> None:
    settings = Settings()
    t_all = time.perf_counter()
    console.print(Panel.fit(f"longitudinal demo: {DEMO_PATIENTS} synthetic patients, {DEMO_STEPS} training steps, "
                            f"workspace {settings.home_dir}"))
    set_threads()
    t = _step(1, "synthesise a longitudinal glioma cohort (BIDS)")
    source = run_synth(settings)
    _done(t)
    t = _step(2, "ingest: validate, de-identify, register, store")
    run_ingest(settings, source)
    _done(t)
    t = _step(3, "train, evaluate against baselines, track, register, gate")
    outcome = run_train(settings)
    _done(t)

    from longitudinal.tracking.summary import champion_version, evaluation_rows, version_tags

    name, version = outcome.registered_name, outcome.version
    champion = champion_version(settings, name)
    model_ref = f"{name}@champion" if champion == str(version) else f"{name}/{version}"
    split = json.loads((outcome.run_dir / "split.json").read_text())
    t = _step(4, "forecast a held-out patient, with and without a treatment plan")
    # held out from training: the test patients first, then the validation ones
    result = run_forecast(settings, [split["test"], split["val"]], model_ref)
    _done(t)

    _step(5, "verdict and what to try next")
    exe = _here(Path(sys.executable).parent / "longitudinal")
    home = shlex.quote(_here(settings.home_dir))
    cli = f"{exe} --home {home}"
    verdict_ = verdict(
        steps_done=_trained_steps(outcome.checkpoint), steps_planned=DEMO_STEPS, safety_stop_s=DEMO_MAX_TRAIN_S,
        tags=version_tags(settings, name, version), test_rows=outcome.test_rows or evaluation_rows(
            settings, outcome.run_id, "test"),
        name=name, version=version, champion=champion, train_cmd=f"`{cli} train --steps {DEMO_STEPS * 3}`")
    console.print(Panel("\n".join(verdict_.lines), title="verdict", title_align="left",
                        border_style="green" if verdict_.ok else "red"))
    model_opt = "" if champion == str(version) else f" --model {name}/{version}"
    mlflow_db = _here(settings.home_dir / "mlflow.db")
    tracking = settings.tracking_uri
    if tracking == f"sqlite:///{settings.home_dir / 'mlflow.db'}":
        tracking = f"sqlite:///{mlflow_db}"
    commands = [
        ("patients in the store", f"{cli} store patients"),
        ("forecast this patient again", f"{cli} forecast {result.patient} --in 90 --in 180{model_opt}"),
        ("and if radiotherapy starts in two weeks?",
         f"{cli} forecast {result.patient} --in 90 --plan {DEMO_PLAN_TEXT}{model_opt}"),
        ("registered versions and the gate", f"{cli} models list"),
        ("the MLflow UI (then open http://127.0.0.1:5000)",
         f"{_here(Path(sys.executable).parent / 'mlflow')} ui --backend-store-uri {tracking} "
         f"--artifacts-destination {shlex.quote(_here(settings.mlflow_artifacts_path))} --port 5000"),
    ]
    console.print("[bold]Try it[/bold] (copy and paste from this folder):")
    for what, cmd in commands:
        console.print(f"  [dim]# {what}[/dim]")
        console.print(f"  {escape(cmd)}", soft_wrap=True)
    out = Table(show_header=False, box=None, title="where everything is", title_justify="left")
    out.add_column(style="bold", no_wrap=True)
    out.add_column(overflow="fold")
    out.add_row("cohort (BIDS)", _here(source))
    out.add_row("store", _here(Path(settings.store_url)) if "://" not in settings.store_url else settings.store_url)
    out.add_row("ingest reports", _here(settings.reports_path))
    out.add_row("training run", _here(outcome.run_dir))
    out.add_row("MLflow tracking and registry", tracking)
    out.add_row("forecast files", _here(result.out_dir))
    out.add_row("forecast plot", _here(result.plot_path))
    out.add_row(f"treatments of {result.patient}", treatments_text(settings, result.patient))
    console.print(out)
    took = duration(time.perf_counter() - t_all)
    console.print(f"[green]demo finished in {took}" if verdict_.ok else
                  f"[yellow]demo finished in {took}; the verdict above says what needs your attention")


if __name__ == "__main__":
    main()
