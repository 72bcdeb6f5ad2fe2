"""Model registry: log the serving pyfunc into the training run, register it, gate and move aliases.

Aliases of the registered model (``params.mlflow.registered_model``):

* ``challenger``: the most recently registered version;
* ``champion``: the version served (``models:/sem-classifier@champion``). It moves only through :func:`gate`
  (the challenger's test macro-F1 must beat the champion's by ``mlflow.promotion_margin``), :func:`promote` (by
  hand) or :func:`rollback` (back to the champion before the last move, kept in the model tag
  ``previous_champion``).

Comparing on the same test split: every version carries the ``data_version`` of the data it was trained and
tested on (copied from its run). When champion and challenger have the same one, their recorded
``test_macro_f1`` figures are compared. When they differ, both models are re-evaluated on the current test split
(``data/splits/test.csv``, the cached PNGs) through the serving path of each, and those figures are compared
(``gate_basis`` says which happened). Without the test split, the gate refuses to compare across data versions
and keeps the champion.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import importlib.util
import io
import json
import logging
import math
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

import emassist
from emassist.config.settings import Params
from emassist.data.dataset import read_split
from emassist.data.preprocess import STANDARDIZED_PARAM, Preprocessor
from emassist.model.calibration import as_temperature
from emassist.model.files import CALIBRATION_FILE, FAMILIARITY_FILE, MODEL_FILE, RUN_FILE
from emassist.model.metrics import compute_metrics
from emassist.model.provenance import training_data
from emassist.model.scale import keras_file_has_scale_input, split_scale
from emassist.model.selective import ReviewPolicy
from emassist.model.tracking import data_version, setup_mlflow

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

log = logging.getLogger(__name__)

LOGGED_MODEL_NAME = "sem_classifier"
CHAMPION = "champion"
CHALLENGER = "challenger"
PREVIOUS_CHAMPION_TAG = "previous_champion"
#: Tags copied from the training run onto the model version.
RUN_TAGS_COPIED = ("data_version", "splits_md5", "git_commit", "model")


class RegistryError(RuntimeError):
    """A registry operation cannot be done; the message says why and what to do."""


@dataclass(frozen=True)
class Decision:
    name: str
    version: str
    promoted: bool
    reason: str
    challenger_macro_f1: float | None
    champion_macro_f1: float | None
    champion_version: str | None  # the champion before the decision
    margin: float
    basis: str  # how the two figures were obtained

    @property
    def label(self) -> str:
        return "promoted" if self.promoted else "rejected"

    def as_dict(self) -> dict[str, Any]:
        return {"decision": self.label, **dataclasses.asdict(self)}

    def __str__(self) -> str:
        return f"{self.name} v{self.version}: {self.label} ({self.reason})"


# --------------------------------------------------------------------------------------------- helpers


def pyfunc_code_path() -> Path:
    """The file that is the pyfunc model's code (emassist/serve/model_code.py), found without executing it."""
    spec = importlib.util.find_spec("emassist.serve.model_code")
    if spec is None or not spec.origin:
        raise RegistryError("emassist/serve/model_code.py not found: install the package (pip install -e .)")
    return Path(spec.origin)


#: What the serving config takes from the evaluate stage's calibration file (see emassist.model.testset).
SERVED_CALIBRATION_KEYS = ("temperature", "review_threshold", "target_accuracy", "target_reached")


def serving_config(
    params: Params, calibration_file: Path | None = None, *, model_file: Path | None = None
) -> dict[str, Any]:
    """What the pyfunc needs beside the Keras model: the classes, its preprocessor's exact settings
    (:meth:`Preprocessor.config`, read back with :meth:`Preprocessor.from_config`), where its training data came
    from, whether the model takes the pixel size (``scale_input``, read from ``model_file``'s own config; false
    without one), and, when ``calibration_file`` exists, what the evaluate stage fitted on val: ``temperature``,
    ``review_threshold`` (null: every answer needs review), ``target_accuracy``, ``target_reached``. Without it the
    model is served uncalibrated (T = 1) with the legacy fixed review threshold, labelled so."""
    scale_input = model_file is not None and Path(model_file).is_file() and keras_file_has_scale_input(model_file)
    config: dict[str, Any] = {
        "classes": list(params.data.classes),
        **Preprocessor.from_params(params).config(),
        "chunk_size": 32,
        "training_data": training_data(params),
        "scale_input": bool(scale_input),
    }
    config.update(read_calibration(calibration_file))
    return config


