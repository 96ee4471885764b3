"""Personalised Fisher-Kolmogorov (``fk``) fitting time per patient, and its skill beside ``lci`` and ``linear``.

    .venv/bin/python benchmarks/fk_fit.py --store STORE [--patients N] [--samples 8] [--device cpu|cuda]
        [--threads 2] [--no-tissue]

For each of the first N patients of a cohort store (a synthetic one: ``longitudinal synth`` then ``longitudinal
ingest``, which stores each patient's tissue maps), ``fk`` is fitted to every scan but the last and forecasts the
last scan, through the product's Predictor (the fit runs inside ``Predictor.predict``, with the store's tissue
maps, treatments and the crop's voxel size as conditions). Prints per patient the context size, the crop's voxel
size, whether tissue maps were used, the seconds of the fit and forecast, and the whole-tumour Dice of fk, lci
and linear on that last scan; then the mean and the maximum time. ``--no-tissue`` hides the tissue maps (the
homogeneous model). Target: at most 30 s per patient on 2 CPU cores at the default 32^3 crop.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", required=True)
    ap.add_argument("--patients", type=int, default=6)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--no-tissue", dest="tissue", action="store_false", help="ignore the store's tissue maps")
    args = ap.parse_args()

    import dataclasses

    import torch
    from rich.console import Console
    from rich.table import Table

    from longitudinal.data.context import PatientSeries, read_box
    from longitudinal.evaluation import metrics as M
    from longitudinal.predict import Predictor
    from storage.store import CohortStore

    torch.set_num_threads(args.threads)
    console = Console(width=120)
    store = CohortStore.open(args.store)
    predictors = {k: Predictor.baseline(k, (32, 32, 32), device=args.device) for k in ("fk", "lci", "linear")}
    table = Table(title=f"fk fit + forecast of the last scan, {torch.get_num_threads()} torch threads, {args.device}"
                        f"{'' if args.tissue else ', tissue maps ignored'}")
    for col in ("patient", "context scans", "crop mm", "tissue", "gap days", "fk s", "Dice fk", "Dice lci",
                "Dice linear"):
        table.add_column(col, justify="right")
    times = []
    for pid in store.patient_ids()[: args.patients]:
        arrays = store.arrays(pid)
        series = PatientSeries(arrays if args.tissue else dataclasses.replace(arrays, tissue=None))
        n = len(series.days)
        if n < 2:
            continue
        dice, seconds = {}, 0.0
        for name, predictor in predictors.items():
            t0 = time.perf_counter()
            q = predictor.predict(series.upto(n - 1), [float(series.days[-1])], args.samples, seed=0,
                                  keep_samples=True).queries[0]
            if name == "fk":
                seconds = time.perf_counter() - t0
            # The truth on the forecast's crop grid (its stride adapts to the tumour: majority class per block).
            truth = torch.from_numpy(read_box(series.arrays.label, (n - 1,), q.crop, labels=True)) > 0
            dice[name] = M.dice(q.probs.mean(0).argmax(0) > 0, truth)
        times.append(seconds)
        crop_mm = q.crop.stride * float(series.spacing_mm[0])
        table.add_row(pid, str(min(n - 1, predictors["fk"].data.max_context)), f"{crop_mm:g}",
                      "yes" if getattr(series.arrays, "tissue", None) is not None else "no", f"{q.gap_days:.0f}",
                      f"{seconds:.1f}", *(f"{dice[k]:.3f}" for k in ("fk", "lci", "linear")))
    console.print(table)
    if times:
        console.print(f"fk seconds per patient: mean {statistics.mean(times):.1f}, max {max(times):.1f} "
                      f"({len(times)} patients; target <= 30 s on 2 CPU cores)")


if __name__ == "__main__":
    main()
