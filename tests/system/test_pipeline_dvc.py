"""`dvc repro` end to end in a fresh copy of the repository, on tiny demo data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml

from tests.helpers import copy_repo

pytestmark = pytest.mark.slow

TINY = {
    "demo": {"n_images": 120, "width": 96, "height": 96, "min_per_class": 8},
    "ingest": {"cache_size": 48},
    "validate": {"min_per_class": 5},
    "augment": {"target_per_class": 8},
    "train": {"model": "compact_cnn", "image_size": 32, "epochs": 2, "batch_size": 16},
}


@pytest.fixture(scope="module")
def repo_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = copy_repo(tmp_path_factory.mktemp("repo"), overrides=TINY)
    site = root.parent / f"{root.name}-dvc-site"  # outside the clone: its git status stays the user's
    site.mkdir(parents=True, exist_ok=True)
    done = _dvc(root, "config", "--local", "core.site_cache_dir", str(site))  # once: .dvc/config.local keeps it
    assert done.returncode == 0, done.stderr
    return root


def _dvc(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           **{f"GIT_{who}_{what}": value for who in ("AUTHOR", "COMMITTER")
              for what, value in (("NAME", "t"), ("EMAIL", "t@t"))}}  # `dvc exp run` commits  # fmt: skip
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, env=env, capture_output=True, text=True,
                          timeout=900)  # fmt: skip


def test_repro_builds_everything_then_does_nothing(repo_copy: Path) -> None:
    first = _dvc(repo_copy, "repro")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    for stage in ("acquire", "ingest", "validate", "split", "augment", "train", "evaluate"):
        assert f"Running stage '{stage}'" in first.stdout, stage
    manifest = pd.read_parquet(repo_copy / "data/interim/manifest.parquet")
    rejected = pd.read_csv(repo_copy / "data/interim/rejected.csv")
    raw_files = [p for p in (repo_copy / "data/raw").rglob("*") if p.is_file()]
    assert len(manifest) + len(rejected) == len(raw_files) == 120
    splits = {s: pd.read_csv(repo_copy / f"data/splits/{s}.csv") for s in ("train", "val", "test")}
    assert sum(len(f) for f in splits.values()) == manifest["sha256"].nunique()
    metrics = json.loads((repo_copy / "reports/metrics.json").read_text())
    assert 0 <= metrics["macro_f1"] <= 1 and metrics["n"] == len(splits["test"])
    # calibration: T fitted on val, ECE/NLL on test before and after, the reliability plot and its dvc plots data
    calibration = json.loads((repo_copy / "models/calibration.json").read_text())
    assert calibration["temperature"] > 0 and calibration["n_val"] == len(splits["val"])
    assert {"ece_before", "ece_after", "nll_before", "nll_after"} <= set(metrics)
    assert metrics["ece_after"] == calibration["ece_after"]
    for name in ("reliability.csv", "reliability_diagram.png", "risk_coverage.csv", "risk_coverage.png"):
        assert (repo_copy / "reports/plots" / name).is_file(), name
    # abstention on val, reported on test; the familiarity file shipped beside the model
    assert {"review_threshold", "coverage", "selective_accuracy", "unfamiliar_share"} <= set(metrics)
    assert metrics["review_threshold"] == calibration["review_threshold"]
    assert (repo_copy / "models/familiarity.npz").is_file()
    # a model card per registered version, with the version's real figures
    card = (repo_copy / "reports/model_card.md").read_text()
    assert card.startswith("# Model card: sem-classifier v1"), card[:200]
    assert f"{metrics['macro_f1']:.4f}" in card and "not meant for real micrographs" in card
    assert (repo_copy / "models/model.keras").is_file()
    assert json.loads((repo_copy / "reports/split.json").read_text())  # the split counts: a report ...
    shown = _dvc(repo_copy, "metrics", "show")
    assert shown.returncode == 0 and "macro_f1" in shown.stdout, shown.stdout + shown.stderr
    assert "split.json" not in shown.stdout, shown.stdout  # ... not a metric: `dvc metrics show` has the headline
    # What a clone must not commit is ignored by git; dvc.lock, the record of this pipeline state, is not.
    untracked = subprocess.run(["git", "status", "--porcelain"], cwd=repo_copy, capture_output=True, text=True,
                               check=True).stdout  # fmt: skip
    paths = {line[3:] for line in untracked.splitlines()}
    assert "dvc.lock" in paths, untracked
    assert not [p for p in paths if p.startswith(("models", "reports", "mlflow.db", "mlartifacts"))], untracked

    second = _dvc(repo_copy, "repro")
    assert second.returncode == 0, second.stderr[-2000:]
    assert "Running stage" not in second.stdout, second.stdout


def _experiment_metrics(shown: Any) -> dict[str, dict[str, Any]]:
    """``{rev or name: reports/metrics.json's figures}`` of every row of ``dvc exp show --json`` that has them."""
    found: dict[str, dict[str, Any]] = {}
    if isinstance(shown, dict):
        data = shown.get("data")
        figures = (
            (data or {}).get("metrics", {}).get("reports/metrics.json", {}).get("data")
            if isinstance(data, dict)
            else None
        )
        if figures:
            found[str(shown.get("name") or shown.get("rev"))] = figures
        for value in shown.values():
            found.update(_experiment_metrics(value))
    elif isinstance(shown, list):
        for value in shown:
            found.update(_experiment_metrics(value))
    return found


def test_an_experiment_reruns_only_train_evaluate_register_and_keeps_its_figures(repo_copy: Path) -> None:
    """`dvc exp run -S train.epochs=1`: only the stages downstream of the param run, and `dvc exp show` has the
    experiment's own figures (the metrics file is cached, so the experiment's commit holds it through dvc.lock)."""
    if not (repo_copy / "models/model.keras").is_file():
        pytest.skip("needs the first repro")
    run = _dvc(repo_copy, "exp", "run", "-S", "train.epochs=1")
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    ran = {line.split("'")[1] for line in run.stdout.splitlines() if line.startswith("Running stage")}
    assert ran == {"train", "evaluate", "register"}, run.stdout
    assert yaml.safe_load((repo_copy / "params.yaml").read_text())["train"]["epochs"] == 1
    shown = _dvc(repo_copy, "exp", "show", "--json")
    assert shown.returncode == 0, shown.stderr[-2000:]
    figures = _experiment_metrics(json.loads(shown.stdout))
    workspace = json.loads((repo_copy / "reports/metrics.json").read_text())
    committed = {name: f for name, f in figures.items() if name != "workspace"}
    assert [f["macro_f1"] for f in committed.values()] == [workspace["macro_f1"]], (figures, shown.stdout[-2000:])


def test_bad_param_stops_repro_naming_the_key(repo_copy: Path) -> None:
    params = yaml.safe_load((repo_copy / "params.yaml").read_text())
    params["split"]["train"] = -0.5
    (repo_copy / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run = _dvc(repo_copy, "repro", "split")
    assert run.returncode != 0
    assert "split.train" in run.stdout + run.stderr
