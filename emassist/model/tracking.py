"""MLflow helpers: tracking setup, run tags (git commit, data version) and flat params."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from emassist.config.settings import Params

log = logging.getLogger(__name__)
ARTIFACT_DIR = Path("mlartifacts")


def setup_mlflow(params: Params) -> str:
    """Point MLflow at the tracking URI (env ``MLFLOW_TRACKING_URI`` wins) and select the experiment."""
    import mlflow

    logging.getLogger("alembic").setLevel(logging.WARNING)
    uri = params.mlflow.resolved_tracking_uri()
    mlflow.set_tracking_uri(uri)
    name = params.mlflow.experiment
    if mlflow.get_experiment_by_name(name) is None:
        # A local store keeps artifacts beside the database; a server decides for itself.
        location = ARTIFACT_DIR.resolve().as_uri() if uri.startswith(("sqlite:", "file:")) else None
        mlflow.create_experiment(name, artifact_location=location)
    mlflow.set_experiment(name)
    return uri


def flat_params(params: Params, sections: tuple[str, ...] = ("data", "ingest", "split", "augment", "train")) -> dict:
    out: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping):
            for k, v in value.items():
                walk(f"{prefix}.{k}", v)
        elif isinstance(value, list | tuple) and prefix.endswith("classes"):
            out[prefix] = ",".join(map(str, value))
        else:
            out[prefix] = value

    for section in sections:
        walk(section, dataclasses.asdict(getattr(params, section)))
    return out


def git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{sha}{'-dirty' if dirty else ''}"


def data_version(splits_dir: Path, lock_file: Path = Path("dvc.lock")) -> dict[str, str]:
    """The DVC hash of the splits folder (from dvc.lock) and our own hash of the split files' bytes."""
    tags: dict[str, str] = {}
    if lock_file.is_file():
        lock = yaml.safe_load(lock_file.read_text()) or {}
        for out in (lock.get("stages", {}).get("split", {}) or {}).get("outs", []) or []:
            if Path(out.get("path", "")) == splits_dir:
                tags["data_version"] = str(out.get("md5", ""))
    digest = hashlib.md5(usedforsecurity=False)
    for name in ("train.csv", "val.csv", "test.csv"):
        path = splits_dir / name
        if path.is_file():
            digest.update(name.encode())
            digest.update(path.read_bytes())
    tags["splits_md5"] = digest.hexdigest()
    tags.setdefault("data_version", tags["splits_md5"])
    return tags


def run_tags(params: Params) -> dict[str, str]:
    tags = {"git_commit": git_commit(), "model": params.train.model, "data_source": params.data.source}
    tags.update(data_version(Path(params.data.splits_dir)))
    if os.environ.get("PREFECT__FLOW_RUN_ID"):
        tags["prefect_flow_run_id"] = os.environ["PREFECT__FLOW_RUN_ID"]
    return tags
