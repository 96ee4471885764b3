"""Ingest throughput, cost per scan, memory and registration accuracy on a synthetic cohort. Prints tables; not a
test.

    .venv/bin/python benchmarks/ingest.py [--preset default|tiny] [--patients N] [--workers W] [--seed S]
        [--tables throughput,per-scan]

Throughput table (each run in a fresh subprocess, so peak memory is that run's own):
- I/O floor: read every NIfTI (nibabel), stack, write the store (CohortStore.write_patient); no validation,
  resampling or registration.
- End to end: ``ingest_cohort`` with 1 worker and with W workers (default: all cores).
- Peak RSS of the end-to-end run at N and 2N patients (it should stay flat: one patient in memory per worker).
- TRE of the stored transforms against the generator's known motions, over head voxels (mm).
A "scan" is one session (all its channels). "s/scan/core" = wall seconds x cores used / scans; "CPU s/scan" =
user+system CPU seconds of the run (imports included) / scans, which a machine shared with other jobs does not
inflate the way it inflates wall time.

Per-scan table (one core: 1 worker, ITK and BLAS on 1 thread, each row a fresh subprocess): the CPU and wall
seconds of ``ingest_cohort`` itself (imports and cohort generation excluded) per scan of the N patients, at the
preset's grid ("2 mm": every channel and label written at 2 mm) and on the same scans rewritten at clinical
resolution ("clinical 1 mm": T1c and its label at 1 mm isotropic, FLAIR at 1 x 1 x 4 mm, 4 mm axial slabs),
both ingested onto the default target grid. "SimpleITK alone": the textbook SimpleITK rigid registration (Mattes
MI, 50 bins, 1 % random samples, gradient descent, 4/2/1 pyramid, the SimpleITK notebooks' recipe) of every
later T1c to the patient's first one at their native resolution, reads included: a yardstick that does not
change with this package's code. "x SimpleITK" = ingest CPU seconds / yardstick CPU seconds on the same scans.
TRE: the stored transforms (ingest) or the yardstick's transforms against the known motions, over head voxels.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import SimpleITK as sitk

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



def _child_scan(source: str, store: str, spacing: float, home: str) -> dict:
    """One-core cost of ``ingest_cohort`` itself: CPU and wall seconds around the call. Imports are excluded,
    the ones ingest makes lazily on first use too (imported here first): a one-off per process, not per scan."""
    import nibabel  # noqa: F401
    import pandas  # noqa: F401
    import pyarrow.parquet  # noqa: F401
    import scipy.ndimage  # noqa: F401
    import SimpleITK as sitk
    import zarr  # noqa: F401

    from longitudinal.ingest import ingest_cohort
    from longitudinal.settings import Settings
    from storage.store import CohortStore  # noqa: F401

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    settings = Settings(home=home, pseudonym_key=KEY, target_spacing_mm=spacing)
    c0, t0 = time.process_time(), time.perf_counter()
    report = ingest_cohort(source, store, settings, workers=1)
    return {"seconds": time.perf_counter() - t0, "cpu": time.process_time() - c0, "scans": report.stored,
            "quarantined": report.quarantined}


def _textbook_rigid(fixed: sitk.Image, moving: sitk.Image) -> sitk.Euler3DTransform:
    """The SimpleITK notebooks' rigid registration recipe, unchanged: the yardstick of the per-scan table."""
    import SimpleITK as sitk

    initial = sitk.CenteredTransformInitializer(fixed, moving, sitk.Euler3DTransform(),
                                                sitk.CenteredTransformInitializerFilter.GEOMETRY)
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=50)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(0.01, 1)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsGradientDescent(learningRate=1.0, numberOfIterations=100, convergenceMinimumValue=1e-6,
                                      convergenceWindowSize=10)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel([4, 2, 1])
    reg.SetSmoothingSigmasPerLevel([2, 1, 0])
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    rigid = sitk.Euler3DTransform(initial)
    reg.SetInitialTransform(rigid, inPlace=True)
    reg.Execute(fixed, moving)
    return rigid


