"""Volume-interval calibration studies on benchmarks/forecast_quality.py work folders, one subcommand per question.
Nothing is retrained and nothing is written into the checkpoints; forecasts are cached under the work folder, so
a rerun takes seconds. Shared code: benchmarks/_coverage.py. Figures: docs/RESULTS.md; the choices they led to:
docs/decisions/interval-calibration.md.

forms        Signed vs symmetric vs scaled scores, each fitted on the validation forecasts of every trained kind
             under <work>/runs: coverage of the 80% / 95% intervals on the test targets, leave-one-patient-out
             coverage on the validation targets alone (the criterion available before any test patient is seen)
             and the mean signed error by bin on validation and test (does a model's bias carry over?).
             Records: <work>/calibration_forms/<kind>_<split>.json.

heldout      How many calibration patients per-bin coverage needs. --fresh is a second work folder holding only
             a cohort of another seed (``forecast_quality.py --work FRESH --patients 128 --seed 1 --models ""
             --train-only``), cut by a seeded permutation into a calibration half F and a test half F'. Coverage
             for each calibration set (V: the run's validation split; F; V+F) on each test set (T: the run's test
             split; F'; T+F'); each bin's mean signed error and score percentiles; and --draws calibrations on m
             patients drawn from V+F (m in --sizes), scored on T+F'. Records: <work>/calibration_heldout/, with
             the cut in F.txt / Fp.txt (for ``longitudinal calibrate --patients "$(cat .../F.txt)"``).

difficulty   (Exploratory; run heldout first.) Scores divided by c + |median - linear forecast| for several c,
             under patient-grouped 5-fold cross-validation on V+F and calibrated on V+F, scored on T+F'. T+F'
             had been seen with the symmetric form, so a form chosen here needs confirming on unseen patients.

confirm      (Run heldout first.) The pre-registered confirmation of the scaled form
             (docs/decisions/interval-calibration-preregistration.md) on every patient of a third cohort G
             (--confirm, made with ``forecast_quality.py --work CONFIRM --patients 128 --seed 2 --models ""
             --train-only``): coverage on G for each form calibrated on V, F and V+F, the same rows on T, F' and
             T+F' for reference, and the primary verdict (np, scaled, V+F on G). Records:
             <work>/calibration_confirm/.

strata       The shipped per-stratum calibration of each trained kind, held out patient by patient on its own
             validation forecasts (served, as the end-of-training calibration forecasts them; the same rows the
             training log prints), the same with one calibration pooled over both strata, and the test coverage of ``<kind>_served`` in forecast_quality.py's
             <work>/targets.csv with 95% bootstrap intervals over patients. Records:
             <work>/calibration_strata/<kind>_val.json.

Validation-like records (V, F) are forecast as the end-of-training calibration forecasts them
(``calibration_eval_config``: calib_samples samples, seed + 1; V keeps the run's calib_targets cap), test-like
ones (T, F', G) as forecast_quality.py scores test patients (--samples, the run's seed).

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/calibration_study.py forms --work $WORK/fq64 --models np,tfm
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/calibration_study.py heldout --work $WORK/fq128 --fresh $WORK/fq128x
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/calibration_study.py difficulty --work $WORK/fq128 --fresh $WORK/fq128x
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/calibration_study.py strata --work $WORK/fq128 --models tfm,np
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/calibration_study.py confirm --work $WORK/fq128 \\
        --fresh $WORK/fq128x --confirm $WORK/fq128y
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
from _coverage import (
    TOLERANCE,
    cell_text,
    cover,
    cross_validated,
    error_summary,
    every,
    fit_whole,
    label,
    leave_one_patient_out,
    linear_forecasts,
    mean,
    per_bin,
    record_key,
    set_stem,
    subsample_row,
    width80,
)
from rich.console import Console
from rich.table import Table
from treatment_tables import read_targets

DEFAULT_WORK = Path("workspace/bench/forecast_quality")
PRIMARY = ("np", "scaled", "V+F")


def _kinds(spec: str) -> list[str]:
    return [k.strip() for k in spec.split(",") if k.strip()]


def _run(work: Path, kind: str) -> tuple[Any, dict[str, Any], Path]:
    """(TrainConfig, split, run folder) of a trained kind of a forecast_quality.py work folder."""
    from longitudinal.training.config import TrainConfig

    run = work / "runs" / kind
    cfg = TrainConfig.model_validate(json.loads((run / "config.json").read_text()))
    return cfg, json.loads((run / "split.json").read_text()), run


def _raw_model(run: Path) -> Any:
    """The run's best checkpoint as a bare model without its calibration (the studies fit their own)."""
    from longitudinal.models.checkpoint import Checkpoint

    model = Checkpoint.load(run / "checkpoints" / "best.pt").build()
    model.volume_calibration = None
    return model


