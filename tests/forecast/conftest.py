"""Fixtures of the forecast tests: quiet offline env and one ingested synthetic cohort with a registered champion."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from forecasthelpers import (
    ENV_QUIET,
    KEY,
    Cohort,
    baseline_checkpoint,
    register_champion,
    write_manifest,
    write_native_patient,
)

from longitudinal.settings import Settings

_CLEARED = ("MLFLOW_TRACKING_URI", "LONGITUDINAL_HOME", "LONGITUDINAL_STORE", "LONGITUDINAL_PSEUDONYM_KEY",
            "LONGITUDINAL_FORECASTS_DIR", "LONGITUDINAL_MLFLOW_TRACKING_URI")


@contextmanager
def _quiet() -> Iterator[None]:
    """Offline, quiet env; afterwards also drop the MLFLOW_TRACKING_URI that mlflow.set_tracking_uri exports, so
    no later test of the session inherits this folder's registry."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    with pytest.MonkeyPatch.context() as mp:
        for k, v in ENV_QUIET.items():
            mp.setenv(k, v)
        for k in _CLEARED:
            mp.delenv(k, raising=False)
        try:
            yield
        finally:
            if before is None:
                os.environ.pop("MLFLOW_TRACKING_URI", None)


@pytest.fixture(autouse=True)
def quiet_env() -> Iterator[None]:
    with _quiet():
        yield


@pytest.fixture(scope="session")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Cohort:
    with _quiet():
        return _build_cohort(tmp_path_factory.mktemp("forecast-cohort"))


def _build_cohort(root: Path) -> Cohort:
    from longitudinal.ingest import ingest_cohort
    from longitudinal.ingest.deid import pseudonym

    # Explicit URI: mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI, which Settings would otherwise prefer
    # over the home's default for every later Settings of this process.
    settings = Settings(home=root / "home", pseudonym_key=KEY,
                        mlflow_tracking_uri=f"sqlite:///{root / 'home' / 'mlflow.db'}")
    p1 = write_native_patient(root / "raw", "sub-01", ["2024-01-10", "2024-04-19", "2024-08-07"], [5.0, 6.5, 8.0],
                              [(0.0, 0.0, 0.0), (4.0, 0.0, 0.0), (-3.0, 2.0, 0.0)])
    p2 = write_native_patient(root / "raw", "sub-02", ["2023-05-02", "2023-09-30"], [4.0, 5.0],
                              [(0.0, 0.0, 0.0), (2.0, 0.0, 0.0)], flip_last=False)
    manifest = write_manifest(root / "raw" / "manifest.csv", [p1, p2])
    store = str(root / "cohort.zarr")
    report = ingest_cohort(manifest, store, settings)
    assert (report.stored, report.quarantined) == (5, 0), report.to_dict()
    ckpt = baseline_checkpoint(root / "linear.pt")
    version = register_champion(settings, ckpt)
    pids = {p.raw_id: pseudonym(p.raw_id, KEY.encode()) for p in (p1, p2)}
    return Cohort(root, settings, store, {"sub-01": p1, "sub-02": p2}, pids, ckpt, version)
