"""Exploratory (session 5): would a difficulty-scaled conformal score steady per-bin coverage?

Session 6 fixed c = 10 ml from this table, confirmed the form on an unseen cohort (calibration_confirm.py) and
made it the product's default (``VolumeCalibration`` form ``"scaled"``); this script keeps its own formula so
the exploration can be rerun as it was.

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
import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from _coverage import cell_text, label, per_bin
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
    from longitudinal.evaluation.harness import HORIZON_BINS, evaluate_models
    from longitudinal.training.config import TrainConfig
    from longitudinal.training.fit import calibration_eval_config

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
    linear: dict[str, dict[tuple, float]] = {}
    for name, stem in SETS.items():
        path = cache / f"linear_{stem}.json"
        if not path.exists():
            console.print(f"forecasting the linear baseline on set {name} ({len(patients[name])} patients)")
            ecfg = dataclasses.replace(calibration_eval_config(cfg, "cpu"), n_samples=1)
            rep = evaluate_models({}, stores[name], list(patients[name]), ecfg)
            path.write_text(json.dumps([{k: r[k] for k in ("patient_id", "target_idx", "last_context_idx",
                                                            "volume_pred_ml")}
                                        for r in rep.records if r["model"] == "linear"], default=float))
        linear[name] = {_key(r): r["volume_pred_ml"] for r in json.loads(path.read_text())}

    cs = [float(c) for c in args.c.split(",") if c.strip()]
    edges = [lo for lo, _hi in HORIZON_BINS if lo > 0]
    for kind in kinds:
        recs = {}
        for name, stem in SETS.items():
            rows = json.loads((cache / f"{kind}_{stem}.json").read_text())["records"]
            prefix = "fresh:" if name.startswith("F") else ""
            recs[name] = [{**r, "patient_id": prefix + r["patient_id"], "linear_ml": linear[name][_key(r)]}
                          for r in rows]
        pool, tests = recs["V"] + recs["F"], recs["T"] + recs["F'"]
        table = Table(title=f"{kind}: 80% / 95% coverage by horizon bin, symmetric vs difficulty-scaled scores "
                            "(exploratory)")
        for col in ("score", "scored on", *[label(lo, hi) for lo, hi in HORIZON_BINS], "worst", "mean 80% width ml"):
            table.add_column(col, justify="left" if col in ("score", "scored on") else "right")
        for form, c in [("symmetric", 0.0)] + [("difficulty", c) for c in cs]:
            name = "symmetric" if form == "symmetric" else f"difficulty, c = {c:g} ml"
            for scored, (cover, width) in (("V+F, 5-fold by patient", _cross_validated(pool, form, c, edges)),
                                           ("T+F'", _cover(_fit(pool, form, c, edges), tests, form, c, edges))):
                cells, worst = per_bin(cover, HORIZON_BINS)
                table.add_row(name, scored, *map(cell_text, cells), f"{worst:.2f}", f"{width:.1f}")
        console.print(table)


def _key(r: dict[str, Any]) -> tuple:
    return r["patient_id"], r["target_idx"], r["last_context_idx"]


def _sigma(recs: list[dict[str, Any]], form: str, c: float) -> np.ndarray:
    """Per-target scale: (offset + gap years), times (c + |median - linear|) for the difficulty form."""
    from longitudinal.models.calibration import horizon_scale

    s = horizon_scale(np.array([r["horizon_days"] for r in recs]), 0.25)
    if form == "difficulty":
        s = s * (c + np.abs(np.array([r["volume_median_ml"] - r["linear_ml"] for r in recs])))
    return s


def _fit(recs: list[dict[str, Any]], form: str, c: float, edges: list[float]) -> list[np.ndarray]:
    err = np.abs(np.array([r["volume_true_ml"] - r["volume_median_ml"] for r in recs]))
    score = err / _sigma(recs, form, c)
    which = np.searchsorted(edges, [r["horizon_days"] for r in recs], side="right")
    return [np.sort(score[which == i]) for i in range(len(edges) + 1)]


def _cover(cal: list[np.ndarray], recs: list[dict[str, Any]], form: str, c: float, edges: list[float]
           ) -> tuple[list[tuple[float, bool, bool]], float]:
    """(gap, 80% covered, 95% covered) per target with the conservative conformal rank, and the mean 80% width."""
    s = _sigma(recs, form, c)
    which = np.searchsorted(edges, [r["horizon_days"] for r in recs], side="right")
    out, widths = [], []
    for r, si, b in zip(recs, s, which, strict=True):
        e = cal[b]
        half = {p: si * e[min(math.ceil((len(e) + 1) * p), len(e)) - 1] for p in (0.80, 0.95)}
        m, v = r["volume_median_ml"], r["volume_true_ml"]
        out.append((r["horizon_days"], max(m - half[0.80], 0) <= v <= m + half[0.80],
                    max(m - half[0.95], 0) <= v <= m + half[0.95]))
        widths.append(m + half[0.80] - max(m - half[0.80], 0))
    return out, float(np.mean(widths))


def _cross_validated(pool: list[dict[str, Any]], form: str, c: float, edges: list[float]
                     ) -> tuple[list[tuple[float, bool, bool]], float]:
    ids = sorted({r["patient_id"] for r in pool})
    fold = {p: i % 5 for i, p in enumerate(np.random.default_rng(0).permutation(ids))}
    out, widths = [], []
    for f in range(5):
        held = [r for r in pool if fold[r["patient_id"]] == f]
        cover, width = _cover(_fit([r for r in pool if fold[r["patient_id"]] != f], form, c, edges), held, form, c,
                              edges)
        out += cover
        widths.append(width * len(held))
    return out, float(sum(widths) / len(pool))


if __name__ == "__main__":
    main()
