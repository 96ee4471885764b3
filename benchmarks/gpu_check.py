"""GPU check: training throughput, memory and forecast latency of tfm and np at 32^3 and 64^3, GPU beside CPU.

    .venv/bin/python benchmarks/gpu_check.py                 # a GPU present: the full check (< 10 min on an H100)
    .venv/bin/python benchmarks/gpu_check.py --dry-run       # CPU only, tiny step counts (what runs without a GPU)
    .venv/bin/python benchmarks/gpu_check.py --json out.json

What it runs, per model kind (tfm, np) and crop (32^3, 64^3), on each device (CUDA when present, and the CPU):

- training: the real fit loop (``longitudinal.training.fit.fit``) from an in-memory phantom cohort (so the
  figure is the device's, not the store's), mixed precision on CUDA (``precision="auto"``: bf16 where
  supported, else fp16 with a GradScaler), fp32 on the CPU; no validation, no calibration. samples/s = median
  of the logging windows after the first (start-up, cuDNN autotuning). Peak memory: CUDA allocated by torch
  (``max_memory_allocated``); CPU peak resident memory of this process (absolute, DataLoader workers not
  counted).
- forecast: ``Predictor.predict`` of the trained checkpoint for one stored patient, one query 90 days after
  its latest scan, 32 samples (bfloat16 autocast on CUDA, as served); one untimed call, then the median of
  the timed calls, from the call to the returned arrays (CUDA synchronised). Peak memory as for training.

Sizes: with a GPU, 300 (32^3) and 200 (64^3) GPU steps of batch 4, and 8 / 4 CPU steps for the comparison;
every training run is capped by a wall-clock budget (60 s GPU, 40 s CPU) and the whole check by
``--deadline-s`` (phases past it are reported as skipped), so it stays under 10 minutes on an H100 node.
Without a GPU (or with ``--dry-run``) the same code runs on the CPU only at tiny counts (1-2 steps of batch 2,
4 forecast samples) and prints the same table, the GPU columns marked "no GPU". Exits non-zero when a phase
failed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

KINDS = ("tfm", "np")
CROPS = (32, 64)
N_SAMPLES = 32
BATCH = 4
GRID = (72, 72, 72)  # room for a 64^3 crop around every phantom tumour


@dataclass(frozen=True)
class Plan:
    """Sizes and caps of one device's runs. steps/window: optimiser steps and logging window per crop (32, 64);
    batch: samples per step; budget_s: wall-clock cap of one training run (s); samples: forecast samples;
    warm / repeats: untimed and timed forecast calls; num_workers: DataLoader worker processes."""

    steps: dict[int, int]
    window: dict[int, int]
    batch: int
    budget_s: float
    samples: int
    warm: int
    repeats: int
    num_workers: int


def plans(cuda: bool, dry_run: bool) -> dict[str, Plan]:
    """Device -> Plan, in the order run. The dry run keeps every phase but at tiny counts: 1-2 steps of batch
    2 and 4 forecast samples (np at 64^3 with 32 samples holds about 13 GB on the CPU)."""
    workers = max(1, min(8, (os.cpu_count() or 2) - 2))
    if dry_run or not cuda:
        return {"cpu": Plan({32: 2, 64: 1}, {32: 1, 64: 1}, 2, 120.0, 4, 0, 1, 0)}
    return {"cuda": Plan({32: 300, 64: 200}, {32: 25, 64: 20}, BATCH, 60.0, N_SAMPLES, 1, 3, workers),
            "cpu": Plan({32: 8, 64: 4}, {32: 2, 64: 1}, BATCH, 40.0, N_SAMPLES, 1, 1, workers)}


@dataclass
class Result:
    """One (kind, crop, device) measurement; None where not measured, ``error`` when the phase failed."""

    kind: str
    crop: int
    device: str
    precision: str = ""
    steps: int = 0
    train_samples_per_s: float | None = None
    train_peak_mib: float | None = None
    forecast_s: float | None = None
    forecast_peak_mib: float | None = None
    windows: list[float] = field(default_factory=list)
    error: str | None = None


class WindowLogger:
    """A MetricLogger keeping the samples/s of every logging window of ``fit``."""

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


class PeakMemory:
    """Peak memory over a block, MiB: torch's CUDA allocations on ``cuda`` (reset at the start), else this
    process's resident set sampled every 20 ms (absolute: it includes the in-memory cohort and whatever the
    allocator kept from earlier phases)."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.peak_mib = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakMemory:
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            import psutil

            proc = psutil.Process()

            def sample() -> None:
                while not self._stop.is_set():
                    self.peak_mib = max(self.peak_mib, proc.memory_info().rss / 2**20)
                    self._stop.wait(0.02)

            self._thread = threading.Thread(target=sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
            self.peak_mib = torch.cuda.max_memory_allocated() / 2**20
        else:
            self._stop.set()
            if self._thread is not None:
                self._thread.join()


def train_and_forecast(kind: str, crop: int, device: str, plan: Plan, store: str, reader: Any, work: Path,
                       patient: str) -> Result:
    """Train ``kind`` at ``crop``^3 on ``device`` for ``plan``'s steps, then time ``plan.samples``-sample
    forecasts."""
    import torch

    from longitudinal.data.context import PatientSeries
    from longitudinal.models.checkpoint import Checkpoint
    from longitudinal.predict import Predictor
    from longitudinal.training.config import TrainConfig
    from longitudinal.training.fit import fit
    from longitudinal.training.steps import select_precision
    from storage.store import CohortStore

    amp, _scaler = select_precision("auto", torch.device(device))
    res = Result(kind, crop, device, precision=str(amp).removeprefix("torch.") if amp is not None else "fp32")
    cfg = TrainConfig(model=kind, crop_size=(crop, crop, crop), steps=plan.steps[crop], budget_s=plan.budget_s,
                      batch_size=plan.batch, num_workers=plan.num_workers, device=device, precision="auto",
                      val_fraction=0.0, test_fraction=0.0, val_targets=0, calib_targets=0, eval_every=10**9,
                      ckpt_every=10**9, log_every=plan.window[crop], warmup_steps=10)
    log = WindowLogger()
    run_dir = work / f"{kind}-{crop}-{device}"
    with PeakMemory(device) as mem:
        out = fit(cfg, store, run_dir, log, resume=False, progress=None, reader=reader)
    res.steps = out.steps
    res.windows = [round(r, 2) for r in log.rates]
    steady = log.rates[1:] or log.rates
    res.train_samples_per_s = statistics.median(steady) if steady else out.samples_per_s
    res.train_peak_mib = mem.peak_mib

    predictor = Predictor.from_checkpoint(Checkpoint.load(out.final_checkpoint), device)
    series = PatientSeries(CohortStore.open(store).arrays(patient))
    query = [float(series.days[-1]) + 90.0]
    for _ in range(plan.warm):
        predictor.predict(series, query, n_samples=plan.samples, seed=0)
    times = []
    with PeakMemory(device) as mem:
        for _ in range(plan.repeats):
            t = time.perf_counter()
            predictor.predict(series, query, n_samples=plan.samples, seed=0)
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
    res.forecast_s = statistics.median(times)
    res.forecast_peak_mib = mem.peak_mib
    del predictor
    if device == "cuda":
        torch.cuda.empty_cache()
    return res


def _cell(value: float | None, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def print_table(results: list[Result], cuda_name: str | None, plan: Plan) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=200)
    by = {(r.kind, r.crop, r.device): r for r in results}
    gpu_head = "GPU" if cuda_name else "GPU (no GPU)"
    table = Table(title=f"GPU check: training (batch {plan.batch}) and forecast ({plan.samples} samples, 1 query)"
                        + (" -- CPU dry run, tiny counts" if cuda_name is None else f" on {cuda_name}"),
                  title_justify="left")
    for col in ("kind", "crop", f"{gpu_head} precision", "GPU steps", "GPU samples/s", "GPU peak MiB",
                "GPU forecast s", "GPU forecast MiB", "CPU steps", "CPU samples/s", "CPU peak RSS MiB",
                "CPU forecast s", "CPU forecast RSS MiB", "train x", "forecast x"):
        table.add_column(col, justify="left" if col in ("kind",) else "right")
    for kind in KINDS:
        for crop in CROPS:
            g, c = by.get((kind, crop, "cuda")), by.get((kind, crop, "cpu"))

            def part(r: Result | None, absent: str) -> list[str]:
                if r is None:
                    return [absent] * 5
                if r.error:
                    return [r.error[:40], "", "", "", ""]
                return [str(r.steps), _cell(r.train_samples_per_s, "{:.2f}"), _cell(r.train_peak_mib, "{:.0f}"),
                        _cell(r.forecast_s, "{:.3f}"), _cell(r.forecast_peak_mib, "{:.0f}")]

            gpart = part(g, "no GPU")
            speed_t = speed_f = "-"
            if g and c and not g.error and not c.error and g.train_samples_per_s and c.train_samples_per_s:
                speed_t = f"{g.train_samples_per_s / c.train_samples_per_s:.1f}"
                speed_f = f"{c.forecast_s / g.forecast_s:.1f}" if g.forecast_s and c.forecast_s else "-"
            table.add_row(kind, f"{crop}^3", g.precision if g and not g.error else ("-" if g is None else "error"),
                          *gpart, *part(c, "-"), speed_t, speed_f)
    console.print(table)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="CPU only, tiny step counts (the default without a GPU)")
    ap.add_argument("--work", type=Path, help="work folder (default: a temporary folder)")
    ap.add_argument("--deadline-s", type=float, default=540.0, help="skip phases that would start after this")
    ap.add_argument("--json", type=Path, help="write every measurement here")
    args = ap.parse_args()

    import torch

    from longitudinal.data.phantoms import make_phantom_store
    from longitudinal.data.reader import InMemoryReader

    t_start = time.perf_counter()
    cuda = torch.cuda.is_available()
    cuda_name = torch.cuda.get_device_name(0) if cuda else None
    dry = args.dry_run or not cuda
    print(f"torch {torch.__version__}, CUDA {'available: ' + str(cuda_name) if cuda else 'not available'}, "
          f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}"
          + ("; CPU dry run (tiny step counts)" if dry else ""), flush=True)
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        work = args.work or Path(tmp)
        store = str(work / "phantoms.zarr")
        t = time.perf_counter()
        cohort = make_phantom_store(store, n_patients=6, seed=0, grid=GRID, n_times=(3, 5))
        reader = InMemoryReader(store)
        patient = max(cohort.patients, key=lambda p: len(cohort.patients[p].days))
        print(f"phantom cohort {GRID} x 6 patients written and loaded in {time.perf_counter() - t:.1f} s", flush=True)
        device_plans = plans(cuda, dry)
        # Device after device for each (kind, crop): a row is complete even when the deadline cuts the rest.
        for kind in KINDS:
            for crop in CROPS:
                for device, plan in device_plans.items():
                    if time.perf_counter() - t_start > args.deadline_s:
                        results.append(Result(kind, crop, device, error="skipped (deadline)"))
                        continue
                    t = time.perf_counter()
                    try:
                        res = train_and_forecast(kind, crop, device, plan, store, reader, work, patient)
                    except Exception as exc:  # noqa: BLE001 -- report the phase, go on with the others
                        res = Result(kind, crop, device, error=f"{type(exc).__name__}: {exc}")
                    results.append(res)
                    print(f"{kind} {crop}^3 {device}: {time.perf_counter() - t:.1f} s "
                          + (res.error or f"{res.steps} steps, {res.train_samples_per_s:.2f} samples/s, forecast "
                                          f"{res.forecast_s:.3f} s, windows {res.windows}"), flush=True)
    print_table(results, cuda_name, next(iter(device_plans.values())))
    print(f"total {time.perf_counter() - t_start:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"cuda": cuda_name, "dry_run": dry,
                                         "results": [asdict(r) for r in results]}, indent=2))
    if any(r.error and not r.error.startswith("skipped") for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