def read_calibration(calibration_file: Path | None) -> dict[str, Any]:
    """The served keys of ``calibration_file`` (:data:`SERVED_CALIBRATION_KEYS`); ``{}`` when there is no such file.

    A file that exists but holds no positive finite temperature, or a review threshold that is not a confidence
    (or null), is an error naming the file."""
    if calibration_file is None or not Path(calibration_file).is_file():
        return {}
    try:
        saved = json.loads(Path(calibration_file).read_text(encoding="utf-8"))
        value = saved["temperature"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{calibration_file}: no valid 'temperature' ({exc})") from exc
    try:
        served = {"temperature": as_temperature(value)}
        if "review_threshold" in saved or "target_reached" in saved:
            served.update({k: saved.get(k) for k in SERVED_CALIBRATION_KEYS[1:]})
            ReviewPolicy.from_config(served)  # the one check of a review threshold
    except ValueError as exc:
        raise ValueError(f"{calibration_file}: {exc}") from exc
    return served


def model_signature(classes: Sequence[str], *, scale_input: bool = False) -> Any:
    """The served contract. ``scale_input``: the optional request column ``pixel_size_nm`` and the answer's pixel
    size columns (:data:`emassist.serve.pyfunc.SCALE_COLUMNS`)."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    # "image" is optional in the signature only so that a request without it reaches the model, which answers
    # with a short message; MLflow's own schema error would echo the whole request.
    columns = [ColSpec("string", "image", required=False)]
    if scale_input:
        columns.append(ColSpec("double", "pixel_size_nm", required=False))
    inputs = Schema(columns)
    scale_columns = [ColSpec("double", "pixel_size_nm"), ColSpec("double", "model_pixel_size_nm")]
    scale_columns.append(ColSpec("string", "pixel_size_source"))
    outputs = Schema(
        [ColSpec("string", "label"), ColSpec("double", "confidence")]
        + [ColSpec("double", c) for c in classes]
        + [ColSpec("string", "error")]
        + [ColSpec("boolean", "needs_review"), ColSpec("string", "review_reason")]
        + [ColSpec("boolean", "unfamiliar"), ColSpec("double", "unfamiliar_score")]
        + (scale_columns if scale_input else [])
    )
    # Inference parameter: images already standardized by the caller (tiles): no data-bar search, only the resize.
    params = ParamSchema([ParamSpec(STANDARDIZED_PARAM, "boolean", False)])
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)


def pip_requirements() -> list[str]:
    """Pinned requirements of the served model (the inferred list misses keras/pillow and names emassist,
    which is not on any index: it ships inside the model through ``code_paths``)."""
    reqs = []
    for dist in ("mlflow", "cloudpickle", "numpy", "pandas", "pillow", "keras"):
        reqs.append(f"{dist}=={metadata.version(dist)}")
    for dist in ("tensorflow-cpu", "tensorflow"):
        try:
            reqs.append(f"{dist}=={metadata.version(dist)}")
            break
        except metadata.PackageNotFoundError:
            continue
    return reqs


def example_image_base64(params: Params, side: int = 64) -> str:
    """A small real PNG for the input example: the first test image (downsized) when there is one."""
    from PIL import Image

    gray: np.ndarray | None = None
    test_csv = Path(params.data.splits_dir) / "test.csv"
    if test_csv.is_file():
        try:
            first = pd.read_csv(test_csv, nrows=1)["image_path"].iloc[0]
            with Image.open(first) as im:
                gray = np.asarray(im.convert("L").resize((side, side), Image.Resampling.LANCZOS))
        except Exception as exc:  # an example is a nicety: never fail registration for it
            log.debug("no test image for the input example: %s", exc)
    if gray is None:
        rng = np.random.default_rng(0)
        gray = rng.integers(0, 256, (side, side), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(gray).save(buf, format="PNG", optimize=True)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _artifacts(model_file: Path, config_file: Path) -> dict[str, str]:
    """The pyfunc's artifacts: the Keras model, the serving config, and the familiarity file the evaluate stage
    wrote beside the model (when there is one; without it the model serves no ``unfamiliar`` flag)."""
    artifacts = {"keras_model": str(model_file), "config": str(config_file)}
    familiarity = Path(model_file).parent / FAMILIARITY_FILE.name
    if familiarity.is_file():
        artifacts["familiarity"] = str(familiarity)
    return artifacts


def _package_copy(tmp: Path) -> Path:
    """A clean copy of the emassist package (no __pycache__) to ship as the model's code."""
    target = tmp / "emassist"
    shutil.copytree(Path(emassist.__file__).parent, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".*"))
    return target


