"""System tests: real servers (MLflow, mlflow models serve, Prefect, moto S3, Chromium) and the DVC pipeline."""
