"""`python -m pipelines.flows` with no setup: Prefect's temporary local server, MLflow on SQLite, training in-process.

Run alone: ``pytest -m prefect``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import copy_repo
from tests.system.test_prefect_orchestration import TINY, prefect_params

pytestmark = [pytest.mark.slow, pytest.mark.prefect]


def test_local_run_needs_no_server(tmp_path: Path) -> None:
    remote = tmp_path / "dvc-remote"
    params = prefect_params(train={**TINY["train"], "work_pool": None})
    repo = copy_repo(tmp_path / "repo", params=params, dvc_remote=remote, site_cache=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "EMASSIST_FAULTS"))}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}", TF_CPP_MIN_LOG_LEVEL="2")  # fmt: skip
    done = subprocess.run([sys.executable, "-m", "pipelines.flows"], cwd=repo, env=env, capture_output=True,
                          text=True, timeout=900)  # fmt: skip
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-5000:]
    assert "Starting temporary server" in out
    for step in ("preflight", "acquire-or-pull", "ingest", "validate", "split", "augment", "train", "evaluate",
                 "register", "dvc-commit"):  # fmt: skip
        assert f"Task run '{step}-" in out, step
    registry = json.loads((repo / "reports/registry.json").read_text())
    assert registry["version"] == "1" and registry["decision"] == "promoted"
    assert sorted(registry["aliases"]) == ["challenger", "champion"]
    metrics = json.loads((repo / "reports/metrics.json").read_text())
    assert 0 <= metrics["macro_f1"] <= 1
    # The flow did DVC's bookkeeping as `dvc repro` would: nothing is left to rebuild.
    status = subprocess.run([sys.executable, "-m", "dvc", "status"], cwd=repo, env=env, capture_output=True, text=True)
    assert "Data and pipelines are up to date" in status.stdout, status.stdout + status.stderr
    assert yaml.safe_load((repo / "dvc.lock").read_text())["stages"]["register"]
