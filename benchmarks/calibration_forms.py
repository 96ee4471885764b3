"""Volume-interval calibration forms compared on a forecast_quality.py work folder: signed vs symmetric scores.

For each trained sampled kind under <work>/runs/<kind>, this forecasts the validation targets exactly as the
end-of-training calibration does (``calib_samples`` samples, seed + 1, at most ``calib_targets`` targets) and the
test targets as forecast_quality.py scores them (--samples, seed), then fits each score form of
``longitudinal.models.calibration`` on the validation targets and prints, per horizon bin:

- the coverage of the 80% / 95% intervals on the test targets;
- the leave-one-patient-out coverage on the validation targets alone (each validation patient scored by a
  calibration fitted on the others), the criterion available before any test patient is seen;
- the mean signed error (true - median sampled volume, ml) on validation and on test, which shows whether a
  model's bias carries over from its validation patients to its test patients.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/calibration_forms.py --work /work/bench/fq64 --models np,tfm

Nothing is written into the checkpoints; per-target records go to <work>/calibration_forms/<kind>_<split>.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from _coverage import Cover, cell_text, cover, fit_whole, label, per_bin
from rich.console import Console
from rich.table import Table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True, help="a benchmarks/forecast_quality.py work folder")
    ap.add_argument("--models", default="np,tfm", help="trained sampled kinds under <work>/runs")
    ap.add_argument("--samples", type=int, default=16, help="samples per test target (as forecast_quality.py)")
    args = ap.parse_args()

    import longitudinal.models  # noqa: F401  (registers every model kind)
    from longitudinal.evaluation.harness import HORIZON_BINS, evaluate_models
    from longitudinal.models.calibration import FORMS
    from longitudinal.models.checkpoint import Checkpoint
    from longitudinal.training.config import TrainConfig
    from longitudinal.training.validation import calibration_eval_config

    console = Console(width=150)
    work = args.work.resolve()
    store_url = str(work / "cohort.zarr")
    out_dir = work / "calibration_forms"
    out_dir.mkdir(exist_ok=True)
    for kind in [k.strip() for k in args.models.split(",") if k.strip()]:
        run = work / "runs" / kind
        cfg = TrainConfig.model_validate(json.loads((run / "config.json").read_text()))
        split = json.loads((run / "split.json").read_text())
        model = Checkpoint.load(run / "checkpoints" / "best.pt").build()
        model.volume_calibration = None  # raw records; the forms are fitted below
        records = {}
        val_cfg = calibration_eval_config(cfg, "cpu")  # exactly as the end-of-training calibration
        test_cfg = dataclasses.replace(val_cfg, n_samples=args.samples, seed=cfg.seed)  # as forecast_quality.py
        for part, ecfg, cap in (("val", val_cfg, cfg.calib_targets), ("test", test_cfg, None)):
            rep = evaluate_models({kind: model}, store_url, list(split[part]), ecfg, max_targets=cap, baselines=False)
            records[part] = [r for r in rep.records if r["model"] == kind]
            (out_dir / f"{kind}_{part}.json").write_text(json.dumps(records[part], default=float))
        table = Table(title=f"{kind}: 80% / 95% coverage per horizon bin ({len(set(split['val']))} validation, "
                            f"{len(set(split['test']))} test patients)")
        table.add_column("form")
        table.add_column("scored on")
        labels = [label(lo, hi) for lo, hi in HORIZON_BINS]
        for lab in labels:
            table.add_column(lab, justify="right")
        table.add_column("worst |cov - nominal|", justify="right")
        for form in FORMS:
            cal = fit_whole(records["val"], form)
            for name, covers in (("test", cover(cal, records["test"])),
                                 ("val, leave-one-patient-out", _lopo(records["val"], form))):
                cells, worst = per_bin(covers, HORIZON_BINS)
                table.add_row(form, name, *map(cell_text, cells), f"{worst:.2f}")
        console.print(table)
        for part in ("val", "test"):
            bias = [_mean([r["volume_true_ml"] - r["volume_median_ml"] for r in records[part]
                           if lo <= r["horizon_days"] < hi]) for lo, hi in HORIZON_BINS]
            size = [_mean([r["volume_true_ml"] for r in records[part] if lo <= r["horizon_days"] < hi])
                    for lo, hi in HORIZON_BINS]
            console.print(f"{kind} {part}: mean signed error (true - median, ml) by bin "
                          f"{[round(b, 1) for b in bias]}; mean true volume {[round(s, 1) for s in size]} ml")


def _mean(xs: Sequence[float]) -> float:
    return float(np.mean(xs)) if xs else float("nan")


def _lopo(recs: Sequence[dict[str, Any]], form: str) -> list[Cover]:
    """Coverage of each validation patient's targets by a calibration fitted on the other patients."""
    out = []
    for pid in sorted({r["patient_id"] for r in recs}):
        rest = [r for r in recs if r["patient_id"] != pid]
        if rest:
            out += cover(fit_whole(rest, form), [r for r in recs if r["patient_id"] == pid])
    return out


if __name__ == "__main__":
    main()
