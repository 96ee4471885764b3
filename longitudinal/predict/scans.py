"""Patients who are in no store: scans given as NIfTI files with dates, ingested exactly as ingest does it.

Forms (dates are real calendar dates, ``YYYY-MM-DD`` or ``YYYY-MM-DDTHH:MM:SS``):

- ``--scan DATE:CHANNEL=PATH``, repeated; CHANNEL is a project channel (``T1c``, ``FLAIR``) or ``label`` for a
  segmentation (0 background, 1 oedema/non-enhancing, 2 enhancing) on that session's grid;
- a CSV with columns ``date, channel, path`` and optional ``label_path`` (an ingest manifest; a
  ``patient_id`` column, if present, must name one patient). Relative paths are relative to the CSV.

The scans go through ``longitudinal.ingest.ingest_cohort`` into a temporary store (de-identification,
validation, RAS reorientation, resampling to the model's spacing, rigid registration to the baseline, QC);
any quarantined session fails the query with every reason.
"""

from __future__ import annotations

import csv
import re
import tempfile
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from longitudinal.predict.errors import ScanInputError
from longitudinal.settings import Settings

LABEL = "label"
_SPEC = re.compile(r"^(?P<date>[^=]+?):(?P<channel>[A-Za-z0-9_]+)=(?P<path>.+)$")


@dataclass(frozen=True)
class ScanInput:
    """One file of one visit: date text (real calendar), channel (or ``label``) and a path."""

    date: str
    channel: str
    path: Path

    @classmethod
    def parse(cls, spec: str) -> ScanInput:
        """``DATE:CHANNEL=PATH`` -> ScanInput; raises ScanInputError naming the expected form."""
        m = _SPEC.match(spec.strip())
        if not m:
            raise ScanInputError(f"--scan {spec!r}: expected DATE:CHANNEL=PATH, e.g. 2024-03-01:T1c=/data/t1c.nii.gz")
        return cls(m.group("date").strip(), m.group("channel"), Path(m.group("path").strip()).expanduser())


def parse_scans(specs: Sequence[str | ScanInput] = (), csv_path: str | Path | None = None) -> list[ScanInput]:
    """Every ``--scan`` spec and every CSV row as ScanInputs; one ScanInputError lists every problem."""
    problems: list[str] = []
    out: list[ScanInput] = []
    for spec in specs:
        if isinstance(spec, ScanInput):
            out.append(spec)
            continue
        try:
            out.append(ScanInput.parse(spec))
        except ScanInputError as exc:
            problems.append(str(exc))
    if csv_path is not None:
        out.extend(_read_csv(Path(csv_path), problems))
    if problems:
        raise ScanInputError("bad scan input: " + "; ".join(problems))
    return out


def _read_csv(path: Path, problems: list[str]) -> list[ScanInput]:
    try:
        with path.open(newline="") as fh:
            reader = csv.DictReader(fh)
            cols = list(reader.fieldnames or [])
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        problems.append(f"{path}: unreadable CSV ({type(exc).__name__})")
        return []
    missing = [c for c in ("date", "channel", "path") if c not in cols]
    if missing:
        problems.append(f"{path.name}: missing columns {missing} (need date, channel, path[, label_path])")
        return []
    if "patient_id" in cols and len({(r.get("patient_id") or "").strip() for r in rows}) > 1:
        problems.append(f"{path.name}: holds several patients; give one patient's scans")
    out = []
    for row in rows:
        p = Path((row.get("path") or "").strip())
        out.append(ScanInput((row.get("date") or "").strip(), (row.get("channel") or "").strip(),
                             p if p.is_absolute() else path.parent / p))
        label = (row.get("label_path") or "").strip()
        if label:
            lp = Path(label)
            out.append(ScanInput(out[-1].date, LABEL, lp if lp.is_absolute() else path.parent / lp))
    return out


def write_manifest(raw_id: str, scans: Sequence[ScanInput], dest: Path) -> Path:
    """An ingest manifest (``patient_id, date, channel, path, label_path``) of one patient's scans."""
    by_date: dict[str, dict[str, Path]] = defaultdict(dict)
    problems = []
    for s in scans:
        if s.channel in by_date[s.date]:
            problems.append(f"{s.date}: {s.channel} given twice")
        by_date[s.date][s.channel] = s.path.expanduser().resolve()
    if problems:
        raise ScanInputError("bad scan input: " + "; ".join(problems))
    with dest.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["patient_id", "date", "channel", "path", "label_path"])
        for date, files in by_date.items():
            label = files.get(LABEL)
            for channel, path in files.items():
                if channel != LABEL:
                    w.writerow([raw_id, date, channel, str(path), str(label) if label else ""])
            if label and len(files) == 1:
                problems.append(f"{date}: a label but no image")
    if problems:
        raise ScanInputError("bad scan input: " + "; ".join(problems))
    return dest


@contextmanager
def ingested(raw_id: str, scans: Sequence[ScanInput], settings: Settings, channels: Sequence[str],
             spacing_mm: float) -> Iterator[tuple[str, str]]:
    """Ingest one patient's scans into a temporary store; yields (store URL, pseudonym). The store and the
    ingest report are deleted on exit. Raises ScanInputError listing every quarantined session's reasons."""
    from longitudinal.ingest import IngestConfig, ingest_cohort

    with tempfile.TemporaryDirectory(prefix="forecast-scans-") as tmp:
        root = Path(tmp)
        manifest = write_manifest(raw_id, scans, root / "scans.csv")
        local = settings.model_copy(update={"reports_dir": root / "reports", "target_spacing_mm": float(spacing_mm)})
        reg = "T1c" if "T1c" in channels else channels[0]
        config = IngestConfig(channels=tuple(channels), registration_channel=reg)
        report = ingest_cohort(manifest, str(root / "cohort.zarr"), local, config=config)
        problems = list(report.problems)
        for p in report.patients:
            if p.error:
                problems.append(p.error)
            problems += [f"{s.origin}: {'; '.join(s.reasons)}" for s in p.sessions if s.status == "quarantined"]
        stored = [p for p in report.patients if p.wrote]
        if problems or len(stored) != 1:
            raise ScanInputError("the given scans could not be ingested: " + ("; ".join(problems) or "nothing stored"))
        yield str(root / "cohort.zarr"), stored[0].patient_id
