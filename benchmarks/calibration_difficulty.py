"""Exploratory (session 5): would a difficulty-scaled conformal score steady per-bin coverage?

Session 6 fixed c = 10 ml from this table, confirmed the form on an unseen cohort (calibration_confirm.py) and
made it the product's default (``VolumeCalibration`` form ``"scaled"``, which this script now fits and scores
with; the tables are the same as with session 5's own formula).

benchmarks/calibration_heldout.py found that per-bin 80% coverage moves by 10-20 points between patient sets
because a minority of fast growers carries heavy-tailed errors. A normalised conformal score divides each error by
a per-target estimate of difficulty; here the estimate is how far the model's median sampled volume is from the
closed-form ``linear`` baseline's forecast of the same target (the two disagree where the tumour grows fast):

    score e = |v_true - m| / ((offset + gap_years) * (c + |m - v_linear|))      c in ml, --c

against the shipped symmetric score e = |v_true - m| / (offset + gap_years). For each form it prints the
coverage by horizon bin (Mondrian, as shipped) under patient-grouped 5-fold cross-validation on the calibration
pool V + F (the criterion available without test patients), then calibrated on V + F and scored on T + F', with
the mean 80% interval width. It reuses the sampled-model records and the fresh cut that calibration_heldout.py
cached under <work>/calibration_heldout/ (run that first), and forecasts the linear baseline on the same targets
(cached there as linear_<set>.json).

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/calibration_difficulty.py --work /work/bench/fq128 \\
        --fresh /work/bench/fq128x --models np,tfm

Exploratory: T + F' had been scored with the symmetric form before this was written, so a form chosen from
this table needs confirming on patients not yet seen (another fresh cohort).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
from _coverage import cell_text, cover, fit_whole, label, linear_forecasts, per_bin, record_key, width80
from rich.console import Console
from rich.table import Table

SETS = {"V": "V", "T": "T", "F": "F", "F'": "Fp"}  # set -> cache-file stem


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("workspace/bench/forecast_quality"))
    ap.add_argument("--fresh", type=Path, default=Path("workspace/bench/forecast_quality_fresh"))
    ap.add_argument("--models", default="np,tfm")
    ap.add_argument("--c", default="2,5,10,20", help="difficulty offsets c (ml) to compare")
    args = ap.parse_args()

    import longitudinal.models  # noqa: F401  (registers every model kind)
    from longitudinal.evaluation.harness import HORIZON_BINS
    from longitudinal.training.config import TrainConfig
    from longitudinal.training.validation import calibration_eval_config

    console = Console(width=170)
    work, fresh = args.work.resolve(), args.fresh.resolve()
    cache = work / "calibration_heldout"
    cut = {"F": (cache / "F.txt").read_text().split(","), "F'": (cache / "Fp.txt").read_text().split(",")}
    kinds = [k.strip() for k in args.models.split(",") if k.strip()]
    run = work / "runs" / kinds[0]  # forecast_quality.py trains every kind on one split
    split = json.loads((run / "split.json").read_text())
    cfg = TrainConfig.model_validate(json.loads((run / "config.json").read_text()))
    stores = {"V": str(work / "cohort.zarr"), "T": str(work / "cohort.zarr"),
              "F": str(fresh / "cohort.zarr"), "F'": str(fresh / "cohort.zarr")}
    patients = {"V": split["val"], "T": split["test"], **cut}
    ecfg = calibration_eval_config(cfg, "cpu")
    linear = {name: linear_forecasts(cache / f"linear_{stem}.json", stores[name], patients[name], ecfg)
              for name, stem in SETS.items()}

    cs = [float(c) for c in args.c.split(",") if c.strip()]
    for kind in kinds:
        recs = {}
        for name, stem in SETS.items():
            rows = json.loads((cache / f"{kind}_{stem}.json").read_text())["records"]
            prefix = "fresh:" if name.startswith("F") else ""
            recs[name] = [{**r, "patient_id": prefix + r["patient_id"],
                           "volume_linear_ml": linear[name][record_key(r)]} for r in rows]
        pool, tests = recs["V"] + recs["F"], recs["T"] + recs["F'"]
        table = Table(title=f"{kind}: 80% / 95% coverage by horizon bin, symmetric vs difficulty-scaled scores "
                            "(exploratory)")
        for col in ("score", "scored on", *[label(lo, hi) for lo, hi in HORIZON_BINS], "worst", "mean 80% width ml"):
            table.add_column(col, justify="left" if col in ("score", "scored on") else "right")
        for form, c in [("symmetric", 0.0)] + [("scaled", c) for c in cs]:
            name = "symmetric" if form == "symmetric" else f"difficulty, c = {c:g} ml"
            cal = fit_whole(pool, form, c)
            for scored, (covers, width) in (("V+F, 5-fold by patient", _cross_validated(pool, form, c)),
                                            ("T+F'", (cover(cal, tests), width80(cal, tests)))):
                cells, worst = per_bin(covers, HORIZON_BINS)
                table.add_row(name, scored, *map(cell_text, cells), f"{worst:.2f}", f"{width:.1f}")
        console.print(table)


def _cross_validated(pool: list[dict[str, Any]], form: str, c: float) -> tuple[list[tuple[float, bool, bool]], float]:
    """Coverage of each pool target under patient-grouped 5-fold calibration, and the mean 80% width."""
    ids = sorted({r["patient_id"] for r in pool})
    fold = {p: i % 5 for i, p in enumerate(np.random.default_rng(0).permutation(ids))}
    out, widths = [], []
    for f in range(5):
        held = [r for r in pool if fold[r["patient_id"]] == f]
        cal = fit_whole([r for r in pool if fold[r["patient_id"]] != f], form, c)
        out += cover(cal, held)
        widths.append(width80(cal, held) * len(held))
    return out, float(sum(widths) / len(pool))


if __name__ == "__main__":
    main()
