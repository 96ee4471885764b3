"""LUMIERE discovery: a ``Patient-*/week-*`` tree (the public LUMIERE glioblastoma cohort's layout) -> typed records.

Layout (the folder given, or its ``Imaging/`` subfolder)::

    Patient-001/week-000-1/CT1.nii.gz T1.nii.gz T2.nii.gz FLAIR.nii.gz
    Patient-001/week-000-1/DeepBraTumIA-segmentation/atlas/segmentation/seg_mask.nii.gz
    Patient-001/week-000-2/...        (post-operative scan of week 0)
    Patient-001/week-044/...

Detection (``is_lumiere``): a folder holding ``Patient-*`` folders of which one has a ``week-*`` folder, or an
``Imaging/`` folder holding them. ``Settings.source_kind = "lumiere"`` selects it explicitly.

Patients are the ``Patient-*`` folders (the folder name is the raw id, pseudonymised like any other); sessions
are their ``week-<W>`` and ``week-<W>-<N>`` folders. LUMIERE gives no dates, only weeks, so each session gets a
synthetic calendar date: ``settings.LUMIERE_ANCHOR`` (2000-01-03) plus ``7 W + N - 1`` days (``N`` = 1 without a
suffix; ``N`` must be 1..7 so that a week's scans stay inside that week): week-000-1 is day 0, week-000-2 day 1,
week-044 day 308. Ingest then date-shifts these dates like real ones and counts days from the patient's first
session, so a patient whose first folder is week 0 gets days ``7 W + N - 1``. ``week-W`` and ``week-W-1``
fall on the same day: both are refused as duplicate session dates. A treatments CSV (``--treatments``) for a
LUMIERE source is dated in the same calendar (the anchor plus days).

Channels (``Settings.lumiere_channel_map``): a file of the week folder (".nii.gz" added to a name without a
NIfTI extension; a relative path may reach into a subfolder) -> channel; default CT1 -> T1c, T1 -> T1,
T2 -> T2, FLAIR -> FLAIR. Only the channels the pipeline ingests (``settings.CHANNELS``) are read.

Segmentation (``Settings.lumiere_segmentation``, relative to the week folder; default DeepBraTumIA's
``DeepBraTumIA-segmentation/atlas/segmentation/seg_mask.nii.gz``) and its coding
(``Settings.lumiere_label_map``, source value -> stored class): DeepBraTumIA writes 1 necrosis/non-enhancing,
2 contrast-enhancing, 3 oedema; the default maps enhancing to 2 and every other tumour label to 1 (the store's
0 background, 1 oedema/non-enhancing, 2 enhancing). A value the map does not list refuses the session, naming
the file. ``SEGMENTATIONS`` names ready pairings (``longitudinal ingest --lumiere-segmentation``): the label must
share the grid of the T1c image, so DeepBraTumIA's atlas-space mask goes with its atlas-space skull-stripped
images, and HD-GLIO-AUTO's native mask (1 non-enhancing, 2 enhancing) with the native images.

A missing segmentation is not fatal (as in the other sources, the session is stored without a label); it is
named, file and problem, among the run's source problems, by pseudonym (raw ids never leave ingest).

Implied surgery: ``week-W-1`` and ``week-W-2`` are the pre- and post-operative scans of week W, so a patient
with both gets a ``surgery`` event on the post-operative scan's date (day ``7 W + 1``: the surgery lies between
the two scans, and the post-operative date is the first whole day after the pre-operative scan). It joins the
patient's treatment rows like a table row (``treatments.TreatmentRow``); an explicit surgery from the
treatments CSV dated between the two scans replaces it.
"""

from __future__ import annotations

import datetime as dt
import os
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from longitudinal.ingest.sources import LABEL_KEY, CohortSource, ScanFile, SessionSource, new_patient
from longitudinal.ingest.treatments import TreatmentRow, attach_treatments
from longitudinal.settings import (
    CHANNELS,
    DEFAULT_LUMIERE_CHANNEL_MAP,
    DEFAULT_LUMIERE_LABEL_MAP,
    DEFAULT_LUMIERE_SEGMENTATION,
    LUMIERE_ANCHOR,
    Settings,
)
from storage.schema import LABEL_VALUES

