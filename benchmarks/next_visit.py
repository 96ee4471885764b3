"""Whole-tumour Dice and volume error at the NEXT real visit of held-out patients, models vs LCI.

Reuses the work folder of benchmarks/forecast_quality.py (its store ``W/cohort.zarr``, split and trained
checkpoints ``W/runs/<kind>/model.pt``, else ``W/runs/<kind>/checkpoints/best.pt``):

    .venv/bin/python benchmarks/forecast_quality.py --work W ...   # first
    .venv/bin/python benchmarks/next_visit.py --work W --models tfm,np [--source BIDS_ROOT] [--mode both]

Targets: every later visit j >= 1 of every test patient (split.json), forecast from the (up to max_context)
visits before it, at the day of visit j. Two tables:

- crop grid (``--mode crop``): the evaluation harness on the store's 32^3 crops (``pairs="next"``), lci and
  linear added by the harness; mask = argmax of the sample-mean class probabilities.
- native space (``--mode native``): the real query path, ``longitudinal.forecast.forecast_patient`` with
  ``days_since_baseline=[day of visit j]`` and ``native_session=<visit j>``: the whole-tumour probability map as
  written to NIfTI on visit j's own native grid, thresholded at 0.5, against visit j's true label on that grid.
  The baselines go through the same path as checkpoints of the ``lci`` / ``linear`` kinds (same channels, crop
  and context size as the trained models). The true label is the SOURCE file ingest read for visit j (found under
  ``--source`` by the sha256 the store keeps per session), checked to have the native shape and affine; without
  ``--source`` it is the store's label pulled onto the native grid through the stored registration (linear
  interpolation of the tumour indicator, > 0.5), and the table says so.

``--tfm-steps 4,2,1`` adds tfm rows sampled with those step counts of the model's own solver to the crop-grid
table (the shipped solver and steps were chosen on validation patients with benchmarks/tuning/tune.py); ``--pairs all`` scores every (context, later scan) pair
instead of the next visit only.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BASELINES = ("lci", "linear")


def checkpoint_of(work: Path, kind: str) -> Path | None:
    for path in (work / "runs" / kind / "model.pt", work / "runs" / kind / "checkpoints" / "best.pt"):
        if path.exists():
            return path
    return None


def crop_grid(store: str, ckpts: dict[str, Path], test: list[str], samples: int, pairs: str,
              tfm_steps: list[int]) -> list[dict[str, Any]]:
    """Rows (model, n, dice_whole, volume_error_ml) of the evaluation harness over all horizons."""
    from longitudinal.evaluation.harness import EvalConfig, evaluate_models, load_predictor

    # The trained models themselves (no serving policy): this table compares models, not served forecasts.
    models = {kind: load_predictor(str(path))[1].model for kind, path in ckpts.items()}
    if "tfm" in ckpts:
        for steps in tfm_steps:
            m = load_predictor(str(ckpts["tfm"]))[1].model
            m.config.steps = int(steps)
            models[f"tfm ({m.config.solver} {steps})"] = m
    report = evaluate_models(models, store, test, EvalConfig(pairs=pairs, n_samples=samples))
    by = {(r["model"], r["patient_id"], r["target_idx"], r["last_context_idx"]): r for r in report.records}
    rows = []
    for r in report.rows:
        if r["horizon"] != "all":
            continue
        row = {"model": r["model"], "n": r["n"], "dice_whole": r["dice_whole"],
               "volume_error_ml": r["volume_error_ml"]}
        # Paired difference to LCI on the same targets (mean and standard error), so "better" has a noise scale.
        d = [by[k]["dice_whole"] - by[("lci", *k[1:])]["dice_whole"] for k in by if k[0] == r["model"]]
        if len(d) > 1:
            row["dice_minus_lci"] = float(np.mean(d))
            row["dice_minus_lci_se"] = float(np.std(d, ddof=1) / math.sqrt(len(d)))
        rows.append(row)
    return rows


class NativeTruth:
    """Visit j's true whole-tumour mask on its native grid (module docstring): the source label file by hash, or
    the store's label through the stored registration."""

    def __init__(self, source: Path | None) -> None:
        self.by_hash: dict[str, Path] = {}
        if source is not None:
            for path in sorted(source.rglob("*.nii*")):
                self.by_hash[hashlib.sha256(path.read_bytes()).hexdigest()] = path
        self.used: set[str] = set()

    def mask(self, arr: Any, j: int, shape_xyz: tuple[int, ...], affine: np.ndarray) -> np.ndarray:
        import nibabel as nib

        session = arr.sessions[j]
        path = self.by_hash.get(session.source_sha256.get("label", ""))
        if path is not None:
            img = nib.load(str(path))
            if tuple(img.shape) != tuple(shape_xyz) or not np.allclose(img.affine, affine, atol=1e-4):
                raise RuntimeError(f"{path}: shape/affine {img.shape} differ from the forecast grid {shape_xyz}")
            self.used.add("source label files")
            return np.asarray(img.dataobj) > 0
        from longitudinal.predict.native import NativeResampler

        grid = tuple(int(n) for n in arr.label.shape[-3:])
        res = NativeResampler(arr.affine, grid, affine, shape_xyz, np.asarray(session.transform_to_reference))
        self.used.add("store labels resampled")
        return res.to_native((np.asarray(arr.label[j]) > 0).astype(np.float32)) > 0.5


