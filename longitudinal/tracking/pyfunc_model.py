"""The pyfunc model, logged as code (MLflow models-from-code): this file is copied into every logged model.

A consumer needs only ``mlflow.pyfunc.load_model("models:/tumor-growth-forecaster@champion")`` and this
package installed. Artifacts: ``weights`` (the model checkpoint) and ``config`` (JSON). Input, params and output:
``longitudinal.tracking.served`` (the same forecast as ``longitudinal forecast --scan``: real ingest, the one
Predictor, the one writer).
"""

from __future__ import annotations

import mlflow
from mlflow.pyfunc import PythonModel


class TumourGrowthForecaster(PythonModel):
    """Ingests the scans itself (as ingest does), then forecasts volumes and, with ``out_dir``, writes maps."""

    # No type hints on the hooks: MLflow 3 reads predict's hints as a signature and warns about ``Any``.
    def load_context(self, context):  # noqa: ANN001
        from longitudinal.tracking.served import ServedForecaster

        self.forecaster = ServedForecaster(context.artifacts["weights"])

    def predict(self, context, model_input, params=None):  # noqa: ANN001
        return self.forecaster.predict(model_input, params)


mlflow.models.set_model(TumourGrowthForecaster())
