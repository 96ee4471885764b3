"""Confirmation on an unseen cohort: do difficulty-scaled conformal intervals hold their per-bin coverage?

docs/preregistration_calibration_seed2.md fixed, before any of these patients was forecast, the form under test
(``"scaled"``, c = 10 ml; ``longitudinal.models.calibration``), the calibration records (V: the run's validation
split; F: the 63 fresh seed-1 patients of calibration_heldout.py's cut) and the test set G: every patient of a
third cohort (``--confirm``, made with ``forecast_quality.py --work CONFIRM --patients 128 --seed 2 --models ""
--train-only``), which neither the models nor any earlier benchmark had seen.

Per kind it prints the 80% / 95% whole-tumour volume coverage on G per horizon bin for each form (symmetric,
scaled) calibrated on V, F and V + F, the worst |coverage - nominal| over bins with >= 3 targets, the mean 80%
interval width, and the primary verdict (np, scaled, V + F on G). The same rows scored on T, F' and T + F'
(patients seen before the form was chosen) are printed below for reference.

Calibration records are those calibration_heldout.py cached (run it first); their linear forecasts come from
calibration_difficulty.py's cache (linear_<set>.json), or are forecast here. G is forecast as forecast_quality.py
scores test patients (--samples, the run's seed), through the product's harness, whose records carry the linear
baseline's forecast (``volume_linear_ml``); it is cached in <work>/calibration_confirm/<kind>_G.json, and G's ids
in G.txt (for ``longitudinal evaluate --patients``).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/calibration_confirm.py --work /work/bench/fq128 \\
        --fresh /work/bench/fq128x --confirm /work/bench/fq128y --models np,tfm
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

from _coverage import (
    TOLERANCE,
    cell_text,
    cover,
    fit_whole,
    label,
    linear_forecasts,
    per_bin,
    record_key,
    width80,
)
from rich.console import Console
from rich.table import Table

PRIMARY = ("np", "scaled", "V+F")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("workspace/bench/forecast_quality"),
                    help="a forecast_quality.py work folder with trained runs and calibration_heldout/ caches")
    ap.add_argument("--fresh", type=Path, default=Path("workspace/bench/forecast_quality_fresh"),
                    help="calibration_heldout.py's fresh cohort (F, F')")
    ap.add_argument("--confirm", type=Path, default=Path("workspace/bench/forecast_quality_confirm"),
                    help="a work folder holding a third, unseen cohort (G)")
    ap.add_argument("--models", default="np,tfm")
    ap.add_argument("--samples", type=int, default=16, help="samples per test target (as forecast_quality.py)")
    ap.add_argument("--c", type=float, default=10.0, help="the scaled form's c (ml); pre-registered: 10")
    args = ap.parse_args()

    import longitudinal.models  # noqa: F401  (registers every model kind)
    from longitudinal.evaluation.harness import HORIZON_BINS, evaluate_models
    from longitudinal.models.checkpoint import Checkpoint
    from longitudinal.training.config import TrainConfig
    from longitudinal.training.validation import calibration_eval_config
    from storage.store import CohortStore

    console = Console(width=180)
    work, fresh, confirm = args.work.resolve(), args.fresh.resolve(), args.confirm.resolve()
    held, out = work / "calibration_heldout", work / "calibration_confirm"
    out.mkdir(exist_ok=True)
    g_store = str(confirm / "cohort.zarr")
    g_ids = sorted(CohortStore.open(g_store).patient_ids())
    (out / "G.txt").write_text(",".join(g_ids))
    kinds = [k.strip() for k in args.models.split(",") if k.strip()]
    stores = {"V": str(work / "cohort.zarr"), "T": str(work / "cohort.zarr"), "F": str(fresh / "cohort.zarr"),
              "F'": str(fresh / "cohort.zarr")}
    run0 = work / "runs" / kinds[0]  # forecast_quality.py trains every kind on one split
    split = json.loads((run0 / "split.json").read_text())
    patients = {"V": split["val"], "T": split["test"], "F": (held / "F.txt").read_text().split(","),
                "F'": (held / "Fp.txt").read_text().split(",")}
    ecfg = calibration_eval_config(TrainConfig.model_validate(json.loads((run0 / "config.json").read_text())), "cpu")
    linear = {name: linear_forecasts(held / f"linear_{_stem(name)}.json", stores[name], patients[name], ecfg)
              for name in stores}
    labels = [label(lo, hi) for lo, hi in HORIZON_BINS]
    verdict = None
    for kind in kinds:
        run = work / "runs" / kind
        cfg = TrainConfig.model_validate(json.loads((run / "config.json").read_text()))
        recs: dict[str, list[dict[str, Any]]] = {}
        for name, lin in linear.items():
            rows = json.loads((held / f"{kind}_{_stem(name)}.json").read_text())["records"]
            prefix = "fresh:" if name.startswith("F") else ""
            recs[name] = [{**r, "patient_id": prefix + r["patient_id"], "volume_linear_ml": lin[record_key(r)]}
                          for r in rows]
        path = out / f"{kind}_G.json"
        test_cfg = dataclasses.replace(calibration_eval_config(cfg, "cpu"), n_samples=args.samples, seed=cfg.seed)
        key = {"store": g_store, "patients": g_ids, "samples": test_cfg.n_samples, "seed": test_cfg.seed}
        cached = json.loads(path.read_text()) if path.exists() else {}
        if cached.get("key") != key:
            console.print(f"{kind}: forecasting G ({len(g_ids)} patients, {test_cfg.n_samples} samples)")
            model = Checkpoint.load(run / "checkpoints" / "best.pt").build()
            model.volume_calibration = None  # raw records; calibrations are fitted below
            rep = evaluate_models({kind: model}, g_store, g_ids, test_cfg, baselines=False,
                                  progress=_every(50, f"{kind} G", console))
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
                    covers = cover(cal, test)
                    cells, worst = per_bin(covers)
                    width = width80(cal, test)
                    name = form if form == "symmetric" else f"scaled, c = {args.c:g} ml"
                    table.add_row(name, cal_name, str(cal.n_patients), *map(cell_text, cells), f"{worst:.2f}",
                                  f"{width:.1f}")
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


def _every(n: int, what: str, console: Console) -> Any:
    """A harness progress callback that prints one line in ``n`` (one per batch otherwise)."""
    calls = [0]

    def say(msg: str) -> None:
        calls[0] += 1
        if calls[0] % n == 0:
            console.print(f"  {what}: {msg}")

    return say


def _stem(name: str) -> str:
    return name.replace("'", "p")


if __name__ == "__main__":
    main()