def baseline_checkpoint(path: Path, kind: str, like: Path) -> Path:
    """A checkpoint of a closed-form baseline with the channels, spacing, crop and data settings of ``like``."""
    import torch

    from longitudinal.models.base import build_model

    ref = torch.load(like, map_location="cpu", weights_only=True)
    model = build_model(kind)
    torch.save({"kind": kind, "config": model.config_dict(), "state_dict": model.state_dict(),
                **{k: ref[k] for k in ("channels", "spacing_mm", "crop_size") if k in ref},
                "meta": {"data": (ref.get("meta") or {}).get("data", {})}}, path)
    return path


def native_space(store: str, ckpts: dict[str, Path], test: list[str], samples: int, source: Path | None,
                 progress: bool = True) -> tuple[list[dict[str, Any]], str]:
    """Rows (model, n, dice_whole, volume_error_ml, dice_minus_lci[_se]) through forecast_patient in native space,
    and how the truth was obtained."""
    import nibabel as nib

    from longitudinal.forecast import ForecastRequest, Queries, forecast_patient, load_model, open_store
    from longitudinal.settings import Settings

    truth = NativeTruth(source)
    cohort = open_store(store)
    records: dict[tuple[str, str, int], dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="next-visit-") as tmp:
        root = Path(tmp)
        settings = Settings(home=root / "home", mlflow_tracking_uri=f"sqlite:///{root / 'home' / 'mlflow.db'}")
        like = next(iter(ckpts.values()))
        all_ckpts = {**ckpts, **{b: baseline_checkpoint(root / f"{b}.pt", b, like) for b in BASELINES}}
        masks: dict[tuple[str, int], np.ndarray] = {}
        t0 = time.perf_counter()
        for name, path in all_ckpts.items():
            model = load_model(settings, str(path))
            for pid in test:
                arr = cohort.arrays(pid)
                for j in range(1, len(arr.sessions)):
                    if not arr.sessions[j].has_label:
                        continue
                    out = root / "out" / name / pid / str(j)
                    r = forecast_patient(settings, ForecastRequest(pid, Queries(days_since_baseline=(float(arr.days[j]),)), store_url=store, model_ref=model, n_samples=samples, out_dir=out, native_session=arr.sessions[j].session, allow_raw_id=False))
                    img = nib.load(r.queries[0].files["prob_whole"])
                    pred = np.asarray(img.dataobj) > 0.5
                    if (pid, j) not in masks:
                        masks[(pid, j)] = truth.mask(arr, j, img.shape, img.affine)
                    true = masks[(pid, j)]
                    voxel_ml = abs(float(np.linalg.det(img.affine[:3, :3]))) / 1000.0
                    denom = int(pred.sum() + true.sum())
                    records[(name, pid, j)] = {
                        "dice_whole": 2.0 * float((pred & true).sum()) / denom if denom else 1.0,
                        "volume_error_ml": abs(float(pred.sum()) - float(true.sum())) * voxel_ml,
                    }
            if progress:
                print(f"native: {name} done ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    rows = []
    for name in all_ckpts:
        keys = [k for k in records if k[0] == name]
        row: dict[str, Any] = {"model": name, "n": len(keys)}
        for metric in ("dice_whole", "volume_error_ml"):
            row[metric] = float(np.mean([records[k][metric] for k in keys]))
        d = [records[k]["dice_whole"] - records[("lci", *k[1:])]["dice_whole"] for k in keys]
        if len(d) > 1:
            row["dice_minus_lci"] = float(np.mean(d))
            row["dice_minus_lci_se"] = float(np.std(d, ddof=1) / math.sqrt(len(d)))
        rows.append(row)
    return rows, " + ".join(sorted(truth.used)) or "none"


def print_table(title: str, rows: list[dict[str, Any]]) -> None:
    table = Table(title=title, title_justify="left")
    for col in ("model", "n", "Dice WT", "|dV| ml", "Dice - LCI (se)"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for r in rows:
        diff = f"{r['dice_minus_lci']:+.3f} ({r['dice_minus_lci_se']:.3f})" if "dice_minus_lci" in r else ""
        table.add_row(r["model"], str(r["n"]), f"{r['dice_whole']:.3f}", f"{r['volume_error_ml']:.2f}", diff)
    Console(width=120).print(table)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--models", default="tfm,np")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--mode", choices=("crop", "native", "both"), default="both")
    ap.add_argument("--source", type=Path, default=None, help="raw source folder ingest read (true native labels)")
    ap.add_argument("--pairs", choices=("next", "all"), default="next", help="crop grid: targets scored")
    ap.add_argument("--tfm-steps", default="", help="crop grid: extra tfm rows with these solver steps, e.g. 4,2,1")
    ap.add_argument("--json", type=Path, default=None, help="also write the tables here")
    args = ap.parse_args()
    ckpts, split = {}, None
    for kind in [m for m in args.models.split(",") if m]:
        path = checkpoint_of(args.work, kind)
        if path is None:
            continue
        ckpts[kind] = path
        split = split or json.loads((path.parent / "split.json" if path.name == "model.pt"
                                     else path.parent.parent / "split.json").read_text())
    if split is None:
        raise SystemExit(f"no trained model under {args.work}/runs: run benchmarks/forecast_quality.py first")
    store = str(args.work / "cohort.zarr")
    test = list(split["test"])
    body: dict[str, Any] = {"test_patients": test, "samples": args.samples}
    if args.mode in ("crop", "both"):
        steps = [int(s) for s in args.tfm_steps.split(",") if s]
        body["crop"] = crop_grid(store, ckpts, test, args.samples, args.pairs, steps)
        print_table(f"{args.pairs} visit of {len(test)} held-out patients, crop grid 32^3 (evaluation harness), "
                    f"{args.samples} samples", body["crop"])
    if args.mode in ("native", "both"):
        body["native"], body["native_truth"] = native_space(store, ckpts, test, args.samples, args.source)
        print_table(f"next visit of {len(test)} held-out patients, NATIVE space of that visit through "
                    f"forecast_patient (P(whole) > 0.5; truth: {body['native_truth']}), {args.samples} samples",
                    body["native"])
    if args.json:
        args.json.write_text(json.dumps(body, indent=2))


if __name__ == "__main__":
    main()
