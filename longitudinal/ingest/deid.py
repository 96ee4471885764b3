"""De-identification at the first boundary: keyed pseudonyms and per-patient date shifts.

Raw patient ids (BIDS subject labels, manifest ids, DICOM PatientID) never leave ``longitudinal.ingest``:
everything downstream (store, index, reports' patient keys, Prefect parameters, artifacts) only sees
``pseudonym(raw_id)``. Calendar dates are turned into days since the patient's baseline; the only calendar date
kept is shifted by a keyed per-patient offset, so intervals are exact but the real dates are not recoverable
without the key.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import re

PSEUDONYM_PREFIX = "p-"
PSEUDONYM_HEX = 12
# Shift into the past by 1 to 10 years: wide enough that a shifted date does not reveal the season or the year.
_SHIFT_MIN_DAYS = 365
_SHIFT_SPAN_DAYS = 3285

_PSEUDONYM_RE = re.compile(rf"^{PSEUDONYM_PREFIX}[0-9a-f]{{{PSEUDONYM_HEX}}}$")


def _digest(secret: bytes, purpose: str, raw_id: str) -> bytes:
    # The purpose prefix keeps the pseudonym and the date shift independent even under the same key.
    return hmac.new(secret, f"{purpose}\x00{raw_id}".encode(), hashlib.sha256).digest()


def pseudonym(raw_id: str, secret: bytes) -> str:
    """Keyed pseudonym of a raw patient id: ``"p-" + 12 hex chars`` of HMAC-SHA256(secret, id)."""
    return PSEUDONYM_PREFIX + _digest(secret, "patient", raw_id).hex()[:PSEUDONYM_HEX]


def is_pseudonym(text: str) -> bool:
    """True when ``text`` has the exact form of a pseudonym (and so is safe as a path component)."""
    return bool(_PSEUDONYM_RE.match(text))


def date_shift_days(raw_id: str, secret: bytes) -> int:
    """Per-patient keyed date shift in days (negative: shifted dates lie 1-10 years in the past)."""
    value = int.from_bytes(_digest(secret, "date-shift", raw_id)[:8], "big")
    return -(_SHIFT_MIN_DAYS + value % _SHIFT_SPAN_DAYS)


def shift_date(date: dt.datetime, raw_id: str, secret: bytes) -> dt.datetime:
    """The date and time as kept in the store: ``date + date_shift_days(raw_id)`` days (intervals exact)."""
    return date + dt.timedelta(days=date_shift_days(raw_id, secret))


def session_label(shifted: dt.date | dt.datetime) -> str:
    """Session label stored in the index, derived from the shifted date (never the source's own label,
    which may carry a real date)."""
    return f"ses-{shifted:%Y%m%d}"


def hostile_id_problems(raw_id: str) -> list[str]:
    """Why a raw patient id is refused (empty when acceptable). The id itself is never echoed."""
    problems = []
    if not raw_id.strip():
        problems.append("empty patient id")
    if "/" in raw_id or "\\" in raw_id:
        problems.append("patient id contains a path separator")
    if ".." in raw_id:
        problems.append("patient id contains '..'")
    if any(ord(c) < 32 or ord(c) == 127 for c in raw_id):
        problems.append("patient id contains control characters")
    return problems


def redact(text: str, raw_id: str, patient_id: str) -> str:
    """Replace the raw id in ``text`` by its pseudonym wherever it stands as a whole token (not inside a longer
    run of letters/digits, so a raw id "1" does not rewrite every digit), for artifacts and task results."""
    if not raw_id or not raw_id.strip():
        return text
    return re.sub(rf"(?<![A-Za-z0-9]){re.escape(raw_id)}(?![A-Za-z0-9])", lambda _: patient_id, text)


_ABS_PATH_RE = re.compile(r"(?<![\w.])/(?:[^\s/:;,()'\"]+/)+([^\s/:;,()'\"]+)")


def public_text(text: str, raw_id: str, patient_id: str) -> str:
    """Text fit for task results, artifacts and printed tables: the raw id redacted and absolute paths cut to
    ``.../<file name>`` (folders above a source can name a person or a site). Operator reports keep the full
    relative names instead."""
    return _ABS_PATH_RE.sub(lambda m: f".../{m.group(1)}", redact(text, raw_id, patient_id))