# --- forms ------------------------------------------------------------------------------------------------
def forms(args: argparse.Namespace) -> None:
    from longitudinal.evaluation.harness import HORIZON_BINS, evaluate_models
    from longitudinal.models.calibration import FORMS
    from longitudinal.training.validation import calibration_eval_config

    console = Console(width=150)
    work = args.work.resolve()
    store_url = str(work / "cohort.zarr")
    out_dir = work / "calibration_forms"
    out_dir.mkdir(exist_ok=True)
    for kind in _kinds(args.models):
        cfg, split, run = _run(work, kind)
        model = _raw_model(run)
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
        for lo, hi in HORIZON_BINS:
            table.add_column(label(lo, hi), justify="right")
        table.add_column("worst |cov - nominal|", justify="right")
        for form in FORMS:
            cal = fit_whole(records["val"], form)
            for name, covers in (("test", cover(cal, records["test"])),
                                 ("val, leave-one-patient-out", leave_one_patient_out(records["val"], form))):
                cells, worst = per_bin(covers, HORIZON_BINS)
                table.add_row(form, name, *map(cell_text, cells), f"{worst:.2f}")
        console.print(table)
        for part in ("val", "test"):
            bias = [mean([r["volume_true_ml"] - r["volume_median_ml"] for r in records[part]
                          if lo <= r["horizon_days"] < hi]) for lo, hi in HORIZON_BINS]
            size = [mean([r["volume_true_ml"] for r in records[part] if lo <= r["horizon_days"] < hi])
                    for lo, hi in HORIZON_BINS]
            console.print(f"{kind} {part}: mean signed error (true - median, ml) by bin "
                          f"{[round(b, 1) for b in bias]}; mean true volume {[round(s, 1) for s in size]} ml")


# --- heldout ----------------------------------------------------------------------------------------------
def heldout(args: argparse.Namespace) -> None:
    from longitudinal.evaluation.harness import HORIZON_BINS, evaluate_models
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
    (cache / "F.txt").write_text(",".join(f_cal))
    (cache / "Fp.txt").write_text(",".join(f_test))
    labels = [label(lo, hi) for lo, hi in HORIZON_BINS]
    for kind in _kinds(args.models):
        cfg, split, run = _run(work, kind)
        model = _raw_model(run)
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
            path = cache / f"{kind}_{set_stem(name)}.json"
            key = {"store": store, "patients": list(pids), "samples": ecfg.n_samples, "seed": ecfg.seed, "cap": cap}
            cached = json.loads(path.read_text()) if path.exists() else {}
            if cached.get("key") != key:
                console.print(f"{kind}: forecasting set {name} ({len(pids)} patients, {ecfg.n_samples} samples)")
                rep = evaluate_models({kind: model}, store, list(pids), ecfg, max_targets=cap, baselines=False,
                                      progress=every(50, f"{kind} {name}", console))
                cached = {"key": key, "records": [r for r in rep.records if r["model"] == kind]}
                path.write_text(json.dumps(cached, default=float))
            recs[name] = [{**r, "patient_id": prefix + r["patient_id"]} for r in cached["records"]]

        table = Table(title=f"{kind}: calibrated 80% / 95% whole-tumour volume coverage per horizon bin "
                            f"(n targets); V {len(split['val'])}, T {len(split['test'])}, F {len(f_cal)}, "
                            f"F' {len(f_test)} patients")
        for col in ("calibrated on", "patients", "scored on", *labels, "worst |cov - nominal|"):
            table.add_column(col, justify="left" if col in ("calibrated on", "scored on") else "right")
        for cal_name in ("V", "F", "V+F"):
            cal = fit_whole([r for part in cal_name.split("+") for r in recs[part]])
            for test_name in ("T", "F'", "T+F'"):
                cells, worst = per_bin(cover(cal, [r for part in test_name.split("+") for r in recs[part]]))
                table.add_row(cal_name, str(cal.n_patients), test_name, *map(cell_text, cells), f"{worst:.2f}")
        console.print(table)

        pool = recs["V"] + recs["F"]
        tests = recs["T"] + recs["F'"]
        for name, part in (("V+F", pool), ("T+F'", tests)):
            console.print(f"{kind} {name}: " + "; ".join(error_summary(part, lo, hi) for lo, hi in HORIZON_BINS))
        sub = Table(title=f"{kind}: {args.draws} calibrations on m patients drawn from V+F, scored on T+F' "
                          f"({len({r['patient_id'] for r in tests})} patients): coverage 80% / 95%, "
                          "5th-95th percentile (median)")
        for col in ("m", *labels, f"all cells within {TOLERANCE:.2f}"):
            sub.add_column(col, justify="right")
        rng = np.random.default_rng(args.seed)
        for m in [int(s) for s in args.sizes.split(",") if s.strip()]:
            sub.add_row(*subsample_row(pool, tests, m, args.draws, rng, len(HORIZON_BINS)))
        console.print(sub)


