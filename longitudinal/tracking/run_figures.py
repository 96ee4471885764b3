"""The figures logged with every tracked run (skill per horizon, a forecast montage, volume trajectories), drawn
from forecasts of the one Predictor (``longitudinal.predict.patient.trajectory``)."""

from __future__ import annotations

import logging
from typing import Any

from longitudinal.data.context import PatientSeries
from longitudinal.predict import Predictor
from longitudinal.predict.patient import trajectory
from longitudinal.tracking import figures
from longitudinal.tracking.logger import MlflowLogger

log = logging.getLogger(__name__)


def log_run_figures(logger: MlflowLogger, predictor: Predictor, store_url: str, patient_ids: list[str],
                 rows: list[dict[str, Any]], n_samples: int = 8, max_patients: int = 2) -> None:
    """Skill per horizon (from ``rows``), a forecast montage and volume trajectories for a few patients.

    A figure that cannot be drawn is recorded as the tag ``figures.error``: it never costs the trained model.
    """
    try:
        from storage.store import CohortStore

        store = CohortStore.open(store_url)
        logger.log_figure(figures.skill_per_horizon(rows), "skill_vs_lci.png")
        trajs = []
        for i, pid in enumerate(patient_ids[:max_patients]):
            tr, montage = _patient_forecast(predictor, PatientSeries(store.arrays(pid)), n_samples)
            if tr is None:
                continue
            trajs.append(tr)
            if i == 0:
                logger.log_figure(figures.forecast_montage(*montage, title=f"{pid}: day {tr['target_day']:g}"),
                                  "forecast_montage.png")
        if trajs:
            logger.log_figure(figures.volume_trajectories(trajs), "volume_trajectories.png")
    except Exception as exc:  # noqa: BLE001 -- figures are secondary; record and go on
        log.warning("figures failed: %s", exc)
        logger.set_tags({"figures.error": f"{type(exc).__name__}: {exc}"[:500]})


def _patient_forecast(predictor: Predictor, series: PatientSeries, n_samples: int
                      ) -> tuple[dict[str, Any] | None, tuple]:
    """The volume trajectory and forecast montage of one stored patient (``predict.patient.trajectory``)."""
    tr = trajectory(predictor, series, n_samples)
    if tr is None:
        return None, ()
    data = {"patient_id": tr.patient_id, "observed_days": tr.observed_days, "observed_ml": tr.observed_ml,
            "query_days": tr.query_days, "target_day": tr.target_day,
            **{k: [getattr(iv, k) for iv in tr.intervals] for k in ("median", "lo80", "hi80", "lo95", "hi95")}}
    return data, (tr.context_image, tr.truth_image, tr.forecast_image, tr.forecast_prob)
