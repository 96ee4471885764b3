"""Ingest throughput, memory and registration accuracy on a synthetic cohort. Prints tables; not a test.

    .venv/bin/python benchmarks/ingest.py [--preset default|tiny] [--patients N] [--workers W] [--seed S]

Measured (each run in a fresh subprocess, so peak memory is that run's own):
- I/O floor: read every NIfTI (nibabel), stack, write the store (CohortStore.write_patient); no validation,
  resampling or registration.
- End to end: ``ingest_cohort`` with 1 worker and with W workers (default: all cores).
- Peak RSS of the end-to-end run at N and 2N patients (it should stay flat: one patient in memory per worker).
- TRE of the stored transforms against the generator's known motions, over head voxels (mm).
A "scan" is one session (all its channels). "s/scan/core" = wall seconds x cores used / scans; "CPU s/scan" =
user+system CPU seconds of the run (imports included) / scans, which a machine shared with other jobs does not
inflate the way it inflates wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KEY = "benchmark-pseudonym-key"


def _child_ingest(source: str, store: str, workers: int, spacing: float, home: str) -> dict:
    from longitudinal.ingest import ingest_cohort
    from longitudinal.settings import Settings

    settings = Settings(home=home, pseudonym_key=KEY, target_spacing_mm=spacing)
    t0 = time.perf_counter()
    report = ingest_cohort(source, store, settings, workers=workers)
    return {"seconds": time.perf_counter() - t0, "scans": report.stored, "quarantined": report.quarantined}


def _child_floor(source: str, store: str) -> dict:
    import nibabel as nib
    import numpy as np

    from longitudinal.ingest.deid import pseudonym
    from storage.schema import PatientRecord, SessionRecord
    from storage.store import CohortStore

    t0 = time.perf_counter()
    cohort = CohortStore.open(store, create=True)
    scans = 0
    root = Path(source)
    for sub in sorted(p for p in root.iterdir() if p.name.startswith("sub-")):
        images, sessions = [], []
        for t, ses in enumerate(sorted(p for p in sub.iterdir() if p.name.startswith("ses-"))):
            files = [ses / "anat" / f"{sub.name}_{ses.name}_ce-gd_T1w.nii.gz",
                     ses / "anat" / f"{sub.name}_{ses.name}_FLAIR.nii.gz"]
            vols = [np.asarray(nib.load(f).dataobj, dtype=np.float32) for f in files]
            affine = nib.load(files[0]).affine
            images.append(np.stack([v.T for v in vols]))
            sessions.append(SessionRecord(ses.name, float(t), None, {"T1c": str(t), "FLAIR": str(t)},
                                          np.eye(4).tolist(), 0.0, list(vols[0].shape), affine.tolist()))
            scans += 1
        image = np.stack(images)
        zooms = [float(z) for z in nib.load(files[0]).header.get_zooms()[:3]]
        cohort.write_patient(PatientRecord(
            patient_id=pseudonym(sub.name, KEY.encode()), image=image,
            label=np.zeros((image.shape[0], *image.shape[2:]), np.uint8),
            days=np.arange(len(sessions), dtype=np.float64), channels=("T1c", "FLAIR"),
            spacing_mm=(zooms[2], zooms[1], zooms[0]), reference_affine=affine, sessions=sessions,
        ))
    return {"seconds": time.perf_counter() - t0, "scans": scans, "quarantined": 0}


def _run_child(args: list[str], env_threads: int | None = None) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if env_threads:
        env["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(env_threads)
    out = subprocess.run([sys.executable, __file__, "--child", *args], env=env, capture_output=True, text=True,
                         check=False)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def _subset(full: Path, n: int, dst: Path) -> Path:
    """A BIDS folder with the first n subjects of ``full`` (symlinks, no copies)."""
    dst.mkdir(parents=True)
    (dst / "dataset_description.json").symlink_to(full / "dataset_description.json")
    (dst / "derivatives").symlink_to(full / "derivatives")
    for sub in sorted(p for p in full.iterdir() if p.name.startswith("sub-"))[:n]:
        (dst / sub.name).symlink_to(sub)
    return dst


def _tre(source: Path, store: str) -> tuple[float, float, int]:
    import numpy as np

    from longitudinal.ingest.deid import pseudonym
    from longitudinal.synth import load_ground_truth
    from storage.store import CohortStore

    cohort = CohortStore.open(store)
    errors = []
    for sub in sorted(p.name for p in source.iterdir() if p.name.startswith("sub-")):
        gt = load_ground_truth(source, sub)["sessions"]
        arrays = cohort.arrays(pseudonym(sub[4:], KEY.encode()))
        ref = np.asarray(arrays.image[0, 0])
        zyx = np.argwhere(ref > 0.1)
        pts = np.c_[zyx[:, ::-1], np.ones(len(zyx))] @ arrays.affine.T
        base_inv = np.linalg.inv(gt[0]["motion"])
        for rec, g in zip(arrays.sessions[1:], gt[1:], strict=True):
            est = pts @ np.linalg.inv(np.asarray(rec.transform_to_reference)).T
            true = pts @ (g["motion"] @ base_inv).T
            errors.append(np.linalg.norm(est[:, :3] - true[:, :3], axis=1))
    tre = np.concatenate(errors)
    return float(tre.mean()), float(tre.max()), len(errors)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        kind, *rest = sys.argv[2:]
        result = _child_floor(*rest) if kind == "floor" else _child_ingest(rest[0], rest[1], int(rest[2]),
                                                                             float(rest[3]), rest[4])
        usage = resource.getrusage(resource.RUSAGE_SELF)
        result["peak_rss_mb"] = usage.ru_maxrss / 1024.0
        # CPU seconds are what a loaded, shared machine cannot inflate (wall seconds can be).
        result["cpu_seconds"] = usage.ru_utime + usage.ru_stime
        print(json.dumps(result))
        return

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="default", choices=["default", "tiny"])
    parser.add_argument("--patients", type=int, default=2, help="N (memory is also measured at 2N)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--spacing", type=float, default=None, help="target spacing (default: the preset's)")
    args = parser.parse_args()

    from longitudinal.synth import generate_cohort, get_preset

    spacing = args.spacing or get_preset(args.preset).spacing_mm
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        tmp_path = Path(tmp)
        t0 = time.perf_counter()
        full = tmp_path / "bids"
        generate_cohort(full, 2 * args.patients, args.seed, args.preset)
        print(f"generated {2 * args.patients} patients ({args.preset}) in {time.perf_counter() - t0:.1f} s")
        small = _subset(full, args.patients, tmp_path / "bids-n")
        home = str(tmp_path / "home")

        rows = []
        floor = _run_child(["floor", str(small), str(tmp_path / "floor.zarr")])
        rows.append(("I/O floor (read NIfTI, write Zarr)", args.patients, 1, floor))
        one = _run_child(["ingest", str(small), str(tmp_path / "w1.zarr"), "1", str(spacing), home], env_threads=1)
        rows.append(("end to end, 1 worker, 1 ITK thread", args.patients, 1, one))
        many = _run_child(["ingest", str(small), str(tmp_path / "wn.zarr"), str(args.workers), str(spacing), home])
        rows.append((f"end to end, {args.workers} workers", args.patients, cores, many))
        double = _run_child(["ingest", str(full), str(tmp_path / "w2n.zarr"), str(args.workers), str(spacing), home])
        rows.append((f"end to end, {args.workers} workers", 2 * args.patients, cores, double))

        print(f"\ningest throughput ({args.preset} preset, target {spacing} mm, {cores} cores)")
        print(f"{'run':40s} {'patients':>8s} {'scans':>6s} {'seconds':>8s} {'scans/min':>10s} "
              f"{'s/scan/core':>12s} {'CPU s/scan':>11s} {'peak RSS MB':>12s}")
        for name, n, used, r in rows:
            per_min = 60.0 * r["scans"] / r["seconds"] if r["seconds"] else float("nan")
            per_core = r["seconds"] * used / max(r["scans"], 1)
            cpu = r["cpu_seconds"] / max(r["scans"], 1)
            print(f"{name:40s} {n:8d} {r['scans']:6d} {r['seconds']:8.1f} {per_min:10.1f} {per_core:12.2f} "
                  f"{cpu:11.2f} {r['peak_rss_mb']:12.0f}")
        print(f"load average during the run: {os.getloadavg()}")
        mean, mx, n = _tre(full, str(tmp_path / "w2n.zarr"))
        print(f"\nregistration TRE over head voxels ({n} sessions, {2 * args.patients} patients): "
              f"mean {mean:.3f} mm, max {mx:.3f} mm")


if __name__ == "__main__":
    main()