# --- cached records of heldout, with the linear baseline's forecasts ---------------------------------------
def _heldout_records(work: Path, fresh: Path, kinds: list[str]) -> tuple[dict[str, dict[str, list]], Any]:
    """kind -> set (V, T, F, F') -> heldout's cached records, each with ``volume_linear_ml``; and the run's
    calibration EvalConfig."""
    from longitudinal.training.validation import calibration_eval_config

    held = work / "calibration_heldout"
    cfg, split, _run_dir = _run(work, kinds[0])  # forecast_quality.py trains every kind on one split
    stores = {"V": str(work / "cohort.zarr"), "T": str(work / "cohort.zarr"), "F": str(fresh / "cohort.zarr"),
              "F'": str(fresh / "cohort.zarr")}
    patients = {"V": split["val"], "T": split["test"], "F": (held / "F.txt").read_text().split(","),
                "F'": (held / "Fp.txt").read_text().split(",")}
    ecfg = calibration_eval_config(cfg, "cpu")
    linear = {name: linear_forecasts(held / f"linear_{set_stem(name)}.json", stores[name], patients[name], ecfg)
              for name in stores}
    out: dict[str, dict[str, list]] = {}
    for kind in kinds:
        out[kind] = {}
        for name, lin in linear.items():
            rows = json.loads((held / f"{kind}_{set_stem(name)}.json").read_text())["records"]
            prefix = "fresh:" if name.startswith("F") else ""
            out[kind][name] = [{**r, "patient_id": prefix + r["patient_id"], "volume_linear_ml": lin[record_key(r)]}
                               for r in rows]
    return out, ecfg


# --- difficulty -------------------------------------------------------------------------------------------
def difficulty(args: argparse.Namespace) -> None:
    from longitudinal.evaluation.harness import HORIZON_BINS

    console = Console(width=170)
    kinds = _kinds(args.models)
    records, _ecfg = _heldout_records(args.work.resolve(), args.fresh.resolve(), kinds)
    cs = [float(c) for c in args.c.split(",") if c.strip()]
    for kind in kinds:
        recs = records[kind]
        pool, tests = recs["V"] + recs["F"], recs["T"] + recs["F'"]
        table = Table(title=f"{kind}: 80% / 95% coverage by horizon bin, symmetric vs difficulty-scaled scores "
                            "(exploratory)")
        for col in ("score", "scored on", *[label(lo, hi) for lo, hi in HORIZON_BINS], "worst", "mean 80% width ml"):
            table.add_column(col, justify="left" if col in ("score", "scored on") else "right")
        for form, c in [("symmetric", 0.0)] + [("scaled", c) for c in cs]:
            name = "symmetric" if form == "symmetric" else f"difficulty, c = {c:g} ml"
            cal = fit_whole(pool, form, c)
            for scored, (covers, width) in (("V+F, 5-fold by patient", cross_validated(pool, form, c)),
                                            ("T+F'", (cover(cal, tests), width80(cal, tests)))):
                cells, worst = per_bin(covers, HORIZON_BINS)
                table.add_row(name, scored, *map(cell_text, cells), f"{worst:.2f}", f"{width:.1f}")
        console.print(table)


