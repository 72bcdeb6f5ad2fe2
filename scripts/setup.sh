#!/usr/bin/env bash
# Create .venv (Python 3.11) and install the project exactly as locked in requirements.lock.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
    echo "error: Python 3.11 is required (found $("$PYTHON" --version 2>&1)); set PYTHON=/path/to/python3.11" >&2
    exit 1
fi
if [ ! -x .venv/bin/python ]; then
    echo "==> creating .venv with $PYTHON"
    "$PYTHON" -m venv .venv
fi
if [ ! -x .venv/bin/uv ]; then
    .venv/bin/python -m pip install --quiet --disable-pip-version-check "uv==0.13.9"
fi
echo "==> installing locked dependencies (requirements.lock)"
.venv/bin/uv pip sync --quiet --compile-bytecode --python .venv/bin/python requirements.lock
.venv/bin/uv pip install --quiet --python .venv/bin/python --no-deps -e .
# Data-bar text (magnification, scale-bar label) is read with Tesseract (tesserocr, in the lock) and the English model
# of Debian's tesseract-ocr; without it ingest still runs and says once that bar text is not read (pixel sizes then
# come from TIFF tags only, and the OCR tests skip).
if [ ! -f /usr/share/tesseract-ocr/5/tessdata/eng.traineddata ] && [ -z "${TESSDATA_PREFIX:-}" ]; then
    if [ "$(id -u)" -eq 0 ]; then
        echo "==> installing tesseract-ocr (apt) for the data-bar OCR"
        export DEBIAN_FRONTEND=noninteractive
        apt-get -o DPkg::Lock::Timeout=300 update -qq >/dev/null
        apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends tesseract-ocr >/dev/null
    else
        echo "warning: Tesseract's English model is missing and this is not root: data-bar OCR is off (apt install tesseract-ocr)" >&2
    fi
fi
