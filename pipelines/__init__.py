"""Prefect flows that run the same stage code as dvc.yaml (issue 5: not built yet)."""
