"""Cohort store: schema v1, atomic per-patient writes, index, readers. No torch, prefect or mlflow."""
