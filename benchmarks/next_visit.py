"""Whole-tumour Dice and volume error at the NEXT real visit of held-out patients, model vs LCI.

Reuses the work folder of benchmarks/forecast_quality.py (its store, split and trained checkpoints):

    .venv/bin/python benchmarks/forecast_quality.py --work W ...   # first
    .venv/bin/python benchmarks/next_visit.py --work W --models tfm,np
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from longitudinal.evaluation.harness import EvalConfig, evaluate_models, load_model_ref


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--models", default="tfm,np")
    ap.add_argument("--samples", type=int, default=8)
    args = ap.parse_args()
    models, split = {}, None
    for kind in [m for m in args.models.split(",") if m]:
        run = args.work / "runs" / kind
        if not (run / "checkpoints" / "best.pt").exists():
            continue
        _, models[kind], _ = load_model_ref(str(run / "checkpoints" / "best.pt"))
        split = split or json.loads((run / "split.json").read_text())
    if split is None:
        raise SystemExit(f"no trained model under {args.work}/runs: run benchmarks/forecast_quality.py first")
    report = evaluate_models(models, str(args.work / "cohort.zarr"), split["test"],
                             EvalConfig(pairs="next", n_samples=args.samples))
    table = Table(title=f"next visit of {len(split['test'])} held-out patients")
    for col in ("model", "n", "Dice WT", "|dV| ml"):
        table.add_column(col)
    for r in report.rows:
        if r["horizon"] == "all":
            table.add_row(r["model"], str(r["n"]), f"{r['dice_whole']:.3f}", f"{r['volume_error_ml']:.2f}")
    Console(width=120).print(table)


if __name__ == "__main__":
    main()