def _client(params: Params | None = None) -> MlflowClient:
    import mlflow

    if params is not None:
        setup_mlflow(params)
    return mlflow.MlflowClient()


def _read_run_file(run_file: Path) -> dict[str, str]:
    if not run_file.is_file():
        raise RegistryError(f"{run_file} not found: run the train stage first (dvc repro train)")
    return json.loads(run_file.read_text())


def _float(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


# --------------------------------------------------------------------------------------------- register


def log_and_register(
    params: Params, run_id: str | None = None, *, model_file: Path = MODEL_FILE, run_file: Path = RUN_FILE
) -> ModelVersion:
    """Log the serving pyfunc into the training run and register it; the new version becomes ``challenger``.

    ``run_id`` defaults to the one in ``models/run.json``. The version gets the tags ``test_macro_f1`` (the run's
    metric, when the evaluate stage logged it), ``data_version``, ``splits_md5``, ``git_commit`` and ``model``.
    """
    import mlflow

    recorded = _read_run_file(run_file) if run_id is None else {}
    run_id = run_id or recorded.get("run_id")
    if not run_id:
        raise RegistryError(f"{run_file} has no run_id")
    if not Path(model_file).is_file():
        raise RegistryError(f"{model_file} not found: run the train stage first (dvc repro train)")
    client = _client(params)
    try:
        run = client.get_run(run_id)
    except mlflow.exceptions.MlflowException as exc:
        raise RegistryError(
            f"run {run_id} not found at {mlflow.get_tracking_uri()}"
            + (f" (models/run.json says it was tracked at {recorded['tracking_uri']})" if recorded else "")
        ) from exc
    name = params.mlflow.registered_model
    with tempfile.TemporaryDirectory(prefix="emassist-register-") as tmp:
        config_file = Path(tmp) / "serving_config.json"
        # the temperature the evaluate stage fitted for this model (calibration.json beside it), when there is one
        calibration = Path(model_file).parent / CALIBRATION_FILE.name
        config = serving_config(params, calibration, model_file=Path(model_file))
        artifacts = _artifacts(Path(model_file), config_file)
        if "familiarity" in artifacts:
            config["familiarity"] = FAMILIARITY_FILE.name  # tells an endpoint's clients the model ships the check
        config_file.write_text(json.dumps(config, indent=2))
        example = pd.DataFrame({"image": [example_image_base64(params)]})
        active = mlflow.active_run()
        same = active is not None and active.info.run_id == run_id  # e.g. called from inside the training run
        with contextlib.nullcontext() if same else mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name=LOGGED_MODEL_NAME,
                python_model=str(pyfunc_code_path()),
                artifacts=artifacts,
                code_paths=[str(_package_copy(Path(tmp)))],
                signature=model_signature(params.data.classes, scale_input=config["scale_input"]),
                input_example=example,
                pip_requirements=pip_requirements(),
                registered_model_name=name,
            )
    version = str(info.registered_model_version)
    tags: dict[str, str] = {k: str(run.data.tags[k]) for k in RUN_TAGS_COPIED if k in run.data.tags}
    f1 = _float(run.data.metrics.get("test_macro_f1"))
    if f1 is not None:
        tags["test_macro_f1"] = repr(f1)
    else:
        log.warning("run %s has no test_macro_f1 (run the evaluate stage); the gate will evaluate it", run_id)
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    client.set_registered_model_alias(name, CHALLENGER, version)
    log.info("registered %s version %s from run %s", name, version, run_id)
    return client.get_model_version(name, version)


# --------------------------------------------------------------------------------------------- aliases


def champion_version(client: MlflowClient, name: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, CHAMPION).version)
    except MlflowException:
        return None