def _child_sitk(source: str) -> dict:
    """The yardstick: read every T1c and register every later one to the patient's first (one core)."""
    import numpy as np
    import SimpleITK as sitk

    from longitudinal.registration.geometry import lps_to_ras, ras_affine, transform_to_matrix
    from longitudinal.synth import load_ground_truth

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    root = Path(source)
    cpu = wall = 0.0
    scans, errors = 0, []
    for sub in sorted(p.name for p in root.iterdir() if p.name.startswith("sub-")):
        gt = load_ground_truth(root, sub)["sessions"]
        files = [next((root / sub / g["session_id"] / "anat").glob("*_ce-gd_T1w.nii.gz")) for g in gt]
        c0, t0 = time.process_time(), time.perf_counter()
        fixed = sitk.ReadImage(str(files[0]), sitk.sitkFloat32)
        cpu, wall, scans = cpu + time.process_time() - c0, wall + time.perf_counter() - t0, scans + 1
        arr = sitk.GetArrayViewFromImage(fixed)
        zyx = np.argwhere(arr > 0.1 * np.percentile(arr, 99.0))
        pts = np.c_[zyx[:, ::-1], np.ones(len(zyx))] @ ras_affine(fixed).T
        base_inv = np.linalg.inv(gt[0]["motion"])
        for path, g in zip(files[1:], gt[1:], strict=True):
            c0, t0 = time.process_time(), time.perf_counter()
            tx = _textbook_rigid(fixed, sitk.ReadImage(str(path), sitk.sitkFloat32))
            cpu, wall, scans = cpu + time.process_time() - c0, wall + time.perf_counter() - t0, scans + 1
            fixed_to_moving = lps_to_ras(transform_to_matrix(tx))
            est, true = pts @ fixed_to_moving.T, pts @ (np.asarray(g["motion"]) @ base_inv).T
            errors.append(np.linalg.norm(est[:, :3] - true[:, :3], axis=1))
    tre = np.concatenate(errors)
    return {"seconds": wall, "cpu": cpu, "scans": scans, "tre_mean": float(tre.mean()), "tre_max": float(tre.max())}


def _clinical(src: Path, dst: Path) -> Path:
    """A copy of the cohort at clinical resolution: T1c and its label at 1 mm isotropic, FLAIR at 1 x 1 x 4 mm
    (each 4 mm axial slice the average of its slab), int16 like the source. Content keeps its physical place, so
    the generator's known motions still hold. Linear interpolation of 2 mm data: smoother than a real 1 mm scan,
    which changes the cost of reading and resampling, not of registering at the 2 mm target."""
    import numpy as np
    import SimpleITK as sitk

    shutil.copytree(src, dst)  # the files behind the subset's links: the source stays as it is

    def grid(image: sitk.Image, spacing: tuple[float, float, float]) -> sitk.Image:
        old = np.asarray(image.GetSpacing())
        new = np.asarray(spacing)
        size = np.round(np.asarray(image.GetSize()) * old / new).astype(int)
        direction = np.asarray(image.GetDirection()).reshape(3, 3)
        corner = np.asarray(image.GetOrigin()) - direction @ (old / 2.0)
        out = sitk.Image([int(v) for v in size], sitk.sitkUInt8)
        out.SetSpacing([float(v) for v in new])
        out.SetDirection(image.GetDirection())
        out.SetOrigin((corner + direction @ (new / 2.0)).tolist())
        return out

    def write(image: sitk.Image, path: Path) -> None:
        sitk.WriteImage(image, str(path), useCompression=True)

    for t1 in sorted(dst.glob("sub-*/ses-*/anat/*_ce-gd_T1w.nii.gz")):
        sub, ses = t1.parts[-4], t1.parts[-3]
        image = sitk.ReadImage(str(t1), sitk.sitkFloat32)
        fine = grid(image, (1.0, 1.0, 1.0))
        write(sitk.Cast(sitk.Resample(image, fine, sitk.Transform(), sitk.sitkLinear, 0.0), sitk.sitkInt16), t1)
        flair_path = next(t1.parent.glob("*_FLAIR.nii.gz"))
        flair = sitk.ReadImage(str(flair_path), sitk.sitkFloat32)
        slab = sitk.SmoothingRecursiveGaussian(flair, [0.01, 0.01, 4.0 / np.sqrt(12.0)])
        write(sitk.Cast(sitk.Resample(slab, grid(flair, (1.0, 1.0, 4.0)), sitk.Transform(), sitk.sitkLinear, 0.0),
                        sitk.sitkInt16), flair_path)
        label_path = dst / "derivatives" / "labels" / sub / ses / "anat" / f"{sub}_{ses}_dseg.nii.gz"
        if label_path.exists():
            write(sitk.Resample(sitk.ReadImage(str(label_path)), fine, sitk.Transform(), sitk.sitkNearestNeighbor,
                                0, sitk.sitkUInt8), label_path)
    return dst


