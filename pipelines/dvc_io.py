"""DVC from the flows: record what a stage produced (as ``dvc repro`` would), push inputs, pull them elsewhere.

The flows run the stage code themselves (tasks with retries and logs), so after each stage they do the bookkeeping
that ``dvc repro`` does after running a stage: ``dvc commit`` records the outputs in dvc.lock and the cache. The
remote is whatever .dvc/config names (S3 in production, a local folder in tests).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

#: Stages whose outputs a training needs: cached images (ingest), the splits, the augmented training list.
TRAIN_INPUT_STAGES = ("ingest", "split", "augment")


class DvcError(RuntimeError):
    """A DVC command failed; the message carries its output."""


def dvc(*args: str, cwd: Path | None = None, timeout: float = 3600) -> str:
    cmd = [sys.executable, "-m", "dvc", *args]
    try:
        done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise DvcError(f"`dvc {' '.join(args)}` did not finish in {timeout:.0f} s") from exc
    if done.returncode != 0:
        out = (done.stdout + done.stderr).strip()[-2000:]
        raise DvcError(f"`dvc {' '.join(args)}` failed (exit {done.returncode}): {out}")
    return done.stdout


def can_record(params_path: Path) -> bool:
    """dvc.lock records params.yaml's values: only a run from that very file may write it."""
    return Path("dvc.yaml").is_file() and params_path.resolve() == Path("params.yaml").resolve()


def record(stages: Sequence[str]) -> str:
    return dvc("commit", "--force", *stages)


def push(stages: Sequence[str] = TRAIN_INPUT_STAGES) -> str:
    return dvc("push", *stages)


def pull(stages: Sequence[str] = TRAIN_INPUT_STAGES) -> str:
    return dvc("pull", "--force", *stages)
