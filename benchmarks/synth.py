"""Seconds per synthetic patient for each preset (growth + rendering + writing; atlas loading excluded).

Usage: .venv/bin/python benchmarks/synth.py [--patients 2] [--seed 0]
Prints one row per preset: patients, visits, wall and CPU seconds per patient, seconds per visit, volume range.
Wall time suffers on a shared machine; CPU seconds measure the generator itself.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from longitudinal.synth import PRESETS, generate_cohort
from longitudinal.synth.anatomy import load_anatomy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    table = Table(title=f"synth: seconds per patient ({args.patients} patients per preset, one process)")
    for col in ("preset", "spacing mm", "patients", "visits", "s / patient", "cpu s / patient", "s / visit",
                "whole ml range", "atlas load s"):
        table.add_column(col, justify="right")
    with tempfile.TemporaryDirectory() as tmp:
        for name, preset in PRESETS.items():
            t0 = time.perf_counter()
            load_anatomy(preset.spacing_mm)  # cached afterwards; reported apart
            load_s = time.perf_counter() - t0
            t1, c1 = time.perf_counter(), time.process_time()
            summary = generate_cohort(Path(tmp) / name, args.patients, args.seed, name)
            seconds, cpu = time.perf_counter() - t1, time.process_time() - c1
            lo, hi = summary.volume_range_ml
            table.add_row(name, f"{preset.spacing_mm:g}", str(summary.n_patients), str(summary.n_visits),
                          f"{seconds / summary.n_patients:.2f}", f"{cpu / summary.n_patients:.2f}",
                          f"{seconds / summary.n_visits:.2f}",
                          f"{lo:.1f}-{hi:.1f}", f"{load_s:.1f}")
    Console(width=140).print(table)


if __name__ == "__main__":
    main()
