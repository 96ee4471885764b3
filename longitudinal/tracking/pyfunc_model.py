"""The pyfunc model, logged as code (MLflow models-from-code): this file is copied into every logged model.

A consumer needs only ``mlflow.pyfunc.load_model("models:/tumor-growth-forecaster@champion")`` and this
package installed. Artifacts: ``weights`` (checkpoint, loaded with ``torch.load(weights_only=True)``) and
``config`` (JSON). Input: DataFrame, one row per prior scan: ``patient_id``, ``days`` since that patient's first
row, one column per channel (``T1c``, ``FLAIR``) holding a path/URI of the RAW native scan, optional ``label``.
Params: ``query_days`` (list of days since the first row), ``n_samples``, optional ``out_dir``.
Output: one row per (patient_id, query day), see ``longitudinal.tracking.inference.output_columns``.
"""

from __future__ import annotations

import mlflow
from mlflow.pyfunc import PythonModel


class TumourGrowthForecaster(PythonModel):
    """Registers the scans itself (as ingest does), then forecasts volumes and, with ``out_dir``, maps."""

    # No type hints on the hooks: MLflow 3 reads predict's hints as a signature and warns about ``Any``.
    def load_context(self, context):  # noqa: ANN001
        from longitudinal.tracking.inference import Forecaster

        self.forecaster = Forecaster(context.artifacts["weights"])

    def predict(self, context, model_input, params=None):  # noqa: ANN001
        params = dict(params or {})
        query_days = params.get("query_days") or [90.0]
        out_dir = params.get("out_dir") or None
        return self.forecaster.predict(
            model_input,
            query_days=[float(q) for q in query_days],
            n_samples=int(params.get("n_samples") or 8),
            out_dir=out_dir,
            seed=int(params.get("seed") or 0),
        )


mlflow.models.set_model(TumourGrowthForecaster())
