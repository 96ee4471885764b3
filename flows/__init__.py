"""Prefect flows: the only importer of prefect. Thin orchestration over library calls."""
