"""Cost of tracking: the same short training with no tracking (NullLogger) and with MLflow (MlflowLogger plus
system metrics), then the cost of logging the pyfunc model and registering it, and the size of a logged model.

    .venv/bin/python benchmarks/tracking_overhead.py [--patients 8] [--steps 30] [--model tfm] [--repeats 1]

Everything is written under a temporary workspace (sqlite tracking store + local artifact root); prints a table.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patients", type=int, default=8)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--model", default="tfm")
    ap.add_argument("--grid", type=int, default=32)
    ap.add_argument("--crop", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()
    os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")

    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
    from rich.console import Console
    from rich.table import Table

    from longitudinal.data.phantoms import make_phantom_store
    from longitudinal.settings import Settings
    from longitudinal.tracking import uri
    from longitudinal.tracking.logged_model import log_forecaster
    from longitudinal.tracking.logger import MlflowLogger
    from longitudinal.tracking.registry import register_version
    from longitudinal.training.config import DEFAULT_TRAIN_CONFIG, TrainConfig
    from longitudinal.training.fit import fit
    from longitudinal.training.logger import NullLogger

    with tempfile.TemporaryDirectory(prefix="tracking-bench-") as tmp_s:
        tmp = Path(tmp_s)
        settings = Settings(home=tmp / "home")
        store = str(tmp / "store.zarr")
        make_phantom_store(store, n_patients=args.patients, seed=0, grid=(args.grid,) * 3)
        cfg = TrainConfig(**{**DEFAULT_TRAIN_CONFIG.to_dict(), "model": args.model, "steps": args.steps,
                             "budget_s": None, "crop_size": (args.crop,) * 3, "num_workers": 0,
                             "eval_every": max(1, args.steps // 2), "ckpt_every": max(1, args.steps // 2),
                             "log_every": 5, "val_targets": 4})
        tracking = uri.configure(settings)
        exp = uri.ensure_experiment(settings, "tracking-overhead")
        client = uri.client(settings)
        untracked, tracked, cpu_untracked, cpu_tracked, ckpt = [], [], [], [], None
        for r in range(args.repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            fit(cfg, store, tmp / f"null-{r}", NullLogger(), resume=False, progress=None)
            untracked.append(time.perf_counter() - t0)
            cpu_untracked.append(time.process_time() - c0)

            run_id = client.create_run(exp).info.run_id
            t0, c0 = time.perf_counter(), time.process_time()
            monitor = SystemMetricsMonitor(run_id, sampling_interval=2.0, tracking_uri=tracking)
            monitor.start()
            res = fit(cfg, store, tmp / f"mlflow-{r}", MlflowLogger(run_id, tracking), resume=False, progress=None)
            monitor.finish()
            client.set_terminated(run_id)
            tracked.append(time.perf_counter() - t0)
            cpu_tracked.append(time.process_time() - c0)
            ckpt = res.checkpoint

        t0 = time.perf_counter()
        model_uri = log_forecaster(ckpt, run_id, tracking)
        t_log = time.perf_counter() - t0
        t0 = time.perf_counter()
        register_version(client, "bench-forecaster", model_uri, run_id, model_uri.removeprefix("models:/"), {})
        t_reg = time.perf_counter() - t0
        lm = client.get_logged_model(model_uri.removeprefix("models:/"))
        model_dir = Path(urlparse(lm.artifact_location).path)
        model_bytes = _dir_bytes(model_dir)
        weights_bytes = sum(p.stat().st_size for p in model_dir.rglob("weights.pt"))

    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    table = Table(title=f"tracking overhead: {args.model}, {args.steps} steps, {args.patients} phantom patients, "
                        f"{args.crop}^3 crops, {args.repeats} repeat(s)", title_justify="left")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row("fit, NullLogger (s)", f"{mean(untracked):.1f}")
    table.add_row("fit, MlflowLogger + system metrics (s)", f"{mean(tracked):.1f}")
    table.add_row("tracking overhead during fit (wall)", f"{100 * (mean(tracked) / mean(untracked) - 1):+.1f} %")
    table.add_row("fit CPU time, NullLogger / MLflow (s)", f"{mean(cpu_untracked):.1f} / {mean(cpu_tracked):.1f}")
    table.add_row("tracking overhead during fit (CPU)",
                  f"{100 * (mean(cpu_tracked) / mean(cpu_untracked) - 1):+.1f} %")
    table.add_row("log pyfunc model (s)", f"{t_log:.1f}")
    table.add_row("register version (s)", f"{t_reg:.2f}")
    table.add_row("logged model size (MB)", f"{model_bytes / 1e6:.2f}")
    table.add_row("  of which weights.pt (MB)", f"{weights_bytes / 1e6:.2f}")
    table.add_row("load average (1 min) at the end", f"{os.getloadavg()[0]:.1f}")
    Console().print(table)


if __name__ == "__main__":
    main()
