"""How many calibration patients per-bin interval coverage needs: trained models recalibrated on fresh patients.

A forecast_quality.py run calibrates each sampled model on its validation split (V: 19 patients at 128) and
scores it on its test split (T: 26). Both are small, and the targets of one patient are correlated, so per-bin
coverage moves by several points from one cohort to the next. This benchmark measures that, with the models as
trained (nothing is retrained and nothing is written into the checkpoints):

- ``--fresh`` is a second work folder holding only a cohort drawn from the same generator with another seed
  (patients the models never saw), made with
  ``forecast_quality.py --work FRESH --patients 128 --seed 1 --models "" --train-only``;
- its patients are cut by a permutation seeded with ``--seed`` (fixed before any of them was scored) into a
  calibration half F and a test half F';
- per kind, coverage of the calibrated 80% / 95% whole-tumour volume intervals per horizon bin for each
  calibration set (V as trained; F, what ``longitudinal calibrate`` on the fresh patients gives; V + F) on each
  test set (T; F'; T + F');
- subsampling: ``--draws`` calibrations, each on m patients drawn without replacement from V + F (m in
  ``--sizes``), scored on T + F': the 5th / 50th / 95th percentiles of each bin's coverage and the share of draws
  whose every cell (both levels, every bin with >= 3 targets) is within 10 points of nominal;
- per bin, on the calibration pool V + F and on the test patients T + F': the mean signed error (true - median
  sampled volume) and the 50th / 80th / 95th percentiles of the conformal scores, which show how heavy the
  error tail is and whether the two sets differ.

Validation-like records (V, F) are forecast as the end-of-training calibration forecasts them
(``calibration_eval_config``: calib_samples samples, seed + 1; V keeps the run's calib_targets cap, F is
uncapped), test-like ones (T, F') as forecast_quality.py scores them (--samples, the run's seed). Records are
cached in <work>/calibration_heldout/<kind>_<set>.json, the fresh patients' cut in F.txt and Fp.txt there
(comma-separated ids, for ``longitudinal calibrate`` and ``longitudinal evaluate``).

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/calibration_heldout.py --work /work/bench/fq128 \\
        --fresh /work/bench/fq128x --models np,tfm
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from _coverage import TOLERANCE, cell_text, cover, fit_whole, label, per_bin
from rich.console import Console
from rich.table import Table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("workspace/bench/forecast_quality"),
                    help="a benchmarks/forecast_quality.py work folder with trained runs")
    ap.add_argument("--fresh", type=Path, default=Path("workspace/bench/forecast_quality_fresh"),
                    help="a forecast_quality.py work folder holding a cohort of another seed (no runs needed)")
    ap.add_argument("--models", default="np,tfm", help="trained sampled kinds under <work>/runs")
    ap.add_argument("--samples", type=int, default=16, help="samples per test target (as forecast_quality.py)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the fresh patients' calibration / test cut")
    ap.add_argument("--sizes", default="10,19,40,83", help="calibration patient counts to subsample")
    ap.add_argument("--draws", type=int, default=400, help="subsampled calibrations per size")
    args = ap.parse_args()

    import longitudinal.models  # noqa: F401  (registers every model kind)
    from longitudinal.evaluation.harness import HORIZON_BINS, evaluate_models
    from longitudinal.models.checkpoint import Checkpoint
    from longitudinal.training.config import TrainConfig
    from longitudinal.training.validation import calibration_eval_config
    from storage.store import CohortStore

    console = Console(width=160)
    work, fresh = args.work.resolve(), args.fresh.resolve()
    fresh_store = str(fresh / "cohort.zarr")
    fresh_ids = sorted(CohortStore.open(fresh_store).patient_ids())
    order = np.random.default_rng(args.seed).permutation(len(fresh_ids))
    half = len(fresh_ids) // 2
    f_cal = sorted(fresh_ids[i] for i in order[:half])
    f_test = sorted(fresh_ids[i] for i in order[half:])
    cache = work / "calibration_heldout"
    cache.mkdir(exist_ok=True)
    # the cut, for `longitudinal calibrate --patients "$(cat .../F.txt)"` and `evaluate --patients ...`
    (cache / "F.txt").write_text(",".join(f_cal))
    (cache / "Fp.txt").write_text(",".join(f_test))
    labels = [label(lo, hi) for lo, hi in HORIZON_BINS]
    for kind in [k.strip() for k in args.models.split(",") if k.strip()]:
        run = work / "runs" / kind
        cfg = TrainConfig.model_validate(json.loads((run / "config.json").read_text()))
        split = json.loads((run / "split.json").read_text())
        model = Checkpoint.load(run / "checkpoints" / "best.pt").build()
        model.volume_calibration = None  # raw records; calibrations are fitted below
        val_cfg = calibration_eval_config(cfg, "cpu")
        test_cfg = dataclasses.replace(val_cfg, n_samples=args.samples, seed=cfg.seed)
        plan = {  # set -> (store, patients, eval config, target cap, id prefix)
            "V": (str(work / "cohort.zarr"), split["val"], val_cfg, cfg.calib_targets, ""),
            "T": (str(work / "cohort.zarr"), split["test"], test_cfg, None, ""),
            # another store, another pseudonym key: prefixed so patient ids cannot collide
            "F": (fresh_store, f_cal, val_cfg, None, "fresh:"),
            "F'": (fresh_store, f_test, test_cfg, None, "fresh:"),
        }
        recs: dict[str, list[dict[str, Any]]] = {}
        for name, (store, pids, ecfg, cap, prefix) in plan.items():
            path = cache / f"{kind}_{name.replace(chr(39), 'p')}.json"
            key = {"store": store, "patients": list(pids), "samples": ecfg.n_samples, "seed": ecfg.seed, "cap": cap}
            cached = json.loads(path.read_text()) if path.exists() else {}
            if cached.get("key") != key:
                console.print(f"{kind}: forecasting set {name} ({len(pids)} patients, {ecfg.n_samples} samples)")
                rep = evaluate_models({kind: model}, store, list(pids), ecfg, max_targets=cap, baselines=False)
                cached = {"key": key, "records": [r for r in rep.records if r["model"] == kind]}
                path.write_text(json.dumps(cached, default=float))
            recs[name] = [{**r, "patient_id": prefix + r["patient_id"]} for r in cached["records"]]

        table = Table(title=f"{kind}: calibrated 80% / 95% whole-tumour volume coverage per horizon bin "
                            f"(n targets); V {len(split['val'])}, T {len(split['test'])}, F {len(f_cal)}, "
                            f"F' {len(f_test)} patients")
        for col in ("calibrated on", "patients", "scored on", *labels, "worst |cov - nominal|"):
            table.add_column(col, justify="left" if col in ("calibrated on", "scored on") else "right")
        for cal_name in ("V", "F", "V+F"):
            cal_recs = [r for part in cal_name.split("+") for r in recs[part]]
            cal = fit_whole(cal_recs)
            for test_name in ("T", "F'", "T+F'"):
                cells, worst = per_bin(cover(cal, [r for part in test_name.split("+") for r in recs[part]]))
                table.add_row(cal_name, str(cal.n_patients), test_name, *map(cell_text, cells), f"{worst:.2f}")
        console.print(table)

        pool = recs["V"] + recs["F"]
        tests = recs["T"] + recs["F'"]
        for name, part in (("V+F", pool), ("T+F'", tests)):
            console.print(f"{kind} {name}: " + "; ".join(_error_summary(part, lo, hi) for lo, hi in HORIZON_BINS))
        sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
        sub = Table(title=f"{kind}: {args.draws} calibrations on m patients drawn from V+F, scored on T+F' "
                          f"({len({r['patient_id'] for r in tests})} patients): coverage 80% / 95%, "
                          "5th-95th percentile (median)")
        for col in ("m", *labels, f"all cells within {TOLERANCE:.2f}"):
            sub.add_column(col, justify="right")
        rng = np.random.default_rng(args.seed)
        for m in sizes:
            sub.add_row(*_subsample(pool, tests, m, args.draws, rng, len(HORIZON_BINS)))
        console.print(sub)


def _error_summary(recs: Sequence[dict[str, Any]], lo: float, hi: float) -> str:
    """One bin's mean signed error (true - median sampled volume, ml) and the 50th / 80th / 95th percentiles of
    its conformal scores (|error| per year of scale, ``longitudinal.models.calibration``)."""
    from longitudinal.models.calibration import horizon_scale

    sel = [r for r in recs if lo <= r["horizon_days"] < hi]
    if not sel:
        return f"{label(lo, hi)}: -"
    err = np.array([r["volume_true_ml"] - r["volume_median_ml"] for r in sel])
    score = np.abs(err) / horizon_scale(np.array([r["horizon_days"] for r in sel]), 0.25)
    q = np.percentile(score, [50, 80, 95])
    return f"{label(lo, hi)}: bias {err.mean():+.1f} ml, scores p50/p80/p95 {q[0]:.1f}/{q[1]:.1f}/{q[2]:.1f}"


def _subsample(pool: Sequence[dict[str, Any]], tests: Sequence[dict[str, Any]], m: int, draws: int,
               rng: np.random.Generator, n_bins: int) -> list[str]:
    """Row of the subsampling table: per-bin percentiles of coverage over ``draws`` calibrations on ``m``
    patients of ``pool``, and the share of draws within tolerance everywhere."""
    by_patient: dict[str, list[dict[str, Any]]] = {}
    for r in pool:
        by_patient.setdefault(r["patient_id"], []).append(r)
    ids = sorted(by_patient)
    if m > len(ids):
        return [str(m), *["-"] * n_bins, f"(only {len(ids)} patients)"]
    c80 = np.full((draws, n_bins), np.nan)
    c95 = np.full((draws, n_bins), np.nan)
    ok = 0
    for d in range(draws):
        chosen = rng.choice(len(ids), size=m, replace=False)
        cal = fit_whole([r for i in chosen for r in by_patient[ids[i]]])
        cells, worst = per_bin(cover(cal, tests))
        for b, cell in enumerate(cells):
            if cell is not None:
                c80[d, b], c95[d, b] = cell[0], cell[1]
        ok += worst <= TOLERANCE + 1e-12
    out = [str(m)]
    for b in range(n_bins):
        p80 = np.nanpercentile(c80[:, b], [5, 50, 95])
        p95 = np.nanpercentile(c95[:, b], [5, 50, 95])
        out.append(f"{p80[0]:.2f}-{p80[2]:.2f} ({p80[1]:.2f}) / {p95[0]:.2f}-{p95[2]:.2f} ({p95[1]:.2f})")
    out.append(f"{ok / draws:.0%}")
    return out


if __name__ == "__main__":
    main()
