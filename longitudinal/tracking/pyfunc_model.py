"""The pyfunc model, logged as code (MLflow models-from-code): this file is copied into every logged model.

A consumer needs only ``mlflow.pyfunc.load_model("models:/tumor-growth-forecaster@champion")`` and this
package installed. Artifacts: ``weights`` (the model checkpoint) and ``config`` (JSON). Input, params and output:
``longitudinal.tracking.served`` (the same forecast as ``longitudinal forecast --scan``: real ingest, the one
Predictor, the one writer).
"""

from __future__ import annotations

import warnings

import mlflow
from mlflow.pyfunc import PythonModel

# No type hints on the hooks: MLflow 3 reads predict's hints as a signature and warns about ``Any``; the model's
# signature is logged explicitly instead, so MLflow's advice to add hints (printed as this class is defined, when
# the model is logged and when it is loaded) does not apply. MLflow sets its own warning filter around that check,
# so the warnings are recorded and all others passed on.
with warnings.catch_warnings(record=True) as _caught:
    warnings.simplefilter("always")

    class TumourGrowthForecaster(PythonModel):
        """Ingests the scans itself (as ingest does), then forecasts volumes and, with ``out_dir``, writes maps."""

        def load_context(self, context):  # noqa: ANN001
            from longitudinal.tracking.served import ServedForecaster

            self.forecaster = ServedForecaster(context.artifacts["weights"])

        def predict(self, context, model_input, params=None):  # noqa: ANN001
            return self.forecaster.predict(model_input, params)

for _w in _caught:
    if "Add type hints to the `predict` method" not in str(_w.message):
        warnings.warn_explicit(_w.message, _w.category, _w.filename, _w.lineno)


mlflow.models.set_model(TumourGrowthForecaster())
