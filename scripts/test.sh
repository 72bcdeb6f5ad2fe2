#!/usr/bin/env bash
# Set up and run the checks: ruff, then the whole pytest suite (real servers are started by the tests).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The browser tests drive Debian's chromium through Playwright (`playwright install` cannot download here).
if [ ! -x /usr/bin/chromium ]; then
    if [ "$(id -u)" -eq 0 ]; then
        echo "==> installing chromium (apt) for the browser tests"
        export DEBIAN_FRONTEND=noninteractive
        apt-get -o DPkg::Lock::Timeout=300 update -qq >/dev/null
        apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends chromium >/dev/null
    else
        echo "warning: /usr/bin/chromium is missing and this is not root: the browser tests will be skipped" >&2
    fi
fi
export PATH="$PWD/.venv/bin:$PATH" TF_CPP_MIN_LOG_LEVEL=2
echo "==> ruff"
ruff check .
ruff format --check .
# Two pytest-xdist workers (most of the time is single-threaded start-up of real server processes, so two overlap
# well on two cores); whole files per worker (--dist loadfile keeps a file's module fixtures on one worker), in
# tests/conftest.py's HEAVY_FIRST order (xdist would otherwise hand out the files with the most tests first).
# EMASSIST_TEST_WORKERS=0 (or a later `-n 0` / `-p no:xdist` among the arguments) runs in this process, in order.
workers=${EMASSIST_TEST_WORKERS:-2}
xdist=(-n "$workers" --dist loadfile --no-loadscope-reorder)
for arg in "$@"; do
    if [ "$arg" = "no:xdist" ] || [ "$arg" = "-pno:xdist" ]; then xdist=() workers=0; fi
done
echo "==> pytest (${workers} xdist workers)"
set +e
pytest "${xdist[@]}" --durations=25 "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
    echo "error: pytest collected no tests (exit 5): check the test paths and -k/-m filters" >&2
    exit 1
fi
exit "$status"
