#!/usr/bin/env bash
# Set up and run the checks: ruff, then the whole pytest suite (real servers are started by the tests).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH" TF_CPP_MIN_LOG_LEVEL=2
echo "==> ruff"
ruff check .
ruff format --check .
echo "==> pytest"
set +e
pytest "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
    echo "error: pytest collected no tests (exit 5): check the test paths and -k/-m filters" >&2
    exit 1
fi
exit "$status"
