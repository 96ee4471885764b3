"""Cohort store: schema v2 (with treatment events; v1 read-only until migrated), atomic per-patient writes, index,
readers. No torch, prefect or mlflow."""
