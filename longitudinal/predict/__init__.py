"""The one prediction path: ``Predictor.predict(series, days_since_baseline, n_samples, seed) -> Prediction``.

Evaluation, calibration, ``longitudinal forecast``, the forecast flow, the MLflow model and the run figures all
call it. Beside it: typed queries (``queries``), the result types and their JSON (``result``), the one writer of
forecast files (``output``), scans given as files (``scans``) and the forecast of one stored patient
(``patient``), which the CLI and the MLflow model share.
"""

from longitudinal.predict.predictor import (
    Prediction,
    Predictor,
    QueryPrediction,
    resolve_device,
    sample_volumes_ml,
)

__all__ = ["Prediction", "Predictor", "QueryPrediction", "resolve_device", "sample_volumes_ml"]