def promote(name: str, version: str | int, *, client: MlflowClient | None = None) -> str | None:
    """Make ``version`` the champion; remember the one it replaces (model tag ``previous_champion``).

    Returns the previous champion's version (None when there was none).
    """
    client = client or _client()
    version = str(version)
    client.get_model_version(name, version)  # fails clearly on a version that does not exist
    previous = champion_version(client, name)
    if previous == version:
        return previous
    client.set_registered_model_alias(name, CHAMPION, version)
    if previous is not None:
        client.set_registered_model_tag(name, PREVIOUS_CHAMPION_TAG, previous)
    client.set_model_version_tag(name, version, "promoted_at", datetime.now(UTC).isoformat(timespec="seconds"))
    log.info("%s: champion %s → %s", name, previous, version)
    return previous


def rollback(name: str, *, client: MlflowClient | None = None) -> tuple[str | None, str]:
    """Move ``champion`` back to the previous champion; returns (from, to).

    The version rolled back from becomes the new ``previous_champion``, so a second rollback undoes the first.
    """
    from mlflow.exceptions import MlflowException

    client = client or _client()
    model = client.get_registered_model(name)
    previous = model.tags.get(PREVIOUS_CHAMPION_TAG)
    if not previous:
        raise RegistryError(
            f"{name}: no previous champion recorded (tag {PREVIOUS_CHAMPION_TAG}): nothing to roll back"
        )
    try:
        client.get_model_version(name, previous)
    except MlflowException as exc:
        raise RegistryError(f"{name}: previous champion version {previous} no longer exists") from exc
    current = champion_version(client, name)
    client.set_registered_model_alias(name, CHAMPION, previous)
    if current is not None:
        client.set_registered_model_tag(name, PREVIOUS_CHAMPION_TAG, current)
        client.set_model_version_tag(name, current, "rolled_back_at", datetime.now(UTC).isoformat(timespec="seconds"))
    log.info("%s: rolled back champion %s → %s", name, current, previous)
    return current, previous


def list_versions(name: str, *, client: MlflowClient | None = None) -> pd.DataFrame:
    """All versions, newest first: version, aliases, test_macro_f1, gate_decision, data_version, created, run_id."""
    client = client or _client()
    # Searched versions do not carry their aliases; the registered model does.
    by_version: dict[str, list[str]] = {}
    for alias, v in (client.get_registered_model(name).aliases or {}).items():
        by_version.setdefault(str(v), []).append(alias)
    rows = []
    for mv in client.search_model_versions(f"name = '{name}'"):
        tags = mv.tags or {}
        rows.append(
            {
                "version": int(mv.version),
                "aliases": ",".join(sorted(by_version.get(str(mv.version), []))),
                "test_macro_f1": _float(tags.get("test_macro_f1")),
                "gate_decision": tags.get("gate_decision", ""),
                "data_version": tags.get("data_version", ""),
                "created": pd.Timestamp(mv.creation_timestamp, unit="ms", tz="UTC"),
                "run_id": mv.run_id or "",
            }
        )
    columns = ["version", "aliases", "test_macro_f1", "gate_decision", "data_version", "created", "run_id"]
    frame = pd.DataFrame(rows, columns=columns)
    return frame.sort_values("version", ascending=False, ignore_index=True)


# --------------------------------------------------------------------------------------------- gate


def evaluate_version(
    name: str,
    version: str,
    test_csv: Path,
    classes: Sequence[str],
    *,
    client: MlflowClient | None = None,
    manifest: Path | None = None,
) -> float:
    """Macro-F1 of one registered version on a split file of cached PNGs, through that version's serving path. A
    scale-aware version gets each image's pixel size from ``manifest`` (ingest's; None: every size unknown)."""
    import mlflow

    split = read_split(Path(test_csv), classes)
    loaded = mlflow.pyfunc.load_model(f"models:/{name}/{version}")
    model = loaded.unwrap_python_model()
    if list(model.classes) != list(classes):
        raise RegistryError(f"{name} v{version} predicts classes {model.classes}, not the current {list(classes)}")
    pre: Preprocessor = model.preprocessor
    # Cached images are already standardized (data bar cropped): only the version's own cache size may differ.
    images = [pre.resize(pre.decode(path).gray) for path in split.paths]
    if getattr(model, "scale_aware", False):  # the pixel sizes ingest read for these images (its manifest)
        sized = read_split(Path(test_csv), classes, manifest=manifest) if manifest is not None else split
        proba = model.probabilities(np.stack(images), split_scale(sized, int(pre.image_size or 0)))
    else:
        proba = model.probabilities(np.stack(images))
    return float(compute_metrics(split.labels, proba, classes)["macro_f1"])


