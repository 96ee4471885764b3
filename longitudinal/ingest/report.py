"""What an ingest run reports: per-session and per-patient outcomes, the run report and quarantine lists.

Report rows and markdown carry only pseudonyms, session labels derived from shifted dates and file names: they
go to Prefect artifacts and task results.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from longitudinal.settings import Settings

Status = Literal["stored", "skipped", "quarantined"]


@dataclass
class SessionOutcome:
    """What happened to one source session. ``origin`` names it relative to the source (raw id redacted);
    ``session``/``days`` are set when it is (or already was) in the store."""

    origin: str
    status: Status
    session: str | None = None
    days: float | None = None
    registration_metric: float | None = None
    reasons: list[str] = field(default_factory=list)


@dataclass
class TreatmentOutcome:
    """What happened to one treatment row. ``origin``: its table and line ("<table> line <n>", raw id
    redacted); ``kind`` when known; ``start_days`` / ``end_days``: days since the baseline scan's calendar date
    once stored (or already stored); ``reasons`` when quarantined. Never a date."""

    origin: str
    status: Status
    kind: str | None = None
    start_days: float | None = None
    end_days: float | None = None
    reasons: list[str] = field(default_factory=list)


@dataclass
class PatientOutcome:
    """What happened to one patient. ``error``: the patient could not be processed at all (e.g. the store
    could not be written); ``report_path``: its quarantine report, when it has quarantined sessions or
    treatment rows."""

    patient_id: str
    sessions: list[SessionOutcome] = field(default_factory=list)
    wrote: bool = False
    error: str | None = None
    report_path: str | None = None
    treatments: list[TreatmentOutcome] = field(default_factory=list)

    def count(self, status: Status) -> int:
        return sum(s.status == status for s in self.sessions)

    def count_treatments(self, status: Status) -> int:
        return sum(t.status == status for t in self.treatments)


@dataclass
class IngestReport:
    """The outcome of one ingest run over a source."""

    source_kind: str
    store_url: str
    patients: list[PatientOutcome] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    report_path: str | None = None
    seconds: float = 0.0

    @property
    def stored(self) -> int:
        return sum(p.count("stored") for p in self.patients)

    @property
    def skipped(self) -> int:
        return sum(p.count("skipped") for p in self.patients)

    @property
    def quarantined(self) -> int:
        return sum(p.count("quarantined") for p in self.patients)

    @property
    def treatments_stored(self) -> int:
        return sum(p.count_treatments("stored") for p in self.patients)

    @property
    def treatments_skipped(self) -> int:
        return sum(p.count_treatments("skipped") for p in self.patients)

    @property
    def treatments_quarantined(self) -> int:
        return sum(p.count_treatments("quarantined") for p in self.patients)

    @property
    def failed_patients(self) -> list[str]:
        return [p.patient_id for p in self.patients if p.error]

    def exit_code(self) -> int:
        """0: the run completed (quarantines allowed); 1: nothing could be ingested (no session stored or
        already present); 2: some patient could not be written to the store."""
        if self.failed_patients:
            return 2
        if self.stored + self.skipped == 0:
            return 1
        return 0

    def rows(self) -> list[dict]:
        """One row per session, per treatment row (session "treatment <kind>", days = its start in days since
        the baseline scan's date) and per failed patient: the QC table."""
        rows = []
        for p in self.patients:
            if p.error:
                rows.append({"patient_id": p.patient_id, "session": "", "origin": "", "status": "failed",
                             "days": None, "registration_metric": None, "reasons": p.error})
            for s in p.sessions:
                rows.append({
                    "patient_id": p.patient_id,
                    "session": s.session or "",
                    "origin": s.origin,
                    "status": s.status,
                    "days": s.days,
                    "registration_metric": None if s.registration_metric is None else round(s.registration_metric, 4),
                    "reasons": "; ".join(s.reasons),
                })
            for t in p.treatments:
                rows.append({
                    "patient_id": p.patient_id,
                    "session": f"treatment {t.kind or '?'}",
                    "origin": t.origin,
                    "status": t.status,
                    "days": t.start_days,
                    "registration_metric": None,
                    "reasons": "; ".join(t.reasons),
                })
        return rows

    def summary(self) -> dict:
        return {
            "source_kind": self.source_kind,
            "patients": len(self.patients),
            "stored": self.stored,
            "skipped": self.skipped,
            "quarantined": self.quarantined,
            "treatments_stored": self.treatments_stored,
            "treatments_skipped": self.treatments_skipped,
            "treatments_quarantined": self.treatments_quarantined,
            "failed_patients": len(self.failed_patients),
            "problems": len(self.problems),
            "seconds": round(self.seconds, 2),
            "report": self.report_path,
        }

    def markdown(self) -> str:
        s = self.summary()
        lines = [
            "# Ingest summary",
            "",
            f"- source kind: {s['source_kind']}",
            f"- patients: {s['patients']} ({s['failed_patients']} failed)",
            f"- sessions stored: {s['stored']}, already present: {s['skipped']}, quarantined: {s['quarantined']}",
            f"- treatment events stored: {s['treatments_stored']}, already present: {s['treatments_skipped']}, "
            f"quarantined: {s['treatments_quarantined']}",
            f"- time: {s['seconds']} s",
            f"- report: {s['report']}",
        ]
        if self.problems:
            lines += ["", "## Source problems", ""] + [f"- {p}" for p in self.problems]
        bad = [r for r in self.rows() if r["status"] in ("quarantined", "failed")]
        if bad:
            lines += ["", "## Quarantined", "", "| patient | origin | reasons |", "| --- | --- | --- |"]
            lines += [f"| {r['patient_id']} | {r['origin']} | {r['reasons']} |" for r in bad]
        return "\n".join(lines) + "\n"

    def to_dict(self) -> dict:
        return {"summary": self.summary(), "problems": self.problems,
                "patients": [dataclasses.asdict(p) for p in self.patients]}


# --- per patient ------------------------------------------------------------------------------------------


def write_quarantine(settings: Settings, pid: str, quarantine: list[tuple[str, list[str]]]) -> str | None:
    """Write (or clear) the patient's quarantine report: reports/quarantine/<pid>.json. Files are named
    relative to the source, so the operator can find them."""
    path = settings.reports_path / "quarantine" / f"{pid}.json"
    if not quarantine:
        if path.exists():
            path.unlink()
        return None
    body = {
        "patient_id": pid,
        "written": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "quarantined": [{"origin": o, "reasons": r} for o, r in quarantine],
    }
    _atomic_write_json(path, body)
    return str(path)


def _atomic_write_json(path: Path, body: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        json.dump(body, fh, indent=2, default=str)
    os.replace(tmp, path)


# --- cohort ----------------------------------------------------------------------------------------------

ProgressFn = Callable[[int, int, PatientOutcome], None]


def write_report(report: IngestReport, settings: Settings) -> str:
    """Write the run's JSON report under settings.reports_path (ingest-<UTC time>.json); returns its path."""
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S%fZ")
    path = settings.reports_path / f"ingest-{stamp}.json"
    report.report_path = str(path)
    _atomic_write_json(path, report.to_dict())
    return str(path)


# --- helpers for orchestrators (flows map ingest_patient over plan().patient_ids) ---------------------------


