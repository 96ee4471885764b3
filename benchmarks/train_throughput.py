"""Training throughput reading from the Zarr store vs the same loop on in-memory arrays.

Both modes run the real fit loop (`longitudinal.training.fit.fit`) with the same config, the same samples and
the same DataLoader workers; only the reader differs: lazy zarr chunk reads (`StoreReader`) or every patient
preloaded as numpy (`InMemoryReader`). Rounds alternate the two modes so a busy machine hurts both alike; the
first logging window of each run (worker start-up, first batches) is left out. Target: zarr >= 90% of memory.

    .venv/bin/python benchmarks/train_throughput.py                       # phantom store on an MNI-like grid
    .venv/bin/python benchmarks/train_throughput.py --store PATH --steps 40 --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table


class WindowLogger:
    """A MetricLogger keeping the samples/s of every logging window."""

    def __init__(self) -> None:
        self.rates: list[float] = []

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if "samples_per_s" in metrics:
            self.rates.append(float(metrics["samples_per_s"]))

    def set_tags(self, tags: dict[str, str]) -> None:
        pass

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", help="cohort store URL (default: a cached phantom store under --work)")
    ap.add_argument("--work", type=Path, default=Path("workspace/bench/train_throughput"))
    ap.add_argument("--patients", type=int, default=12, help="phantom patients (when --store is not given)")
    ap.add_argument("--grid", type=int, nargs=3, default=(91, 109, 91), help="phantom grid (z y x voxels)")
    ap.add_argument("--config", type=Path, help="TrainConfig YAML/JSON (default: the tuned default)")
    ap.add_argument("--steps", type=int, default=30, help="optimiser steps per run")
    ap.add_argument("--window", type=int, default=5, help="steps per logging window")
    ap.add_argument("--rounds", type=int, default=2, help="alternating (zarr, memory) rounds")
    ap.add_argument("--num-workers", type=int, help="DataLoader workers (default: the config's)")
    ap.add_argument("--device", help="cpu | cuda | auto (default: the config's)")
    args = ap.parse_args()

    from longitudinal.data.phantoms import make_phantom_store
    from longitudinal.data.reader import InMemoryReader
    from longitudinal.training.config import load_train_config
    from longitudinal.training.fit import fit

    console = Console()
    store = args.store
    if store is None:
        path = args.work / f"phantom-{args.patients}-{'x'.join(map(str, args.grid))}.zarr"
        if not path.exists():
            console.print(f"writing phantom store {path}")
            make_phantom_store(str(path), n_patients=args.patients, seed=0, grid=tuple(args.grid),
                               n_times=(3, 6))
        store = str(path)
    cfg = load_train_config(args.config, steps=args.steps, num_workers=args.num_workers, device=args.device)
    # Training only: no validation forecasts, no intermediate checkpoints, every patient in train.
    cfg = cfg.model_copy(update={"budget_s": None, "val_fraction": 0.0, "test_fraction": 0.0,
                                 "eval_every": 10**9, "ckpt_every": 10**9, "log_every": args.window})
    console.print(f"store {store}; model {cfg.model}, batch {cfg.batch_size}, crop {cfg.crop_size}, "
                  f"K {cfg.max_context}, Q {cfg.n_queries}, workers {cfg.num_workers}, {cfg.steps} steps/run")

    rates: dict[str, list[float]] = {"zarr": [], "memory": []}
    for r in range(args.rounds):
        for mode in ("zarr", "memory"):
            reader = None
            if mode == "memory":
                t = time.perf_counter()
                reader = InMemoryReader(store)
                console.print(f"  preloaded the store in {time.perf_counter() - t:.1f} s")
            log = WindowLogger()
            with tempfile.TemporaryDirectory() as tmp:
                fit(cfg, store, Path(tmp), log, resume=False, progress=None, reader=reader)
            steady = log.rates[1:] or log.rates
            rate = statistics.median(steady)
            rates[mode].append(rate)
            console.print(f"  round {r + 1} {mode:6s}: {rate:.2f} samples/s (windows {[round(x, 2) for x in steady]})")

    med = {m: statistics.median(v) for m, v in rates.items()}
    ratio = med["zarr"] / med["memory"]
    table = Table(title="training throughput (samples/s, median of steady windows)", title_justify="left")
    table.add_column("reader")
    for r in range(args.rounds):
        table.add_column(f"round {r + 1}", justify="right")
    table.add_column("median", justify="right")
    for mode in ("zarr", "memory"):
        table.add_row(mode, *[f"{x:.2f}" for x in rates[mode]], f"{med[mode]:.2f}")
    console.print(table)
    verdict = "PASS" if ratio >= 0.9 else "MISS"
    console.print(f"zarr / memory = {ratio:.1%} (target >= 90%): {verdict}")


if __name__ == "__main__":
    main()