PATIENT_PREFIX = "Patient-"
IMAGING = "Imaging"
_WEEK_RE = re.compile(r"^week-(\d{1,4})(?:-(\d{1,2}))?$")
# Scans of one week take its days 0..6: an eighth would fall on the next week's first day.
MAX_SCANS_PER_WEEK = 7

# Named pairings of images, segmentation and coding (``--lumiere-segmentation NAME``); file names as in the
# public release.
_ATLAS = "DeepBraTumIA-segmentation/atlas/skull_strip"
SEGMENTATIONS: dict[str, dict[str, object]] = {
    # The defaults: week-folder images with DeepBraTumIA's atlas-space mask (one grid in the synthetic layout).
    "deepbratumia": {"lumiere_channel_map": dict(DEFAULT_LUMIERE_CHANNEL_MAP),
                     "lumiere_segmentation": DEFAULT_LUMIERE_SEGMENTATION,
                     "lumiere_label_map": dict(DEFAULT_LUMIERE_LABEL_MAP)},
    # DeepBraTumIA's atlas-space mask with its atlas-space skull-stripped images: both on the atlas grid.
    "deepbratumia-atlas": {
        "lumiere_channel_map": {f"{_ATLAS}/ct1_skull_strip": "T1c", f"{_ATLAS}/t1_skull_strip": "T1",
                                f"{_ATLAS}/t2_skull_strip": "T2", f"{_ATLAS}/flair_skull_strip": "FLAIR"},
        "lumiere_segmentation": DEFAULT_LUMIERE_SEGMENTATION,
        "lumiere_label_map": dict(DEFAULT_LUMIERE_LABEL_MAP)},
    # HD-GLIO-AUTO's mask in the native CT1 space with the native images; 1 non-enhancing, 2 enhancing.
    "hd-glio-auto": {"lumiere_channel_map": dict(DEFAULT_LUMIERE_CHANNEL_MAP),
                     "lumiere_segmentation": "HD-GLIO-AUTO-segmentation/native/segmentation_CT1_origspace.nii.gz",
                     "lumiere_label_map": {0: 0, 1: 1, 2: 2}},
}


@dataclass(frozen=True)
class WeekFolder:
    """A ``week-<W>[-<N>]`` folder: week W (weeks since LUMIERE's week 0), scan N of that week (None: no suffix)."""

    week: int
    scan: int | None

    @property
    def day(self) -> int:
        """Days after the anchor: 7 W + N - 1 (N = 1 without a suffix)."""
        return 7 * self.week + (self.scan or 1) - 1

    @property
    def date(self) -> dt.datetime:
        """The synthetic calendar date: ``LUMIERE_ANCHOR`` plus ``day`` days, at midnight."""
        return dt.datetime.combine(LUMIERE_ANCHOR, dt.time()) + dt.timedelta(days=self.day)


def parse_week(name: str) -> WeekFolder | None:
    """``week-044`` -> WeekFolder(44, None), ``week-000-2`` -> WeekFolder(0, 2); None for any other name."""
    m = _WEEK_RE.match(name)
    if m is None:
        return None
    return WeekFolder(int(m.group(1)), None if m.group(2) is None else int(m.group(2)))


def _has_patients(folder: Path) -> bool:
    try:
        patients = [p for p in folder.iterdir() if p.name.startswith(PATIENT_PREFIX) and p.is_dir()]
        return any(parse_week(w.name) is not None and w.is_dir() for p in patients for w in p.iterdir())
    except OSError:
        return False


def imaging_root(folder: str | os.PathLike) -> Path | None:
    """The folder holding the ``Patient-*`` folders: ``folder`` itself or its ``Imaging/``; None when neither."""
    path = Path(folder)
    for candidate in (path, path / IMAGING):
        if candidate.is_dir() and _has_patients(candidate):
            return candidate
    return None


def is_lumiere(folder: str | os.PathLike) -> bool:
    """True for a LUMIERE layout (module docstring): ``Patient-*/week-*`` folders here or under ``Imaging/``."""
    return imaging_root(folder) is not None


def file_name(key: str) -> str:
    """A channel map key as a file name: ".nii.gz" added unless it already ends in .nii or .nii.gz."""
    return key if key.endswith((".nii", ".nii.gz")) else key + ".nii.gz"


