"""The synthetic cohort written in the LUMIERE layout (``longitudinal synth --layout lumiere``).

The cohort is the one ``generate_cohort`` draws (same seed, preset and treated fraction: the same patients,
images and labels); it is drawn as BIDS in a scratch folder and rewritten under ``out``::

    Imaging/Patient-001/week-000-1/CT1.nii.gz FLAIR.nii.gz     (the channels the generator makes)
    Imaging/Patient-001/week-000-1/DeepBraTumIA-segmentation/atlas/segmentation/seg_mask.nii.gz
    Imaging/Patient-001/week-000-2/...                         (post-operative scan of a treated patient)
    Imaging/Patient-001/week-012/...
    treatments.csv       patient_id,date,treatment,end_date: the events the layout does not imply
    groundtruth.json     per patient: folders, the days ingest must store, the synthetic days, the events

File names come from the LUMIERE channel map (file -> channel, inverted: T1c -> CT1, FLAIR -> FLAIR); the
segmentation is in DeepBraTumIA's coding: 1 necrosis (the core where the density reaches the necrosis
threshold, found with the visit's true motion), 2 enhancing, 3 oedema/non-enhancing.

Weeks (``lumiere_schedule``): LUMIERE counts whole weeks and has no dates. Untreated patients: week
``round(days / 7)`` since the first scan. Treated patients: the last scan before the surgery and the first after
it become ``week-W-1`` / ``week-W-2`` of the pre-operative scan's week W (LUMIERE's pre- and post-operative pair),
and later scans count weeks from the surgery. A scan never shares a week with the one before (it moves to the
next week). So the days ingest stores (``7 W + N - 1``, see ``longitudinal.ingest.lumiere``) are the synthetic
days rounded to that grid; the ground truth keeps both. Radiotherapy and chemotherapy, which the layout cannot
show, go to ``treatments.csv`` in the same calendar (``settings.LUMIERE_ANCHOR`` plus days; days after the
surgery counted from the post-operative date).
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from longitudinal.settings import (
    DEFAULT_BIDS_CHANNEL_MAP,
    DEFAULT_LUMIERE_CHANNEL_MAP,
    DEFAULT_LUMIERE_SEGMENTATION,
)
from longitudinal.settings import LUMIERE_ANCHOR as ANCHOR
from longitudinal.synth.cohort import (
    DEFAULT_TREATED_FRACTION,
    GENERATOR_NAME,
    CohortSummary,
    bids_filename,
    generate_cohort,
    load_ground_truth,
)
from longitudinal.synth.motion import apply_motion

GROUND_TRUTH = "groundtruth.json"
TREATMENTS = "treatments.csv"
IMAGING = "Imaging"
# DeepBraTumIA's label coding.
NECROSIS, ENHANCING, OEDEMA = 1, 2, 3
DEEPBRATUMIA_LABELS = {0: "background", NECROSIS: "necrosis/non-enhancing", ENHANCING: "contrast-enhancing",
                       OEDEMA: "oedema"}
_GENERATED = ("T1c", "FLAIR")


@dataclass(frozen=True)
class Schedule:
    """Where a patient's scans go. folders: one ``week-*`` name per scan (scan order); days: days after the
    anchor of each (``7 W + N - 1``); anchors: (synthetic day, LUMIERE day) pairs from which later events are
    dated (the first scan; each surgery, on its post-operative date); pairs: (pre, post) scan indices."""

    folders: list[str]
    days: list[int]
    anchors: list[tuple[float, int]]
    pairs: list[tuple[int, int]] = field(default_factory=list)

    def event_day(self, synth_day: float) -> int:
        """The LUMIERE day (after the anchor) of an event on ``synth_day`` (days since the first scan)."""
        base, day = max((a for a in self.anchors if a[0] <= synth_day), default=self.anchors[0])
        return int(day + round(synth_day - base))


def lumiere_schedule(visit_days: Sequence[float], surgery_days: Sequence[float] = ()) -> Schedule:
    """Week folders for scans on ``visit_days`` (days since the first scan, ascending) of a patient operated on
    ``surgery_days`` (module docstring). A surgery with no scan before or after it pairs nothing."""
    days = [float(d) for d in visit_days]
    post_of: dict[int, tuple[int, float]] = {}  # post-operative scan -> (pre-operative scan, surgery day)
    used: set[int] = set()
    for s in sorted(surgery_days):
        pre = max((k for k, d in enumerate(days) if d <= s), default=None)
        post = min((k for k, d in enumerate(days) if d > s), default=None)
        if pre is not None and post is not None and not {pre, post} & used:
            post_of[post] = (pre, float(s))
            used |= {pre, post}
    pre_scans = {pre for pre, _ in post_of.values()}
    origin, origin_week, prev = (days[0] if days else 0.0), 0, -1
    folders: list[str] = []
    out_days: list[int] = []
    weeks: list[int] = []
    anchors = [(origin, 0)]
    for k, d in enumerate(days):
        if k in post_of:
            pre, s = post_of[k]
            week = weeks[pre]
            folders.append(f"week-{week:03d}-2")
            out_days.append(7 * week + 1)
            origin, origin_week = s, week
            anchors.append((s, 7 * week + 1))
        else:
            week = max(origin_week + round((d - origin) / 7.0), prev + 1)
            folders.append(f"week-{week:03d}-1" if k in pre_scans else f"week-{week:03d}")
            out_days.append(7 * week)
        weeks.append(week)
        prev = week
    pairs = sorted((pre, post) for post, (pre, _) in post_of.items())
    return Schedule(folders, out_days, anchors, pairs)


@dataclass
class LumiereCohort:
    """What ``write_lumiere_cohort`` wrote: the root, its ``Imaging/`` folder, the drawn cohort's summary and
    each patient's week folders."""

    out: Path
    imaging: Path
    summary: CohortSummary
    folders: dict[str, list[str]] = field(default_factory=dict)