# --- confirm ----------------------------------------------------------------------------------------------
def confirm(args: argparse.Namespace) -> None:
    from longitudinal.evaluation.harness import HORIZON_BINS, evaluate_models
    from longitudinal.training.validation import calibration_eval_config
    from storage.store import CohortStore

    console = Console(width=180)
    work, confirm_dir = args.work.resolve(), args.confirm.resolve()
    out = work / "calibration_confirm"
    out.mkdir(exist_ok=True)
    g_store = str(confirm_dir / "cohort.zarr")
    g_ids = sorted(CohortStore.open(g_store).patient_ids())
    (out / "G.txt").write_text(",".join(g_ids))
    kinds = _kinds(args.models)
    records, _ecfg = _heldout_records(work, args.fresh.resolve(), kinds)
    labels = [label(lo, hi) for lo, hi in HORIZON_BINS]
    verdict = None
    for kind in kinds:
        cfg, _split, run = _run(work, kind)
        recs = records[kind]
        path = out / f"{kind}_G.json"
        test_cfg = dataclasses.replace(calibration_eval_config(cfg, "cpu"), n_samples=args.samples, seed=cfg.seed)
        key = {"store": g_store, "patients": g_ids, "samples": test_cfg.n_samples, "seed": test_cfg.seed}
        cached = json.loads(path.read_text()) if path.exists() else {}
        if cached.get("key") != key:
            console.print(f"{kind}: forecasting G ({len(g_ids)} patients, {test_cfg.n_samples} samples)")
            rep = evaluate_models({kind: _raw_model(run)}, g_store, g_ids, test_cfg, baselines=False,
                                  progress=every(50, f"{kind} G", console))
            cached = {"key": key, "records": [r for r in rep.records if r["model"] == kind]}
            path.write_text(json.dumps(cached, default=float))
        recs["G"] = [{**r, "patient_id": "confirm:" + r["patient_id"]} for r in cached["records"]]

        for test_name in ("G", "T", "F'", "T+F'"):
            test = [r for part in test_name.split("+") for r in recs[part]]
            n_pat = len({r["patient_id"] for r in test})
            title = (f"{kind}: 80% / 95% whole-tumour volume coverage on {test_name} ({n_pat} patients) per horizon "
                     "bin (n targets)" + (", unseen cohort" if test_name == "G" else
                                          ", seen before the form was chosen (reference only)"))
            table = Table(title=title)
            for col in ("scores", "calibrated on", "patients", *labels, "worst", "mean 80% width ml"):
                table.add_column(col, justify="left" if col in ("scores", "calibrated on") else "right")
            for form in ("symmetric", "scaled"):
                for cal_name in ("V", "F", "V+F"):
                    cal = fit_whole([r for part in cal_name.split("+") for r in recs[part]], form, args.c)
                    cells, worst = per_bin(cover(cal, test))
                    name = form if form == "symmetric" else f"scaled, c = {args.c:g} ml"
                    table.add_row(name, cal_name, str(cal.n_patients), *map(cell_text, cells), f"{worst:.2f}",
                                  f"{width80(cal, test):.1f}")
                    if test_name == "G" and (kind, form, cal_name) == PRIMARY:
                        verdict = (worst, cells)
            console.print(table)
    if verdict is not None:
        worst, cells = verdict
        ok = worst <= TOLERANCE + 1e-12
        console.print(f"[bold]primary (np, scaled c = {args.c:g} ml, calibrated on V+F, scored on G): "
                      f"{'PASS' if ok else 'FAIL'}[/bold] - worst |coverage - nominal| {worst:.2f} "
                      f"(tolerance {TOLERANCE:.2f}); " + "; ".join(
                          f"{lab} {cell_text(c)}" for lab, c in zip(labels, cells, strict=True)))


