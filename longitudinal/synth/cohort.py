"""The synthetic longitudinal glioma cohort: render the drawn patients' visits (``patients.py``), write BIDS.

Layout written under ``out``::

    dataset_description.json  participants.tsv  participants.json  README  <channel sidecars>.json
    sub-001/sub-001_sessions.tsv                          session_id, acq_time (ISO 8601)
    sub-001/sub-001_treatments.tsv                        date, treatment, end_date (treated subjects only)
    sub-001/ses-01/anat/sub-001_ses-01_ce-gd_T1w.nii.gz   T1c (names from the BIDS channel map)
    sub-001/ses-01/anat/sub-001_ses-01_FLAIR.nii.gz       FLAIR
    derivatives/labels/sub-001/ses-01/anat/sub-001_ses-01_dseg.nii.gz   0 bg, 1 oedema, 2 core (moved space)
    derivatives/groundtruth/sub-001/params.json           D_w, rho, seed, thresholds, silent period, dates
    derivatives/groundtruth/sub-001/sessions.json         days, motion M (p_moved = M p_true), true volumes
    derivatives/groundtruth/sub-001/ses-01_density.nii.gz unmoved density c (ses-02_cavity.nii.gz: the cavity)
    derivatives/groundtruth/sub-001/treatments.json       events: days since baseline, dates, parameters,
                                                          volumes before/after (treated subjects only)
    derivatives/groundtruth/sub-001/event-01_surgery_before_density.nii.gz   c right before (and _after) each event
    derivatives/groundtruth/volumes.tsv                   every (subject, session) with its true volumes

Every patient is drawn (``patients.py``) and rendered from its own random streams seeded by (seed, patient
index), so a cohort is a pure function of (n_patients, seed, preset, treated_fraction) and patient k is the
same whatever n_patients is. About half the patients (``treated_fraction``) are treated after their baseline
scan (``treatment.py``): resection, radiotherapy with temozolomide, follow-up scans every two to three months;
the others grow untreated.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path

import numpy as np

from longitudinal.synth.anatomy import Anatomy, load_anatomy
from longitudinal.synth.config import SynthPreset, get_preset
from longitudinal.synth.motion import apply_motion, random_motion
from longitudinal.synth.patients import SynthPatient, draw_patient, is_treated
from longitudinal.synth.render import (
    bias_field,
    label_map,
    render_clean,
    rician,
    to_int16,
    white_matter_level,
)

GENERATOR_NAME = "longitudinal synth"
# Share of patients treated by default (resection, radiotherapy, temozolomide); the rest grow untreated.
DEFAULT_TREATED_FRACTION = 0.5
BIDS_VERSION = "1.9.0"
# BIDS filename entity order (subset that a channel map may use); the suffix comes last.
_ENTITY_ORDER = ("task", "acq", "ce", "trc", "rec", "dir", "run", "mod", "echo", "flip", "inv", "mt", "part")


# ------------------------------------------------------------------------------------------------ records
@dataclass(frozen=True)
class PatientSummary:
    """One row of the cohort summary. Volumes in ml, D_w in mm^2/day, rho in 1/day."""

    subject: str
    n_visits: int
    min_whole_ml: float
    max_whole_ml: float
    d_white: float
    rho: float
    treated: bool = False


@dataclass
class CohortSummary:
    """What ``generate_cohort`` wrote: the BIDS root, how, and one row per patient."""

    out: Path
    preset: str
    seed: int
    patients: list[PatientSummary] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def n_patients(self) -> int:
        return len(self.patients)

    @property
    def n_visits(self) -> int:
        return sum(p.n_visits for p in self.patients)

    @property
    def volume_range_ml(self) -> tuple[float, float]:
        """(smallest, largest) whole-tumour volume over every visit (ml); (nan, nan) when empty."""
        if not self.patients:
            return (math.nan, math.nan)
        return (min(p.min_whole_ml for p in self.patients), max(p.max_whole_ml for p in self.patients))


# ------------------------------------------------------------------------------------------------ naming
def bids_filename(subject: str, session: str, entities: Mapping[str, str], extension: str = ".nii.gz") -> str:
    """``sub-<s>_ses-<t>[_<entity>-<value>...]_<suffix><ext>`` from a channel map entry.

    entities: BIDS entities of one channel, e.g. {"suffix": "T1w", "ce": "gd"}; "suffix" is required.
    subject/session are labels without prefix ("001", "01").
    """
    if "suffix" not in entities:
        raise ValueError(f"channel entities need a 'suffix', got {dict(entities)}")
    unknown = sorted(set(entities) - set(_ENTITY_ORDER) - {"suffix", "extension", "datatype"})
    if unknown:
        raise ValueError(f"unsupported BIDS entities {unknown}; supported: {', '.join(_ENTITY_ORDER)}")
    parts = [f"sub-{subject}", f"ses-{session}"]
    parts += [f"{k}-{entities[k]}" for k in _ENTITY_ORDER if k in entities]
    return "_".join(parts) + f"_{entities['suffix']}{extension}"


def _default_channel_map() -> dict[str, dict[str, str]]:
    from longitudinal.settings import DEFAULT_BIDS_CHANNEL_MAP

    return {k: dict(v) for k, v in DEFAULT_BIDS_CHANNEL_MAP.items()}


# ------------------------------------------------------------------------------------------------ writing
def _write_nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    import nibabel as nib

    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))


def _write_json(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def _write_patient(out: Path, patient: SynthPatient, anatomy: Anatomy, preset: SynthPreset,
                   channel_map: Mapping[str, Mapping[str, str]], seed: int, index: int) -> None:
    # A separate stream for rendering, so imaging choices never change the drawn physics.
    rng = np.random.default_rng([seed, index, 1])
    sub = patient.subject
    noise_sigma = float(rng.uniform(*preset.noise_fraction)) * white_matter_level(anatomy)
    centre_mm = (anatomy.affine @ np.array([*(np.array(anatomy.shape) - 1) / 2.0, 1.0]))[:3]
    gt_dir = out / "derivatives" / "groundtruth" / f"sub-{sub}"
    sessions_gt = []
    rows = ["session_id\tacq_time"]
    for visit in patient.visits:
        ses = visit.session
        c = np.zeros(anatomy.shape, dtype=np.float32)
        c[patient.box] = visit.density_box
        cavity = None
        if visit.cavity_box is not None:
            cavity = np.zeros(anatomy.shape, dtype=bool)
            cavity[patient.box] = visit.cavity_box
        motion = random_motion(rng, preset.rotation_deg, preset.translation_mm, centre_mm)
        clean = render_clean(anatomy, c, patient.thresholds, cavity)
        bias = bias_field(rng, anatomy, preset.bias_strength)
        anat = out / f"sub-{sub}" / f"ses-{ses}" / "anat"
        for channel in ("T1c", "FLAIR"):
            if channel not in channel_map:
                raise ValueError(f"BIDS channel map lacks channel {channel!r}: {dict(channel_map)}")
            moved = apply_motion(clean[channel], anatomy.affine, motion, order=1)
            image = rician(rng, moved * bias, noise_sigma)
            _write_nifti(anat / bids_filename(sub, ses, channel_map[channel]), to_int16(image), anatomy.affine)
        moved_c = apply_motion(c, anatomy.affine, motion, order=1)
        labels = label_map(moved_c, patient.thresholds)
        _write_nifti(
            out / "derivatives" / "labels" / f"sub-{sub}" / f"ses-{ses}" / "anat" / f"sub-{sub}_ses-{ses}_dseg.nii.gz",
            labels,
            anatomy.affine,
        )
        _write_nifti(gt_dir / f"ses-{ses}_density.nii.gz", c, anatomy.affine)
        if cavity is not None:
            _write_nifti(gt_dir / f"ses-{ses}_cavity.nii.gz", cavity.astype(np.uint8), anatomy.affine)
        rows.append(f"ses-{ses}\t{visit.acq_time.isoformat(timespec='seconds')}")
        sessions_gt.append(
            {
                "session_id": f"ses-{ses}",
                "acq_time": visit.acq_time.isoformat(timespec="seconds"),
                "days_since_baseline": visit.days,
                "days_since_onset": visit.days + patient.silent_days,
                "motion": motion.tolist(),
                "whole_volume_ml": visit.whole_ml,
                "enhancing_volume_ml": visit.core_ml,
                "total_burden_ml": visit.burden_ml,
                "cavity_ml": 0.0 if visit.cavity_box is None else float(visit.cavity_box.sum() * anatomy.voxel_ml),
            }
        )
    (out / f"sub-{sub}").mkdir(parents=True, exist_ok=True)
    (out / f"sub-{sub}" / f"sub-{sub}_sessions.tsv").write_text("\n".join(rows) + "\n")
    if patient.plan is not None:
        _write_treatments(out, patient, anatomy, gt_dir)
    t = patient.thresholds
    _write_json(
        gt_dir / "params.json",
        {
            "subject": f"sub-{sub}",
            "model": "Fisher-Kolmogorov dc/dt = div(D grad c) + rho c (1 - c), no flux out of the parenchyma",
            "d_white_mm2_per_day": patient.d_white,
            "d_grey_mm2_per_day": patient.d_white / 10.0,
            "rho_per_day": patient.rho,
            "front_speed_mm_per_day": 2.0 * math.sqrt(patient.d_white * patient.rho),
            "seed_point_mm": patient.seed_mm,
            "seed_voxel": list(patient.seed_voxel),
            "thresholds": {"flair": t.flair, "enhancing": t.enhancing, "necrosis": t.necrosis},
            "silent_period_days": patient.silent_days,
            "baseline_volume_target_ml": patient.baseline_volume_target_ml,
            "baseline_date": patient.visits[0].acq_time.date().isoformat(),
            "baseline_acq_time": patient.visits[0].acq_time.isoformat(timespec="seconds"),
            "noise_sigma": noise_sigma,
            "spacing_mm": anatomy.spacing_mm,
            "preset": preset.name,
            "cohort_seed": seed,
            "patient_index": index,
            "draw_attempts": patient.attempts,
            "treated": patient.plan is not None,
            "treatment_plan": None if patient.plan is None else patient.plan.to_dict(),
            "motion_convention": "4x4 RAS mm, p_moved = M @ p_true; header affines stay nominal",
            "labels": {"0": "background", "1": "oedema/non-enhancing", "2": "enhancing core (incl. necrosis)"},
        },
    )
    _write_json(gt_dir / "sessions.json", sessions_gt)


def _write_treatments(out: Path, patient: SynthPatient, anatomy: Anatomy, gt_dir: Path) -> None:
    """``sub-<s>/sub-<s>_treatments.tsv`` (date, treatment, end_date) and the ground truth of every event:
    ``treatments.json`` (days since the baseline scan, dates, parameters, volumes before and after) and the
    unmoved density right before and right after each event (``event-<k>_<kind>_{before,after}_density``)."""
    sub = patient.subject
    baseline = patient.visits[0].acq_time
    thr = patient.thresholds
    rows = ["date\ttreatment\tend_date"]
    truth = []
    for k, event in enumerate(patient.events, start=1):
        start = (baseline + timedelta(days=event.start_day)).date().isoformat()
        end = None if event.end_day is None else (baseline + timedelta(days=event.end_day)).date().isoformat()
        rows.append(f"{start}\t{event.kind}\t{end or 'n/a'}")
        entry: dict = {
            "kind": event.kind,
            "days_since_baseline": event.start_day,
            "end_days_since_baseline": event.end_day,
            "date": start,
            "end_date": end,
            "params": event.params,
        }
        for when, box in (("before", event.before), ("after", event.after)):
            c = np.zeros(anatomy.shape, dtype=np.float32)
            c[patient.box] = box
            name = f"event-{k:02d}_{event.kind}_{when}_density.nii.gz"
            _write_nifti(gt_dir / name, c, anatomy.affine)
            entry[f"density_{when}"] = name
            entry[f"whole_volume_{when}_ml"] = float(np.count_nonzero(box >= thr.flair) * anatomy.voxel_ml)
            entry[f"enhancing_volume_{when}_ml"] = float(np.count_nonzero(box >= thr.enhancing) * anatomy.voxel_ml)
            entry[f"total_burden_{when}_ml"] = float(box.sum(dtype=np.float64) * anatomy.voxel_ml)
        truth.append(entry)
    (out / f"sub-{sub}" / f"sub-{sub}_treatments.tsv").write_text("\n".join(rows) + "\n")
    _write_json(gt_dir / "treatments.json", truth)


def _write_dataset_files(out: Path, summary: CohortSummary, channel_map: Mapping[str, Mapping[str, str]]) -> None:
    generated_by = [{"Name": GENERATOR_NAME, "Description": f"preset={summary.preset} seed={summary.seed}"}]
    _write_json(
        out / "dataset_description.json",
        {
            "Name": "Synthetic longitudinal glioma cohort",
            "BIDSVersion": BIDS_VERSION,
            "DatasetType": "raw",
            "License": "CC0",
            "Authors": ["longitudinal synth generator"],
            "GeneratedBy": generated_by,
        },
    )
    for name, desc in (("labels", "Tumour labels in each visit's (moved) space"),
                       ("groundtruth", "Generator ground truth: parameters, motion, unmoved density, volumes")):
        _write_json(
            out / "derivatives" / name / "dataset_description.json",
            {
                "Name": desc,
                "BIDSVersion": BIDS_VERSION,
                "DatasetType": "derivative",
                "GeneratedBy": generated_by,
            },
        )
    (out / "derivatives" / "labels" / "dseg.tsv").write_text(
        "index\tname\tabbreviation\n0\tbackground\tBG\n1\toedema/non-enhancing\tED\n2\tenhancing core\tET\n"
    )
    (out / "participants.tsv").write_text(
        "participant_id\tgroup\n" + "".join(f"sub-{p.subject}\tsynthetic_glioma\n" for p in summary.patients)
    )
    _write_json(
        out / "participants.json",
        {"group": {"Description": "cohort group", "Levels": {"synthetic_glioma": "simulated glioma patient"}}},
    )
    # Inherited sidecars (top level applies to every subject and session).
    sidecars = {"T1c": {"ContrastBolusIngredient": "GADOLINIUM", "MRAcquisitionType": "3D"},
                "FLAIR": {"MRAcquisitionType": "3D"}}
    for channel, meta in sidecars.items():
        ents = channel_map[channel]
        stem = "_".join([f"{k}-{ents[k]}" for k in _ENTITY_ORDER if k in ents] + [ents["suffix"]])
        _write_json(out / f"{stem}.json", meta)
    (out / "README").write_text(
        "Synthetic longitudinal glioma cohort\n"
        "====================================\n\n"
        "Generated by `longitudinal synth` (Fisher-Kolmogorov growth on the MNI152 anatomy shipped with nilearn).\n"
        f"Preset {summary.preset}, seed {summary.seed}, {summary.n_patients} patients, {summary.n_visits} visits.\n\n"
        "Each visit has a post-contrast T1-like image (ce-gd_T1w) and a FLAIR-like image. Head motion moves the\n"
        "image content while the header affine stays the nominal MNI affine, so visits must be registered.\n"
        "derivatives/labels holds labels in each visit's space (0 background, 1 oedema, 2 enhancing core);\n"
        "derivatives/groundtruth holds the parameters, the exact motion (p_moved = M p_true, RAS mm), the\n"
        "unmoved densities and the true volumes (volumes.tsv).\n"
        "Treated subjects have sub-*/sub-*_treatments.tsv (date, treatment, end_date: surgery, radiotherapy,\n"
        "chemotherapy; not a BIDS file, hence .bidsignore); their ground truth adds treatments.json and the\n"
        "density right before and after each event.\n"
    )
    (out / ".bidsignore").write_text("*_treatments.tsv\n")
    lines = ["participant_id\tsession_id\tdays_since_baseline\twhole_volume_ml\tenhancing_volume_ml\ttotal_burden_ml"]
    for p in summary.patients:
        for s in load_ground_truth(out, p.subject)["sessions"]:
            lines.append(
                f"sub-{p.subject}\t{s['session_id']}\t{s['days_since_baseline']:.6f}\t{s['whole_volume_ml']:.4f}"
                f"\t{s['enhancing_volume_ml']:.4f}\t{s['total_burden_ml']:.4f}"
            )
    (out / "derivatives" / "groundtruth" / "volumes.tsv").write_text("\n".join(lines) + "\n")


def _prepare_out(out: Path) -> None:
    """Refuse to write into a non-empty folder that is not an earlier synth cohort; clear an earlier one."""
    if not out.exists():
        out.mkdir(parents=True)
        return
    if not out.is_dir():
        raise ValueError(f"{out} exists and is not a directory")
    if not any(out.iterdir()):
        return
    desc = out / "dataset_description.json"
    try:
        ours = any(g.get("Name") == GENERATOR_NAME for g in json.loads(desc.read_text()).get("GeneratedBy", []))
    except (OSError, ValueError, AttributeError):
        ours = False
    if not ours:
        raise ValueError(f"{out} is not empty and is not a cohort written by {GENERATOR_NAME}; refusing to write")
    for child in out.iterdir():
        if child.is_dir() and (child.name.startswith("sub-") or child.name == "derivatives"):
            shutil.rmtree(child)


# ------------------------------------------------------------------------------------------------ public
def generate_cohort(
    out: Path,
    n_patients: int,
    seed: int,
    preset: str = "default",
    progress: Callable[[int, int], None] | None = None,
    *,
    channel_map: Mapping[str, Mapping[str, str]] | None = None,
    treated_fraction: float = DEFAULT_TREATED_FRACTION,
) -> CohortSummary:
    """Write a synthetic longitudinal glioma cohort as a BIDS dataset under ``out``.

    n_patients: number of subjects (>= 1); seed: cohort seed (same seed -> same arrays); preset: "tiny" |
    "default" (see ``longitudinal.synth.config.PRESETS``). progress(done, total) is called after each patient.
    channel_map: project channel -> BIDS entities (default: ``Settings.bids_channel_map`` defaults); it names
    the files. treated_fraction: the chance (0..1) that a patient is treated (resection, radiotherapy,
    temozolomide; ``treatment.py``), drawn per patient from its own stream, so whether patient k is treated
    depends only on (seed, k, treated_fraction). An earlier synth cohort in ``out`` is replaced; any other
    non-empty folder is refused. Returns a CohortSummary (volumes in ml).
    """
    problems = []
    if not isinstance(n_patients, int) or n_patients < 1:
        problems.append(f"n_patients must be an integer >= 1, got {n_patients!r}")
    if not isinstance(seed, int) or seed < 0:
        problems.append(f"seed must be an integer >= 0, got {seed!r}")
    try:
        cfg = get_preset(preset)
    except ValueError as exc:
        problems.append(str(exc))
    cmap = {k: dict(v) for k, v in (channel_map or _default_channel_map()).items()}
    missing = [ch for ch in ("T1c", "FLAIR") if ch not in cmap]
    if missing:
        problems.append(f"channel map lacks {missing}; it has {sorted(cmap)}")
    for ch, ents in cmap.items():
        try:
            bids_filename("x", "y", ents)
        except ValueError as exc:
            problems.append(f"channel {ch}: {exc}")
    if not isinstance(treated_fraction, int | float) or not 0.0 <= treated_fraction <= 1.0:
        problems.append(f"treated_fraction must be a number in [0, 1], got {treated_fraction!r}")
    if problems:
        raise ValueError("cannot generate the synthetic cohort:\n  " + "\n  ".join(problems))

    start = time.perf_counter()
    out = Path(out)
    _prepare_out(out)
    anatomy = load_anatomy(cfg.spacing_mm)
    summary = CohortSummary(out=out, preset=cfg.name, seed=seed)
    if progress:
        progress(0, n_patients)
    for index in range(n_patients):
        patient = draw_patient(index, seed, cfg, anatomy, is_treated(seed, index, treated_fraction))
        _write_patient(out, patient, anatomy, cfg, cmap, seed, index)
        whole = [v.whole_ml for v in patient.visits]
        summary.patients.append(PatientSummary(
            subject=patient.subject, n_visits=len(patient.visits), min_whole_ml=min(whole),
            max_whole_ml=max(whole), d_white=patient.d_white, rho=patient.rho, treated=patient.plan is not None,
        ))
        if progress:
            progress(index + 1, n_patients)
    _write_dataset_files(out, summary, cmap)
    summary.seconds = time.perf_counter() - start
    return summary


def load_ground_truth(bids_root: Path, subject: str) -> dict:
    """Ground truth of one subject ("001" or "sub-001") of a synth cohort.

    Returns {"subject": "sub-001", "params": <params.json>, "sessions": [...], "treatments": [...]} where each
    session dict has session_id, acq_time, days_since_baseline (days), motion (4x4 numpy, RAS mm, p_moved = M @
    p_true), whole_volume_ml, enhancing_volume_ml, total_burden_ml, cavity_ml, density_path (Path of the
    unmoved c NIfTI) and cavity_path (Path of the unmoved resection-cavity mask, None before surgery); each treatment dict (empty list: untreated) has kind, days_since_baseline and
    end_days_since_baseline (whole days after the baseline scan), date / end_date (ISO, as in
    sub-*_treatments.tsv), params, whole/enhancing volume and total burden before and after (ml), and
    density_before_path / density_after_path (Paths of the unmoved c right before and after the event).
    """
    label = subject.removeprefix("sub-")
    gt = Path(bids_root) / "derivatives" / "groundtruth" / f"sub-{label}"
    if not gt.is_dir():
        raise FileNotFoundError(f"no ground truth for sub-{label} under {gt}")
    params = json.loads((gt / "params.json").read_text())
    sessions = json.loads((gt / "sessions.json").read_text())
    for s in sessions:
        s["motion"] = np.asarray(s["motion"], dtype=np.float64)
        s["density_path"] = gt / f"{s['session_id']}_density.nii.gz"
        cavity = gt / f"{s['session_id']}_cavity.nii.gz"
        s["cavity_path"] = cavity if cavity.is_file() else None
    treatments = json.loads((gt / "treatments.json").read_text()) if (gt / "treatments.json").is_file() else []
    for t in treatments:
        t["density_before_path"] = gt / t["density_before"]
        t["density_after_path"] = gt / t["density_after"]
    return {"subject": f"sub-{label}", "params": params, "sessions": sessions, "treatments": treatments}


def patient_summary_dict(p: PatientSummary) -> dict:
    """A PatientSummary as a plain dict (for tables and JSON)."""
    return asdict(p)