def _lumiere_files(channel_map: Mapping[str, str]) -> tuple[dict[str, str], list[str]]:
    """Generated channel -> file name (the first file the LUMIERE map gives it), and the problems."""
    files: dict[str, str] = {}
    for key, channel in channel_map.items():
        name = key if key.endswith((".nii", ".nii.gz")) else key + ".nii.gz"
        files.setdefault(channel, name)
    problems = [f"the LUMIERE channel map names no file for channel {c} ({dict(channel_map)})"
                for c in _GENERATED if c not in files]
    for c in _GENERATED:
        if c in files and _unsafe(files[c]):
            problems.append(f"file {files[c]!r} of channel {c} must be a relative path without '..'")
    return {c: files[c] for c in _GENERATED if c in files}, problems


def _unsafe(text: str) -> bool:
    path = PurePosixPath(text)
    return not text.strip() or path.is_absolute() or ".." in path.parts


def _prepare(out: Path) -> None:
    """Refuse a non-empty folder that is not an earlier LUMIERE-layout synth cohort; clear an earlier one."""
    if not out.exists():
        out.mkdir(parents=True)
        return
    if not out.is_dir():
        raise ValueError(f"{out} exists and is not a directory")
    if not any(out.iterdir()):
        return
    try:
        ours = json.loads((out / GROUND_TRUTH).read_text()).get("generator") == GENERATOR_NAME
    except (OSError, ValueError, AttributeError):
        ours = False
    if not ours:
        raise ValueError(f"{out} is not empty and is not a LUMIERE-layout cohort written by {GENERATOR_NAME}; "
                         "refusing to write")
    for child in out.iterdir():
        if child.is_dir() and (child.name == IMAGING or child.name.startswith(".synth-")):
            shutil.rmtree(child)
        elif child.name in (GROUND_TRUTH, TREATMENTS, "README"):
            child.unlink()


