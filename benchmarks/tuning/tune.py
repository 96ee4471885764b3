"""Tuning sweep on the VALIDATION patients: train config variants with one budget, score them beside lci and
linear per horizon bin, and (for tfm) score each trained variant under several ODE samplers.

The test patients of the split are never touched here, so the defaults picked from this table can be scored
honestly by benchmarks/forecast_quality.py afterwards. The cohort is the one forecast_quality.py caches
under --work (run that first, or with ``--models ""`` to only synthesise and ingest).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/tuning/tune.py --work W --budget-s 1500 --samplers euler:8,midpoint:2 \\
        --variant 'plain={"steps": 500, "model_options": {"rate_head": false}}' --variant 'default={"steps": 500}'

A tuning tool, not a product benchmark (``make bench`` does not run it): docs/RESULTS.md lists the exact sweep
behind the shipped tfm defaults, docs/decisions/tfm-sampler.md what it decided.

Each variant's run folder is <work>/tune/<name> (resumable); rows go to <work>/tune/<name>.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from rich.console import Console


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("workspace/bench/forecast_quality"))
    ap.add_argument("--budget-s", type=float, default=500.0, help="training wall-clock budget per variant (s)")
    ap.add_argument("--variant", action="append", default=[],
                    help="NAME=JSON of TrainConfig overrides on top of the default (repeatable)")
    ap.add_argument("--samplers", default="", help="tfm only: solver:steps list to score, e.g. euler:8,midpoint:2")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--max-targets", type=int, default=96, help="validation targets scored (evenly spaced)")
    args = ap.parse_args()

    import longitudinal.models  # noqa: F401
    from longitudinal.commands.train import print_evaluation_table
    from longitudinal.evaluation.harness import EvalConfig, evaluate_models
    from longitudinal.models.checkpoint import Checkpoint
    from longitudinal.training.config import load_train_config
    from longitudinal.training.fit import fit
    from longitudinal.training.logger import JsonlLogger

    console = Console()
    work = args.work.resolve()
    store_url = str(work / "cohort.zarr")
    if not (work / "cohort.zarr").exists():
        raise SystemExit(f"no cohort at {store_url}: run benchmarks/forecast_quality.py --work {work} first")
    for spec in args.variant or ["default={}"]:
        name, _, text = spec.partition("=")
        overrides = json.loads(text or "{}")
        cfg = load_train_config(None, budget_s=args.budget_s, calib_targets=0, **overrides)
        run = work / "tune" / name
        t = time.perf_counter()
        res = fit(cfg, store_url, run, JsonlLogger(run), progress=lambda m, n=name: console.print(f"  [{n}] {m}"))
        console.print(f"{name}: {res.steps} steps in {res.wall_s:.0f} s ({time.perf_counter() - t:.0f} s wall)")
        model = Checkpoint.load(res.checkpoint).build()
        samplers = [s.split(":") for s in args.samplers.split(",") if s] if cfg.model == "tfm" else []
        models = {}
        for solver, steps in samplers or [(None, None)]:
            m = model
            if solver:
                m = Checkpoint.load(res.checkpoint).build()
                m.config = dataclasses.replace(m.config, solver=solver, steps=int(steps))
            models[f"{name}" + (f"/{solver}:{steps}" if solver else "")] = m
        ecfg = EvalConfig(crop_size=tuple(cfg.crop_size), max_context=cfg.max_context, normalize=cfg.normalize,
                          n_samples=args.samples, seed=cfg.seed)
        report = evaluate_models(models, store_url, list(res.split.val), ecfg, max_targets=args.max_targets)
        report.to_json(work / "tune" / f"{name}.json")
        print_evaluation_table(report.rows, f"tuning {name} on {report.n_targets} VALIDATION targets of "
                                            f"{len(report.patients)} patients ({res.steps} steps)")
        for label in models:
            skill = {r["horizon"]: (round(r.get("skill_dice_whole", float("nan")), 3),
                                    round(r.get("skill_volume_error_ml", float("nan")), 3))
                     for r in report.rows if r["model"] == label}
            console.print(f"{label}: skill (Dice, volume error) vs lci by bin {skill}")


if __name__ == "__main__":
    main()