# --- strata -----------------------------------------------------------------------------------------------
def strata(args: argparse.Namespace) -> None:
    from longitudinal.evaluation.calibration import calibration_records
    from longitudinal.evaluation.strata import STRATUM_LABELS, leave_one_patient_out, stratum_mean
    from longitudinal.models.checkpoint import Checkpoint
    from longitudinal.training.validation import calibration_eval_config

    console = Console(width=150)
    work = args.work.resolve()
    out_dir = work / "calibration_strata"
    out_dir.mkdir(exist_ok=True)
    tests = read_targets(work / "targets.csv") if (work / "targets.csv").is_file() else []
    for kind in _kinds(args.models):
        cfg, split, run = _run(work, kind)
        cache = out_dir / f"{kind}_val.json"
        if cache.is_file():
            recs = json.loads(cache.read_text())
        else:
            ckpt = Checkpoint.load(run / "checkpoints" / "best.pt")
            recs = calibration_records(ckpt, str(work / "cohort.zarr"), list(split["val"]),
                                       calibration_eval_config(cfg, "cpu"), max_targets=cfg.calib_targets)
            cache.write_text(json.dumps(recs, default=float))
        rows = leave_one_patient_out(recs, form=cfg.calib_form, difficulty_ml=cfg.calib_difficulty_ml)
        # The alternative: one calibration for both strata (no stratum ever has enough targets of its own).
        pooled = {(c.stratum, c.lo_days): c for c in leave_one_patient_out(
            recs, form=cfg.calib_form, difficulty_ml=cfg.calib_difficulty_ml, min_targets=len(recs) + 1)}
        table = Table(title=f"{kind}: 80% / 95% coverage, validation held out patient by patient vs test "
                            f"({kind}_served)")
        for col in ("stratum", "horizon", "validation, leave-one-patient-out (targets, patients)",
                    "the same, pooled calibration", "test [95% interval over patients] (targets, patients)"):
            table.add_column(col)
        for c in rows:
            t80, t95 = (stratum_mean(tests, f"{kind}_served", key, c.stratum, c.lo_days, c.hi_days)
                        for key in ("coverage80", "coverage95"))
            test = ("-" if not t80.n_targets else
                    f"{t80.mean:.2f} [{t80.lo:.2f}, {t80.hi:.2f}] / {t95.mean:.2f} [{t95.lo:.2f}, {t95.hi:.2f}] "
                    f"({t80.n_targets}, {t80.n_patients})")
            table.add_row(STRATUM_LABELS[c.stratum], label(c.lo_days, c.hi_days),
                          f"{c.coverage80:.2f} / {c.coverage95:.2f} ({c.n_targets}, {c.n_patients})",
                          f"{pooled[(c.stratum, c.lo_days)].coverage80:.2f} / "
                          f"{pooled[(c.stratum, c.lo_days)].coverage95:.2f}", test)
        console.print(table)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="study", required=True)

    def study(name: str, fn: Any, help_: str, fresh: bool = False) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_)
        p.set_defaults(fn=fn)
        p.add_argument("--work", type=Path, default=DEFAULT_WORK,
                       help="a benchmarks/forecast_quality.py work folder with trained runs")
        p.add_argument("--models", default="np,tfm", help="trained sampled kinds under <work>/runs")
        if fresh:
            p.add_argument("--fresh", type=Path, default=Path(f"{DEFAULT_WORK}_fresh"),
                           help="a forecast_quality.py work folder holding a cohort of another seed (no runs)")
        return p

    p = study("forms", forms, "signed vs symmetric vs scaled scores on the validation forecasts")
    p.add_argument("--samples", type=int, default=16, help="samples per test target (as forecast_quality.py)")
    p = study("heldout", heldout, "coverage vs the number of calibration patients (fresh cohort)", fresh=True)
    p.add_argument("--samples", type=int, default=16, help="samples per test target (as forecast_quality.py)")
    p.add_argument("--seed", type=int, default=0, help="seed of the fresh patients' calibration / test cut")
    p.add_argument("--sizes", default="10,19,40,83", help="calibration patient counts to subsample")
    p.add_argument("--draws", type=int, default=400, help="subsampled calibrations per size")
    p = study("difficulty", difficulty, "difficulty-scaled scores for several c (exploratory)", fresh=True)
    p.add_argument("--c", default="2,5,10,20", help="difficulty offsets c (ml) to compare")
    p = study("confirm", confirm, "the pre-registered confirmation on an unseen cohort", fresh=True)
    p.add_argument("--confirm", type=Path, default=Path(f"{DEFAULT_WORK}_confirm"),
                   help="a work folder holding a third, unseen cohort (G)")
    p.add_argument("--samples", type=int, default=16, help="samples per test target (as forecast_quality.py)")
    p.add_argument("--c", type=float, default=10.0, help="the scaled form's c (ml); pre-registered: 10")
    study("strata", strata, "the per-stratum calibration held out patient by patient, beside test coverage")
    args = ap.parse_args()

    import longitudinal.models  # noqa: F401  (registers every model kind)

    args.fn(args)


if __name__ == "__main__":
    main()
