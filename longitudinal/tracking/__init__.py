"""MLflow tracking: the ONLY package that imports mlflow.

Modules (import the one you need; mlflow is imported lazily by each so `import longitudinal.tracking` is cheap):

- ``uri``        tracking URI and experiment with an artifact root under the workspace (never the cwd)
- ``logger``     ``MlflowLogger``, the MetricLogger of longitudinal.training backed by one MLflow run
- ``figures``    matplotlib (Agg) figures logged as artifacts
- ``inference``  ``Forecaster``: checkpoint + native scans -> per-(patient, query day) volumes and maps
- ``pyfunc_model`` the models-from-code pyfunc file logged with every model
- ``registry``   register a version, the challenger/champion gate, ``list_versions``, ``resolve_model_ref``
- ``training``   ``run_training``: split, fit, evaluate, log, register, promote (resumable)
"""
