"""Errors of a forecast query. Each carries the CLI exit code it maps to, so the command prints the message and
exits without a traceback: 2 for a query the user must change (bad dates, days or scan arguments), 1 for
everything the query names but the system cannot provide (patient, model, store, compatible channels)."""

from __future__ import annotations


class ForecastError(ValueError):
    """Base of every expected forecast failure; ``str(exc)`` is the whole message for the user."""

    exit_code = 1


class InvalidQueryError(ForecastError):
    """The query itself is malformed: no query, non-finite days, unparseable dates, bad ``--scan`` specs."""

    exit_code = 2


class DateBeforeBaselineError(InvalidQueryError):
    """A query date or day lies on or before the patient's baseline scan (nothing to forecast from)."""


class UnknownPatientError(ForecastError):
    """The patient is not in the store; ``suggestions`` holds the closest stored ids (difflib)."""

    def __init__(self, message: str, suggestions: list[str] | None = None) -> None:
        super().__init__(message)
        self.suggestions = list(suggestions or [])


class ModelNotFoundError(ForecastError):
    """The model reference resolves to nothing (no registered model, no such alias or version, no file)."""


class ModelDataMismatchError(ForecastError):
    """The model cannot read this patient's data: channels (or voxel spacing) differ."""


class StoreUnreadableError(ForecastError):
    """The cohort store is missing, has another schema version, or cannot be read."""


class ScanInputError(InvalidQueryError):
    """Scans given as files (``--scan`` / CSV) could not be ingested (every reason listed)."""