def _relative_problem(text: str, what: str) -> str | None:
    path = PurePosixPath(text)
    if not text.strip() or path.is_absolute() or ".." in path.parts or "\\" in text:
        return f"{what} {text!r} must be a path relative to the week folder, without '..'"
    return None


@dataclass(frozen=True)
class LumiereLayout:
    """What to read in a week folder. channels: file (``file_name``) -> channel; segmentation: the label's path
    relative to the week folder; labels: source label value -> stored class (``storage.schema.LABEL_VALUES``)."""

    channels: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_LUMIERE_CHANNEL_MAP))
    segmentation: str = DEFAULT_LUMIERE_SEGMENTATION
    labels: dict[int, int] = field(default_factory=lambda: dict(DEFAULT_LUMIERE_LABEL_MAP))

    @classmethod
    def of(cls, settings: Settings) -> LumiereLayout:
        return cls(dict(settings.lumiere_channel_map), settings.lumiere_segmentation,
                   {int(k): int(v) for k, v in settings.lumiere_label_map.items()})

    def problems(self) -> list[str]:
        """Every reason this layout cannot be read (empty when it can), naming the setting."""
        out = []
        for key, channel in self.channels.items():
            why = _relative_problem(key, "LONGITUDINAL_LUMIERE_CHANNEL_MAP file")
            if why:
                out.append(why)
            if not str(channel).strip():
                out.append(f"LONGITUDINAL_LUMIERE_CHANNEL_MAP maps {key!r} to an empty channel")
        missing = [c for c in CHANNELS if c not in self.channels.values()]
        if missing:
            out.append(f"LONGITUDINAL_LUMIERE_CHANNEL_MAP names no file for channel(s) {missing} "
                       f"(ingest reads {list(CHANNELS)})")
        why = _relative_problem(self.segmentation, "LONGITUDINAL_LUMIERE_SEGMENTATION")
        if why:
            out.append(why)
        bad = {k: v for k, v in self.labels.items() if k < 0 or v not in LABEL_VALUES}
        if bad:
            out.append(f"LONGITUDINAL_LUMIERE_LABEL_MAP {bad}: values must be >= 0 and map to a stored class "
                       f"{sorted(LABEL_VALUES)}")
        return out


def segmentation_settings(value: str) -> dict[str, object]:
    """Settings updates for ``--lumiere-segmentation``: a name of ``SEGMENTATIONS`` (images, mask and coding), or
    a mask path relative to the week folder (the images and the coding stay as configured)."""
    if value in SEGMENTATIONS:
        return {k: (dict(v) if isinstance(v, dict) else v) for k, v in SEGMENTATIONS[value].items()}
    why = _relative_problem(value, "--lumiere-segmentation")
    if why:
        raise ValueError(f"{why}, or one of {', '.join(SEGMENTATIONS)}")
    return {"lumiere_segmentation": value}


