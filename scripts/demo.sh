#!/usr/bin/env bash
# Main job on the embedded default: set up, generate demo SEM data and `dvc repro` the whole pipeline.
# No S3, no servers, no GPU; MLflow uses a local SQLite store.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH" TF_CPP_MIN_LOG_LEVEL=2
dvc repro "$@"
dvc metrics show reports/metrics.json
