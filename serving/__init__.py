"""Serving: the MLflow pyfunc model (sem_pyfunc.py, logged from code), an HTTP client and a Dockerfile."""
