"""Forecast latency on the CPU: a cold CLI forecast and a warm API call, for 1 and 32 samples.

    .venv/bin/python benchmarks/forecast_latency.py [--kinds tfm,np,linear] [--repeats 3] [--json out.json]

Setup (in a temporary folder, nothing downloaded): a phantom cohort store on a 96 x 112 x 96 grid at 2 mm
(about the MNI152 2 mm grid the demo's synthetic cohort uses, so the native-space resampling and NIfTI writing
cost what they cost there), and untrained checkpoints of each model kind at the CPU crop size 32^3 (latency does
not depend on the weights for fixed-step solvers). The first kind is registered in a temporary sqlite MLflow as
``tumor-growth-forecaster@champion``.

- cold CLI: ``python -m longitudinal forecast P000 --in 90 --samples N`` as a subprocess with the default model
  reference (registry lookup included), from process start to exit (all files written). One untimed run first
  fills the local model cache (as any earlier query on the machine would have).
- warm API: ``forecast_patient(..., model_ref=<loaded model>)`` after ``load_model`` and one untimed call; the
  full query (store read, sampling, native-space NIfTI x 4, JSON, PNG) and the compute only (``write=False``).

One query time per call. Median of ``--repeats`` runs; the machine's load average (before and after) is
printed beside the figures because a shared CPU inflates them. ``--threads 1,2`` repeats the warm API rows per
torch thread count: on a loaded 2-core machine two OpenMP threads wait on each other (one is descheduled), so
one thread can be faster there; on an idle machine two are.

``--models-only`` times just ``model.sample`` (3 context scans, 1 query, crop 32^3) per kind, sample count and
torch thread count (``--threads 2,16``); it needs only torch, so it also runs on a bare machine with PyTorch.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GRID = (96, 112, 96)
CROP = 32
SAMPLES = (1, 32)
TARGET_WARM_S = 2.0
QUIET = {"MLFLOW_ENABLE_TELEMETRY": "false", "DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}


def _checkpoint(path: Path, kind: str) -> Path:
    import torch

    from longitudinal.models.base import build_model

    model = build_model(kind)
    torch.save({"kind": kind, "config": model.config_dict(), "state_dict": model.state_dict(),
                "channels": ["T1c", "FLAIR"], "spacing_mm": [2.0] * 3, "crop_size": [CROP] * 3,
                "meta": {"data": {"max_context": 3, "normalize": "none"}}}, path)
    return path


def _register(settings, checkpoint: Path) -> None:  # noqa: ANN001
    from longitudinal.tracking import uri
    from longitudinal.tracking.logged_model import log_forecaster
    from longitudinal.tracking.registry import register_version

    client = uri.client(settings)
    run_id = client.create_run(uri.ensure_experiment(settings)).info.run_id
    model_uri = log_forecaster(checkpoint, run_id, settings.tracking_uri)
    mv, _ = register_version(client, settings.registered_model_name, model_uri, run_id,
                             model_uri.removeprefix("models:/"), {})
    client.set_registered_model_alias(settings.registered_model_name, "champion", mv.version)
    client.set_terminated(run_id)


def _median(values: list[float]) -> float:
    return float(statistics.median(values))


def cold_cli(home: Path, store: str, tracking_uri: str, n_samples: int, repeats: int) -> float:
    env = {**os.environ, **QUIET, "LONGITUDINAL_MLFLOW_TRACKING_URI": tracking_uri}
    cmd = [sys.executable, "-m", "longitudinal", "--home", str(home), "forecast", "P000", "--store", store,
           "--in", "90", "--samples", str(n_samples), "--out", str(home / "cli-out")]
    times = []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, cwd=home, capture_output=True, text=True)
        dt = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"CLI failed: {proc.stdout[-2000:]}{proc.stderr[-2000:]}")
        if i > 0:  # the first run fills the model cache
            times.append(dt)
    return _median(times)


def warm_api(settings, store: str, checkpoint: Path, n_samples: int, repeats: int) -> tuple[float, float]:  # noqa: ANN001
    from longitudinal.forecast import ForecastRequest, Queries, forecast_patient, load_model

    model = load_model(settings, str(checkpoint))
    out = settings.home_dir / "api-out"
    forecast_patient(settings, ForecastRequest("P000", Queries(in_days=(90,)), store_url=store, model_ref=model, n_samples=n_samples, out_dir=out))
    full, compute = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        forecast_patient(settings, ForecastRequest("P000", Queries(in_days=(90,)), store_url=store, model_ref=model, n_samples=n_samples, out_dir=out))
        full.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        forecast_patient(settings, ForecastRequest("P000", Queries(in_days=(90,)), store_url=store, model_ref=model, n_samples=n_samples, write=False))
        compute.append(time.perf_counter() - t0)
    return _median(full), _median(compute)


def model_sampling(kinds: list[str], threads: list[int], repeats: int, device: str,
                   options: dict | None = None) -> list[dict]:
    """Median seconds of ``model.sample`` per (kind, threads, samples), after one untimed call. ``options``:
    model config overrides for every kind (e.g. tfm's skip_mode). On CPU the allocator is tuned as the
    product tunes it (``LONGITUDINAL_TUNE_MALLOC=false`` measures without)."""
    import torch

    from longitudinal.models.base import build_model
    from longitudinal.runtime import tune_cpu_allocator

    if device == "cpu":
        tune_cpu_allocator()

    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, 2, CROP, CROP, CROP, generator=g).to(device)
    lab = torch.randint(0, 3, (1, 3, CROP, CROP, CROP), generator=g).to(device)
    t = torch.tensor([[0.0, 100.0, 200.0]], device=device)
    mask = torch.ones(1, 3, dtype=torch.bool, device=device)
    q = torch.tensor([[290.0]], device=device)
    rows = []
    for n_threads in threads:
        torch.set_num_threads(n_threads)
        for kind in kinds:
            model = build_model(kind, dict(options or {})).to(device).eval()
            for n in SAMPLES:
                times = []
                for i in range(repeats + 1):
                    if device.startswith("cuda"):
                        torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    with torch.inference_mode():
                        model.sample(x, lab, t, mask, q, n_samples=n)
                    if device.startswith("cuda"):
                        torch.cuda.synchronize()
                    if i > 0:
                        times.append(time.perf_counter() - t0)
                rows.append({"what": f"model.sample ({kind}, {device}, {n_threads} threads)", "samples": n,
                             "seconds": _median(times)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kinds", default="tfm,np,linear", help="model kinds, comma separated; the first is the "
                                                            "registered champion the cold CLI uses")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    ap.add_argument("--models-only", action="store_true", help="time model.sample only (needs only torch)")
    ap.add_argument("--threads", default="", help="torch thread counts, e.g. 1,2 (--models-only: every row; else "
                                                  "the warm API rows)")
    ap.add_argument("--device", default="cpu", help="device for --models-only")
    ap.add_argument("--model-options", default="{}",
                    help="--models-only: JSON model config overrides, e.g. '{\"skip_mode\": \"concat\"}'")
    args = ap.parse_args()
    os.environ.update(QUIET)

    import torch

    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    if args.models_only:
        threads = [int(v) for v in args.threads.split(",") if v] or [torch.get_num_threads()]
        rows = model_sampling(kinds, threads, args.repeats, args.device, json.loads(args.model_options))
        _report(rows, args, f"model.sample latency ({os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}), crop "
                            f"{CROP}^3, 3 context scans, 1 query, median of {args.repeats}")
        return

    from longitudinal.data.phantoms import make_phantom_store
    from longitudinal.settings import Settings

    rows = []
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="forecast-latency-") as tmp:
        root = Path(tmp)
        home = root / "home"
        tracking = f"sqlite:///{home / 'mlflow.db'}"
        settings = Settings(home=home, mlflow_tracking_uri=tracking)
        store = str(root / "cohort.zarr")
        make_phantom_store(store, n_patients=1, grid=GRID, n_times=(4, 4))
        ckpts = {k: _checkpoint(root / f"{k}.pt", k) for k in kinds}
        _register(settings, ckpts[kinds[0]])
        for n in SAMPLES:
            rows.append({"what": f"cold CLI ({kinds[0]} champion)", "samples": n,
                         "seconds": cold_cli(home, store, tracking, n, max(1, args.repeats - 1))})
        default_threads = torch.get_num_threads()
        for n_threads in [int(v) for v in args.threads.split(",") if v] or [default_threads]:
            torch.set_num_threads(n_threads)
            tag = "" if n_threads == default_threads else f", {n_threads} thread{'s' if n_threads > 1 else ''}"
            for kind in kinds:
                for n in SAMPLES:
                    full, compute = warm_api(settings, store, ckpts[kind], n, args.repeats)
                    rows.append({"what": f"warm API ({kind}{tag})", "samples": n, "seconds": full})
                    rows.append({"what": f"warm API ({kind}{tag}), no files", "samples": n, "seconds": compute})
        torch.set_num_threads(default_threads)

    load = os.getloadavg()
    _report(rows, args, f"forecast latency, CPU ({torch.get_num_threads()} torch threads, {os.cpu_count()} cores, "
                        f"load average {load_before:.1f} before, {load[0]:.1f} after), crop {CROP}^3, grid {GRID}, "
                        f"1 query, median of {args.repeats}")


def _report(rows: list[dict], args: argparse.Namespace, title: str) -> None:
    """Print the table (target column on the warm 32-sample rows) and optionally write the JSON."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # a bare machine with only torch
        print(title)
        for r in rows:
            print(f"{r['what']:<48} {r['samples']:>4} {r['seconds']:8.3f}")
        return
    table = Table(title=title, title_justify="left")
    for col in ("what", "samples", "seconds", "target"):
        table.add_column(col, justify="right" if col != "what" else "left")
    for r in rows:
        target = ""
        if r["what"].startswith("warm API") and r["samples"] == 32 and "no files" not in r["what"]:
            target = f"<= {TARGET_WARM_S:g} s: {'met' if r['seconds'] <= TARGET_WARM_S else 'MISSED'}"
        table.add_row(r["what"], str(r["samples"]), f"{r['seconds']:.2f}", target)
    Console(width=120).print(table)
    if args.json:
        args.json.write_text(json.dumps({"title": title, "rows": rows, "loadavg": os.getloadavg()}, indent=2))


if __name__ == "__main__":
    main()
