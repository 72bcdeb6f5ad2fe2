"""Prefect flows that run the same stage code as dvc.yaml, their deployments and preflight checks."""