def gate(
    client: MlflowClient,
    name: str,
    version: str | int,
    margin: float = 0.0,
    *,
    test_csv: Path | None = None,
    classes: Sequence[str] | None = None,
    current_data_version: str | None = None,
    apply: bool = True,
    manifest: Path | None = None,
) -> Decision:
    """Promote ``version`` to champion only if its test macro-F1 beats the champion's by more than ``margin``.

    No champion yet → promote. Equal figures (margin 0) keep the champion. The decision and both figures are
    tags on ``version`` (``gate_decision``, ``gate_challenger_macro_f1``, ``gate_champion_macro_f1``,
    ``gate_basis``, ``gate_reason``). ``apply=False`` decides and tags without moving the alias. ``manifest``:
    ingest's, the pixel sizes a scale-aware version is re-evaluated with.
    """
    version = str(version)
    challenger = client.get_model_version(name, version)
    ch_tags = challenger.tags or {}
    ch_f1 = _float(ch_tags.get("test_macro_f1"))
    ch_dv = ch_tags.get("data_version")
    current = champion_version(client, name)
    champ_f1: float | None = None
    can_evaluate = test_csv is not None and Path(test_csv).is_file() and classes is not None

    def evaluate(v: str) -> float:
        assert test_csv is not None and classes is not None
        return evaluate_version(name, v, Path(test_csv), classes, client=client, manifest=manifest)

    if current is None:
        if ch_f1 is None and can_evaluate:
            ch_f1 = evaluate(version)
        promoted, reason, basis = True, "no champion yet", "none"
    elif current == version:
        promoted, reason, basis = True, "already the champion", "none"
        champ_f1 = ch_f1
    else:
        champ_tags = client.get_model_version(name, current).tags or {}
        champ_f1 = _float(champ_tags.get("test_macro_f1"))
        champ_dv = champ_tags.get("data_version")
        if ch_dv and ch_dv == champ_dv and ch_f1 is not None and champ_f1 is not None:
            basis = f"recorded test_macro_f1, both on data_version {ch_dv}"
        elif can_evaluate:
            # Figures from different test splits are not comparable: score both on the current one.
            tag = current_data_version or "current"
            if ch_f1 is None or ch_dv != current_data_version:
                ch_f1 = evaluate(version)
            if champ_f1 is None or champ_dv != current_data_version:
                champ_f1 = evaluate(current)
            basis = f"re-evaluated on the current test split (data_version {tag})"
        else:
            basis = f"not comparable: data_version {ch_dv} vs champion's {champ_dv}, no test split to re-evaluate"
        if "not comparable" in basis:
            promoted, reason = False, basis
        elif ch_f1 is None or champ_f1 is None:
            promoted, reason = False, "test_macro_f1 missing (run the evaluate stage before registering)"
        elif ch_f1 > champ_f1 + margin:
            promoted, reason = True, f"macro-F1 {ch_f1:.4f} beats champion v{current}'s {champ_f1:.4f} by > {margin:g}"
        else:
            promoted = False
            reason = f"macro-F1 {ch_f1:.4f} does not beat champion v{current}'s {champ_f1:.4f} by > {margin:g}"
    decision = Decision(name, version, promoted, reason, ch_f1, champ_f1, current, float(margin), basis)
    tags = {
        "gate_decision": decision.label,
        "gate_challenger_macro_f1": "none" if ch_f1 is None else repr(ch_f1),
        "gate_champion_macro_f1": "none" if champ_f1 is None else repr(champ_f1),
        "gate_champion_version": current or "none",
        "gate_margin": repr(float(margin)),
        "gate_basis": basis,
        "gate_reason": reason,
    }
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    if promoted and apply and current != version:
        promote(name, version, client=client)
    log.info("%s", decision)
    return decision


def register_and_gate(params: Params, run_id: str | None = None) -> tuple[ModelVersion, Decision]:
    """The register stage: log + register the trained model, then gate it against the champion."""
    mv = log_and_register(params, run_id)
    client = _client()
    splits = Path(params.data.splits_dir)
    decision = gate(
        client,
        params.mlflow.registered_model,
        mv.version,
        float(getattr(params.mlflow, "promotion_margin", 0.0)),
        test_csv=splits / "test.csv",
        classes=params.data.classes,
        current_data_version=data_version(splits).get("data_version"),
        manifest=Path(params.data.interim_dir) / "manifest.parquet",
    )
    return client.get_model_version(mv.name, mv.version), decision
