"""Run the product benchmarks one after the other at sizes that fit in under an hour on 2 CPU cores (`make bench`),
each printing its own table, then a summary of how long each took and whether it succeeded.

    .venv/bin/python benchmarks/run_all.py [--work workspace/bench] [--only synth,ingest] [--list]

The sizes here are smaller than the measurements in docs/RESULTS.md (which took hours); each benchmark's own
``--help`` says how to run it at full size. Studies and tuning tools (benchmarks/calibration_study.py,
benchmarks/tuning/) are not run: they need the hours-long cohorts. Exits non-zero when any benchmark failed.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def plan(work: Path) -> list[tuple[str, list[str]]]:
    """(name, arguments after ``python benchmarks/<script>``) in running order; later ones reuse the
    forecast-quality work folder (its cohort, store and trained runs)."""
    fq = str(work / "forecast_quality")
    return [
        ("synth", ["synth.py", "--patients", "2"]),
        ("ingest", ["ingest.py", "--preset", "default", "--patients", "2"]),
        ("ingest_bombs", ["ingest_bombs.py"]),
        ("registration_qc", ["registration_qc.py", "--patients", "2"]),
        ("train_throughput", ["train_throughput.py", "--work", str(work / "train_throughput"), "--steps", "20",
                              "--rounds", "1"]),
        ("tracking_overhead", ["tracking_overhead.py", "--patients", "6", "--steps", "10"]),
        ("forecast_latency", ["forecast_latency.py", "--kinds", "tfm,np", "--repeats", "3"]),
        ("eval_distributed", ["eval_distributed.py", "--work", str(work / "eval_distributed"), "--workers", "2"]),
        ("forecast_quality", ["forecast_quality.py", "--work", fq, "--patients", "20", "--budget-s", "180",
                              "--samples", "8"]),
        ("next_visit", ["next_visit.py", "--work", fq, "--models", "tfm,np", "--samples", "4"]),
        ("fk_fit", ["fk_fit.py", "--store", f"{fq}/cohort.zarr", "--patients", "3"]),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("workspace/bench"), help="work folders of the benchmarks")
    ap.add_argument("--only", default="", help="comma-separated names to run (default: all)")
    ap.add_argument("--list", action="store_true", help="print the plan and exit")
    args = ap.parse_args()
    steps = plan(args.work.resolve())
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    unknown = only - {name for name, _ in steps}
    if unknown:
        raise SystemExit(f"unknown benchmark(s) {sorted(unknown)}; known: {[name for name, _ in steps]}")
    steps = [s for s in steps if not only or s[0] in only]
    if args.list:
        for name, argv in steps:
            print(f"{name:18s} python benchmarks/{' '.join(argv)}")
        return
    args.work.mkdir(parents=True, exist_ok=True)
    done: list[tuple[str, float, int]] = []
    t_all = time.perf_counter()
    for i, (name, argv) in enumerate(steps, 1):
        print(f"\n=== [{i}/{len(steps)}] {name}: python benchmarks/{' '.join(argv)}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.call([sys.executable, str(HERE / argv[0]), *argv[1:]], cwd=HERE.parent)
        done.append((name, time.perf_counter() - t0, rc))
        print(f"=== {name}: {'ok' if rc == 0 else f'FAILED (exit {rc})'} in {_fmt(done[-1][1])}", flush=True)
    print("\nbenchmark            time      result")
    for name, secs, rc in done:
        print(f"{name:20s} {_fmt(secs):>9s}  {'ok' if rc == 0 else f'FAILED (exit {rc})'}")
    print(f"{'all':20s} {_fmt(time.perf_counter() - t_all):>9s}")
    if any(rc for _n, _s, rc in done):
        raise SystemExit(1)


def _fmt(secs: float) -> str:
    return f"{secs:.0f} s" if secs < 90 else f"{secs / 60:.1f} min"


if __name__ == "__main__":
    main()
