"""Evaluation wall time: the serial harness vs the same evaluation mapped over patients on Dask.

    .venv/bin/python benchmarks/eval_distributed.py                       # phantom cohort, local 2-worker cluster
    .venv/bin/python benchmarks/eval_distributed.py --patients 16 --workers 4 --samples 8
    .venv/bin/python benchmarks/eval_distributed.py --dask-address tcp://scheduler:8786 --store s3://b/c.zarr

Both runs score the same cohort with the same models (an untrained ``--kind`` checkpoint of the default config
at its 32^3 crop, with ``lci`` and ``linear`` beside it: cost does not depend on the weights) and the same
EvalConfig, so the table must be the same; the largest difference between the two tables is printed beside the
times. The serial run uses torch's default thread count in this process (``--serial-threads`` sets it); each Dask
worker runs one patient at a time on one torch thread. The Dask evaluation runs twice on one cluster: the first
call's workers import torch and the library and build the models, the second shows what a long-lived cluster
(or the next evaluation inside ``with DaskEngine(...)``) costs; starting the local cluster is timed apart.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _max_row_difference(a: list[dict], b: list[dict]) -> float:
    """Largest absolute difference over every numeric cell of two row lists (NaN == NaN)."""
    worst = 0.0
    for ra, rb in zip(a, b, strict=True):
        for key, va in ra.items():
            vb = rb.get(key)
            if isinstance(va, float) and isinstance(vb, float):
                if math.isnan(va) and math.isnan(vb):
                    continue
                worst = max(worst, abs(va - vb))
            elif va != vb:
                return math.inf
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", help="cohort store URL (default: a cached phantom store under --work)")
    ap.add_argument("--work", type=Path, default=Path("workspace/bench/eval_distributed"))
    ap.add_argument("--patients", type=int, default=8, help="phantom patients (when --store is not given)")
    ap.add_argument("--grid", type=int, nargs=3, default=(48, 48, 48), help="phantom grid (z y x voxels)")
    ap.add_argument("--kind", default="tfm", help="model kind scored beside lci and linear (tfm, np)")
    ap.add_argument("--samples", type=int, default=8, help="samples per target (EvalConfig.n_samples)")
    ap.add_argument("--workers", type=int, default=2, help="local cluster worker processes (1 thread each)")
    ap.add_argument("--dask-address", help="an existing scheduler instead of a local cluster")
    ap.add_argument("--serial-threads", type=int, help="torch threads of the serial run (default: torch's)")
    args = ap.parse_args()

    import torch
    from rich.console import Console
    from rich.table import Table

    from longitudinal.data.phantoms import make_phantom_store
    from longitudinal.evaluation.distributed import DaskEngine
    from longitudinal.evaluation.harness import EvalConfig, evaluate_models
    from longitudinal.models.base import build_model
    from longitudinal.predict import Predictor

    console = Console(width=160)
    if args.serial_threads:
        torch.set_num_threads(args.serial_threads)
    store = args.store
    if store is None:
        path = args.work / f"phantom-{args.patients}-{'x'.join(map(str, args.grid))}.zarr"
        if not path.exists():
            console.print(f"writing phantom store {path}")
            make_phantom_store(str(path), n_patients=args.patients, seed=0, grid=tuple(args.grid), n_times=(3, 5),
                               gap_days=(40.0, 400.0))
        store = str(path)
    torch.manual_seed(0)
    predictor = Predictor(build_model(args.kind, in_channels=2), (32, 32, 32), channels=("T1c", "FLAIR"),
                          spacing_mm=(2.0, 2.0, 2.0), device="cpu")
    cfg = EvalConfig(crop_size=(32, 32, 32), n_samples=args.samples, device="cpu")
    console.print(f"store {store}; models lci, linear, {args.kind} (untrained, crop 32^3), {args.samples} samples; "
                  f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()} (serial); "
                  f"load average before {os.getloadavg()[0]:.2f}")

    serial_threads = torch.get_num_threads()
    t = time.perf_counter()
    serial = evaluate_models({args.kind: predictor}, store, config=cfg)
    serial_s = time.perf_counter() - t
    console.print(f"serial: {serial.n_targets} targets of {len(serial.patients)} patients in {serial_s:.1f} s")

    engine = DaskEngine(address=args.dask_address, workers=args.workers)
    t = time.perf_counter()
    with engine:
        engine.client().wait_for_workers(1 if args.dask_address else args.workers)
        start_s = time.perf_counter() - t
        runs = []
        # Twice on the same cluster: the first call's workers import torch and the library and build the
        # models; the second is what a long-lived cluster (or the next evaluation in a `with engine:`) costs.
        for label in ("first call", "second call (warm workers)"):
            t_eval = time.perf_counter()
            dist = evaluate_models({args.kind: predictor}, store, config=cfg,
                                   progress=lambda line: console.print(f"  {line}"))
            runs.append((label, time.perf_counter() - t_eval, dist))
    console.print(f"load average after {os.getloadavg()[0]:.2f}")

    table = Table(title=f"evaluation wall time, {serial.n_targets} targets x 3 models, {len(serial.patients)} "
                        f"patients; cluster start {start_s:.1f} s (not included)", title_justify="left")
    for col in ("path", "wall s", "targets/s", "speed-up", "max |row diff| vs serial"):
        table.add_column(col, justify="left" if col == "path" else "right")
    threads = f"{serial_threads} torch thread{'s' if serial_threads != 1 else ''}"
    table.add_row(f"serial (this process, {threads})", f"{serial_s:.1f}", f"{serial.n_targets / serial_s:.2f}",
                  "1.00", "-")
    where = f"Dask at {args.dask_address}" if args.dask_address else f"Dask, local {args.workers} workers"
    worst = 0.0
    for label, wall, dist in runs:
        diff = _max_row_difference(serial.rows, dist.rows)
        worst = max(worst, diff)
        table.add_row(f"{where}, {label}", f"{wall:.1f}", f"{dist.n_targets / wall:.2f}", f"{serial_s / wall:.2f}",
                      f"{diff:.2e}")
    console.print(table)
    console.print("same table: " + ("yes" if worst < 1e-4 else f"NO (max difference {worst})"))


if __name__ == "__main__":
    main()