def discover_lumiere(root: Path, settings: Settings, treatments: str | os.PathLike | None = None) -> CohortSource:
    """Every ``Patient-*`` folder under ``root`` (or ``root/Imaging``) and its week folders (no voxels read),
    with the treatments CSV (``treatments.attach_treatments``) and the implied surgeries. Raises ValueError
    naming every problem of an invalid layout configuration."""
    layout = LumiereLayout.of(settings)
    problems = layout.problems()
    if problems:
        raise ValueError("invalid LUMIERE configuration:\n  " + "\n  ".join(problems))
    base = imaging_root(root) or root
    cohort = CohortSource(kind="lumiere", root=base, patients=[])
    if base == root and not is_lumiere(root):
        cohort.problems.append(f"no {PATIENT_PREFIX}*/week-* folders in {root.name} or its {IMAGING}/ folder")
    implied: dict[str, list[tuple[TreatmentRow, dt.date, dt.date]]] = {}
    try:
        folders = sorted(p for p in base.iterdir() if p.name.startswith(PATIENT_PREFIX) and p.is_dir())
    except OSError as exc:
        cohort.problems.append(f"unreadable source folder {base.name} ({type(exc).__name__})")
        folders = []
    for patient_dir in folders:
        patient = new_patient(patient_dir.name, settings)
        weeks: dict[str, tuple[WeekFolder, Path]] = {}
        try:
            children: list[Path] | None = sorted(p for p in patient_dir.iterdir() if p.is_dir())
        except OSError as exc:  # one unreadable patient folder must not stop the others
            patient.problems.append(f"unreadable folder {patient_dir.name} ({type(exc).__name__})")
            children = None
        for week_dir in children or []:
            parsed = parse_week(week_dir.name)
            if parsed is not None:
                weeks[week_dir.name] = (parsed, week_dir)
            elif week_dir.name.startswith("week"):
                # The folder name is not a raw id; the patient is named by pseudonym.
                cohort.problems.append(f"unrecognised folder {patient.patient_id}/{week_dir.name} (not "
                                       "week-<W> or week-<W>-<N>): ignored")
        for week, week_dir in sorted(weeks.values(), key=lambda wd: (wd[0].day, wd[1].name)):
            patient.sessions.append(_session(base, week, week_dir, layout, cohort, patient.patient_id))
        if not weeks and children is not None:
            patient.problems.append(f"no week-* folders in {patient_dir.name}")
        implied[patient.raw_id] = _surgeries(patient_dir.name, {w: n for n, (w, _) in weeks.items()})
        cohort.patients.append(patient)
    attach_treatments(cohort, settings, treatments)
    for patient in cohort.patients:
        for row, pre, post in implied.get(patient.raw_id, []):
            # A surgery the treatments CSV dates between the two scans is the same one, known more precisely.
            if not any(t.kind == "surgery" and pre <= t.start <= post for t in patient.treatments):
                patient.treatments.append(row)
    return cohort


def _session(base: Path, week: WeekFolder, week_dir: Path, layout: LumiereLayout, cohort: CohortSource,
             patient_id: str) -> SessionSource:
    """One week folder: its synthetic date, the channels the pipeline reads and the segmentation."""
    origin = week_dir.relative_to(base).as_posix()
    session = SessionSource(origin=origin, date=week.date)
    if week.scan is not None and not 1 <= week.scan <= MAX_SCANS_PER_WEEK:
        session.problems.append(f"unsupported week folder {origin}: scan number {week.scan} must be 1 to "
                                f"{MAX_SCANS_PER_WEEK} (scan N of week W is dated day 7 W + N - 1)")
        session.date = None
    candidates: dict[str, list[Path]] = {}
    for key, channel in layout.channels.items():
        if channel in CHANNELS:
            candidates.setdefault(channel, []).append(week_dir / file_name(key))
    for channel, paths in candidates.items():
        present = [p for p in paths if os.path.lexists(p)]
        if len(present) > 1:
            names = ", ".join(p.relative_to(base).as_posix() for p in present)
            session.problems.append(f"ambiguous channel {channel}: several files match ({names})")
            continue
        # A missing file is kept: validation names it ("missing file: Patient-.../CT1.nii.gz").
        path = present[0] if present else paths[0]
        session.scans[channel] = ScanFile(channel, "nifti", (path,), path.relative_to(base).as_posix())
    label = week_dir / layout.segmentation
    if os.path.lexists(label):
        session.label = ScanFile(LABEL_KEY, "nifti", (label,), label.relative_to(base).as_posix(),
                                 values=tuple(sorted(layout.labels.items())))
    else:
        cohort.problems.append(f"missing segmentation: {patient_id}/{week_dir.name}/{layout.segmentation} does "
                               "not exist; the session is ingested without a label")
    return session


def _surgeries(raw_id: str, weeks: dict[WeekFolder, str]) -> list[tuple[TreatmentRow, dt.date, dt.date]]:
    """The surgery implied by each week's pre-/post-operative pair (``week-W-1`` and ``week-W-2``): the event
    on the post-operative date, with the (pre, post) dates an explicit surgery would fall between."""
    out = []
    for week in sorted({w.week for w in weeks}):
        pre, post = WeekFolder(week, 1), WeekFolder(week, 2)
        if pre in weeks and post in weeks:
            origin = f"{raw_id}/{weeks[pre]} and {weeks[post]} (implied surgery)"
            out.append((TreatmentRow("surgery", post.date.date(), None, origin), pre.date.date(), post.date.date()))
    return out