def _per_scan(small: Path, tmp_path: Path, spacing: float, repeats: int) -> None:
    """The per-scan table (module docstring) for the cohort ``small`` at 2 mm and at clinical resolution; each
    figure the lowest of ``repeats`` runs (other jobs on a shared machine only ever add to it)."""
    clinical = _clinical(small, tmp_path / "bids-clinical")
    print(f"\ningest cost per scan on one core (1 worker, 1 ITK thread; target {spacing} mm)")
    print(f"{'inputs':14s} {'scans':>5s} {'CPU s/scan':>10s} {'wall s/scan':>11s} {'SimpleITK CPU s/scan':>20s} "
          f"{'x SimpleITK':>11s} {'TRE mean mm':>11s} {'TRE max mm':>10s} {'SimpleITK TRE mean/max':>22s} "
          f"{'peak RSS MB':>11s}")
    for name, source in (("2 mm", small), ("clinical 1 mm", clinical)):
        runs, refs = [], []
        for k in range(repeats):
            store = str(tmp_path / f"scan-{name.replace(' ', '-')}-{k}.zarr")
            runs.append(_run_child(["scan", str(source), store, str(spacing), str(tmp_path / f"home-{k}")],
                                   env_threads=1))
            refs.append(_run_child(["sitk", str(source)], env_threads=1))
        one = {**min(runs, key=lambda r: r["cpu"]), "seconds": min(r["seconds"] for r in runs),
               "peak_rss_mb": max(r["peak_rss_mb"] for r in runs)}
        ref = {**min(refs, key=lambda r: r["cpu"]), "seconds": min(r["seconds"] for r in refs)}
        mean, mx, _ = _tre(Path(source), store)
        n = max(one["scans"], 1)
        print(f"{name:14s} {one['scans']:5d} {one['cpu'] / n:10.2f} {one['seconds'] / n:11.2f} "
              f"{ref['cpu'] / max(ref['scans'], 1):20.2f} {one['cpu'] / ref['cpu']:11.2f} {mean:11.3f} {mx:10.3f} "
              f"{ref['tre_mean']:10.3f} / {ref['tre_max']:9.3f} {one['peak_rss_mb']:11.0f}")
        if one["quarantined"]:
            print(f"  ({one['quarantined']} scans quarantined at {name})")
    print(f"load average during the run: {os.getloadavg()}")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        kind, *rest = sys.argv[2:]
        if kind == "floor":
            result = _child_floor(*rest)
        elif kind == "scan":
            result = _child_scan(rest[0], rest[1], float(rest[2]), rest[3])
        elif kind == "sitk":
            result = _child_sitk(rest[0])
        else:
            result = _child_ingest(rest[0], rest[1], int(rest[2]), float(rest[3]), rest[4])
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
    parser.add_argument("--tables", default="throughput,per-scan",
                        help="comma-separated: throughput (1 and W workers, N and 2N patients), per-scan (one core, "
                             "2 mm and clinical 1 mm inputs, against SimpleITK alone)")
    parser.add_argument("--repeats", type=int, default=1, help="per-scan table: the lowest of this many runs")
    args = parser.parse_args()
    tables = {t.strip() for t in args.tables.split(",") if t.strip()}
    if not tables or tables - {"throughput", "per-scan"}:
        parser.error(f"--tables takes throughput and/or per-scan, got {args.tables!r}")

    from longitudinal.synth import generate_cohort, get_preset

    spacing = args.spacing or get_preset(args.preset).spacing_mm
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        tmp_path = Path(tmp)
        t0 = time.perf_counter()
        full = tmp_path / "bids"
        n_generated = 2 * args.patients if "throughput" in tables else args.patients
        generate_cohort(full, n_generated, args.seed, args.preset)
        print(f"generated {n_generated} patients ({args.preset}) in {time.perf_counter() - t0:.1f} s")
        small = _subset(full, args.patients, tmp_path / "bids-n")
        home = str(tmp_path / "home")
        if "per-scan" in tables:
            _per_scan(small, tmp_path, spacing, args.repeats)
        if "throughput" not in tables:
            return

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