def _deepbratumia(dseg_path: Path, session: dict, necrosis: float) -> tuple[object, dict[str, int]]:
    """The visit's label (0 bg, 1 oedema/non-enhancing, 2 core) in DeepBraTumIA's coding, as a NIfTI image on
    the same grid, and its voxel count per value."""
    import nibabel as nib

    dseg = nib.load(str(dseg_path))
    labels = np.asarray(dseg.dataobj).astype(np.uint8)
    density = nib.load(str(session["density_path"]))
    moved = apply_motion(density.get_fdata(dtype=np.float32), density.affine, session["motion"], order=1)
    out = np.zeros(labels.shape, dtype=np.uint8)
    out[labels == 1] = OEDEMA
    out[labels == 2] = ENHANCING
    out[(labels == 2) & (moved >= necrosis)] = NECROSIS
    counts = {str(v): int(np.count_nonzero(out == v)) for v in (NECROSIS, ENHANCING, OEDEMA)}
    return nib.Nifti1Image(out, dseg.affine, dseg.header), counts


def write_lumiere_cohort(
    out: Path,
    n_patients: int,
    seed: int,
    preset: str = "default",
    progress: Callable[[int, int], None] | None = None,
    *,
    treated_fraction: float = DEFAULT_TREATED_FRACTION,
    channel_map: Mapping[str, str] | None = None,
    segmentation: str = DEFAULT_LUMIERE_SEGMENTATION,
) -> LumiereCohort:
    """Write the synthetic cohort of (n_patients, seed, preset, treated_fraction) in the LUMIERE layout under
    ``out`` (module docstring). channel_map: LUMIERE file -> channel (default
    ``settings.DEFAULT_LUMIERE_CHANNEL_MAP``); segmentation: the mask's path relative to a week folder.
    progress(done, total) follows the patients drawn. An earlier such cohort in ``out`` is replaced, any other
    non-empty folder refused. Raises ValueError naming every bad argument."""
    import nibabel as nib

    files, problems = _lumiere_files(channel_map or DEFAULT_LUMIERE_CHANNEL_MAP)
    if _unsafe(segmentation):
        problems.append(f"segmentation {segmentation!r} must be a path relative to the week folder, without '..'")
    if problems:
        raise ValueError("cannot write the LUMIERE-layout cohort:\n  " + "\n  ".join(problems))
    out = Path(out)
    _prepare(out)
    imaging = out / IMAGING
    bids_map = {k: dict(v) for k, v in DEFAULT_BIDS_CHANNEL_MAP.items()}
    rows: list[tuple[str, str, str, str]] = []
    truth: list[dict] = []
    with tempfile.TemporaryDirectory(prefix=".synth-", dir=out) as scratch:
        bids = Path(scratch) / "bids"
        summary = generate_cohort(bids, n_patients, seed, preset, progress, channel_map=bids_map,
                                  treated_fraction=treated_fraction)
        cohort = LumiereCohort(out=out, imaging=imaging, summary=summary)
        for p in summary.patients:
            gt = load_ground_truth(bids, p.subject)
            sessions, events = gt["sessions"], gt["treatments"]
            schedule = lumiere_schedule([s["days_since_baseline"] for s in sessions],
                                        [e["days_since_baseline"] for e in events if e["kind"] == "surgery"])
            patient = f"Patient-{p.subject}"
            cohort.folders[patient] = list(schedule.folders)
            entry: dict = {"patient": patient, "bids_subject": f"sub-{p.subject}", "treated": p.treated,
                           "sessions": [], "events": []}
            necrosis = float(gt["params"]["thresholds"]["necrosis"])
            for s, folder, day in zip(sessions, schedule.folders, schedule.days, strict=True):
                week_dir = imaging / patient / folder
                ses = s["session_id"].removeprefix("ses-")
                anat = bids / f"sub-{p.subject}" / s["session_id"] / "anat"
                for channel, name in files.items():
                    (week_dir / name).parent.mkdir(parents=True, exist_ok=True)
                    shutil.move(str(anat / bids_filename(p.subject, ses, bids_map[channel])), str(week_dir / name))
                dseg = (bids / "derivatives" / "labels" / f"sub-{p.subject}" / s["session_id"] / "anat"
                        / f"sub-{p.subject}_{s['session_id']}_dseg.nii.gz")
                image, counts = _deepbratumia(dseg, s, necrosis)
                (week_dir / segmentation).parent.mkdir(parents=True, exist_ok=True)
                nib.save(image, str(week_dir / segmentation))
                entry["sessions"].append({
                    "folder": folder, "days": day - schedule.days[0], "synth_days": s["days_since_baseline"],
                    "date": (ANCHOR + dt.timedelta(days=day)).isoformat(), "files": dict(files),
                    "segmentation": segmentation, "label_voxels": counts,
                    "whole_volume_ml": s["whole_volume_ml"], "enhancing_volume_ml": s["enhancing_volume_ml"],
                })
            implied = {schedule.days[post] for _, post in schedule.pairs}
            for e in events:
                start = schedule.event_day(e["days_since_baseline"])
                end = None if e["end_days_since_baseline"] is None else schedule.event_day(e["end_days_since_baseline"])
                source = "implied" if e["kind"] == "surgery" and start in implied else TREATMENTS
                entry["events"].append({
                    "kind": e["kind"], "days": start - schedule.days[0],
                    "end_days": None if end is None else end - schedule.days[0],
                    "date": (ANCHOR + dt.timedelta(days=start)).isoformat(), "source": source,
                    "synth_days": e["days_since_baseline"],
                })
                if source == TREATMENTS:
                    rows.append((patient, (ANCHOR + dt.timedelta(days=start)).isoformat(), e["kind"],
                                 "" if end is None else (ANCHOR + dt.timedelta(days=end)).isoformat()))
            truth.append(entry)
    with (out / TREATMENTS).open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(("patient_id", "date", "treatment", "end_date"))
        writer.writerows(rows)
    body = {"generator": GENERATOR_NAME, "layout": "lumiere", "preset": summary.preset, "seed": seed,
            "treated_fraction": treated_fraction, "anchor": ANCHOR.isoformat(), "segmentation": segmentation,
            "labels": {str(k): v for k, v in DEEPBRATUMIA_LABELS.items()}, "patients": truth}
    (out / GROUND_TRUTH).write_text(json.dumps(body, indent=2) + "\n")
    (out / "README").write_text(
        "Synthetic longitudinal glioma cohort in the LUMIERE layout, written by `longitudinal synth --layout "
        "lumiere`.\nImaging/Patient-*/week-*/: images and the segmentation (DeepBraTumIA coding: 1 necrosis, 2 "
        "enhancing, 3 oedema).\nweek-W-1 / week-W-2: pre- and post-operative scans of week W. treatments.csv: "
        "radiotherapy and chemotherapy,\ndated from " + ANCHOR.isoformat() + " like the weeks. groundtruth.json: "
        "the days, labels and events ingest must store.\n"
    )
    return cohort


def load_lumiere_ground_truth(root: Path) -> dict:
    """The ``groundtruth.json`` of a LUMIERE-layout synth cohort: {"anchor", "segmentation", "labels",
    "patients": [{"patient", "treated", "sessions": [{"folder", "days", "synth_days", "date", "files",
    "label_voxels", ...}], "events": [{"kind", "days", "end_days", "date", "source" ("implied" or
    "treatments.csv")}]}]}. Days: whole days since the patient's first session, as ingest stores them."""
    path = Path(root) / GROUND_TRUTH
    if not path.is_file():
        raise FileNotFoundError(f"no {GROUND_TRUTH} under {root}")
    return json.loads(path.read_text())
