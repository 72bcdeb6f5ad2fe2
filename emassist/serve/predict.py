"""Batch prediction over files, folders and globs with a registered (or local) model; never crashes on a bad file.

Every answered file can be appended to the prediction log (``log_writer``: source ``cli``, origin = the path read,
sha256 of the file's bytes, size/format/SEM metadata from the decode; see :mod:`emassist.serve.predlog_hooks`).

The images take the serving model's own path (``emassist/serve/pyfunc.py``: its
:class:`~emassist.data.preprocess.Preprocessor`, then the model), so a CSV written here agrees with what the HTTP
server answers for the same files.
"""

from __future__ import annotations

import glob
import json
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from emassist.config.settings import Params
from emassist.data.hashing import file_sha256
from emassist.data.predlog import LogWriter
from emassist.model.files import CALIBRATION_FILE, FAMILIARITY_FILE
from emassist.model.provenance import describe_training_data
from emassist.model.registry import serving_config
from emassist.model.scale import scale_batch
from emassist.model.selective import ReviewPolicy
from emassist.serve.client import ServingError, predict_in_batches
from emassist.serve.predlog_hooks import ImageFacts, ModelIdentity, prediction_row
from emassist.serve.pyfunc import TRUST_COLUMNS, SemClassifier

log = logging.getLogger(__name__)

GLOB_CHARS = frozenset("*?[")
#: Where the serving config lies inside a logged pyfunc model's folder (its ``config`` artifact).
MODEL_CONFIG_PATH = Path("artifacts") / "serving_config.json"


def expand_paths(items: Iterable[str | os.PathLike[str]]) -> tuple[list[str], list[tuple[str, str]]]:
    """Files named by ``items`` (files; folders, recursively; globs, ``**`` allowed), in order, without repeats.

    Returns (files, missing) where missing holds (item, reason) for items that matched nothing.
    Hidden files and folders (a name starting with ".") inside a folder are skipped.
    """
    files: list[str] = []
    seen: set[str] = set()
    missing: list[tuple[str, str]] = []

    def add(path: Path) -> None:
        key = str(path)
        if key not in seen:
            seen.add(key)
            files.append(key)

    def walk(folder: Path) -> None:
        for root, dirs, names in os.walk(folder):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(names):
                if not name.startswith("."):
                    add(Path(root) / name)

    for item in items:
        text = os.fspath(item)
        path = Path(text)
        if path.is_dir():
            walk(path)
        elif path.exists():
            add(path)
        elif GLOB_CHARS & set(text):
            matches = sorted(glob.glob(text, recursive=True))
            if not matches:
                missing.append((text, "no file matches this pattern"))
            for match in matches:
                m = Path(match)
                if m.is_dir():
                    walk(m)
                elif m.is_file():
                    add(m)
        else:
            missing.append((text, "not found"))
    return files, missing


def load_predictor(model: Any, params: Params | None = None) -> Any:
    """A ``SemClassifier`` (or a generic pyfunc model) from a ``models:/`` URI, a model folder, a ``.keras`` file or
    an already loaded model. A ``.keras`` file needs ``params`` for the classes and preprocessing settings."""
    if not isinstance(model, str | os.PathLike):
        return _unwrap(model)
    text = os.fspath(model)
    if text.endswith(".keras") and Path(text).is_file():
        if params is None:
            raise ValueError(f"{text}: a .keras file needs params (classes, image sizes) to be served")
        # a temperature fitted for this model (calibration.json beside it, as models/ has it) calibrates it
        folder = Path(text).parent  # the evaluate stage's calibration and familiarity files sit beside the model
        familiarity = folder / FAMILIARITY_FILE.name
        config = serving_config(params, folder / CALIBRATION_FILE.name, model_file=Path(text))
        return SemClassifier.from_files(text, config, familiarity if familiarity.is_file() else None)
    import mlflow

    return _unwrap(mlflow.pyfunc.load_model(text))


def load_model(model: Any, params: Params | None = None) -> tuple[Any, dict[str, Any] | None]:
    """(the predictor :func:`load_predictor` returns, the serving config shipped with it; None when unknown).

    A ``models:/`` URI or a model folder: its ``serving_config.json`` artifact (a URI is downloaded once and loaded
    from that copy, so both come from the same version even while an alias moves). A ``.keras`` file: the config
    built from ``params``. A loaded model: the config it keeps, if any."""
    if isinstance(model, str | os.PathLike):
        text = os.fspath(model)
        if text.endswith(".keras") and Path(text).is_file():
            predictor = load_predictor(text, params)
            built = serving_config(params, model_file=Path(text)) if params is not None else None  # (None refused)
            return predictor, _kept_config(predictor) or built
        import mlflow  # lazy: importing MLflow takes seconds

        local = text if Path(text).is_dir() else mlflow.artifacts.download_artifacts(artifact_uri=text)
        predictor = load_predictor(local, params)
        return predictor, _read_config(Path(local) / MODEL_CONFIG_PATH) or _kept_config(predictor)
    predictor = load_predictor(model, params)
    return predictor, _kept_config(predictor)


def _kept_config(predictor: Any) -> dict[str, Any] | None:
    """The serving config a loaded model keeps (``config``, else ``training_data`` alone); None when neither."""
    config = getattr(predictor, "config", None)
    if isinstance(config, dict):
        return config
    if hasattr(predictor, "training_data"):
        return {"training_data": predictor.training_data}
    return None


def _read_config(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def training_data_lines(config: dict[str, Any] | None) -> list[str]:
    """What to tell a user before a model's answers: the line naming its training data, then the notice when it was
    trained on synthetic demo images. A model registered before provenance was shipped: "not recorded"."""
    line, notice = describe_training_data(config or {})
    lines = [line] + ([f"NOTICE: {notice}"] if notice else [])
    if config is not None:
        text = ReviewPolicy.served(config).describe()
        lines.append(text[0].upper() + text[1:])
        if "temperature" not in config:
            lines.append("uncalibrated: this model was registered without a temperature (confidences as trained)")
    return lines


def _unwrap(model: Any) -> Any:
    inner = model.unwrap_python_model() if hasattr(model, "unwrap_python_model") else model
    if hasattr(inner, "standardize_many") and hasattr(inner, "probabilities"):
        return inner
    return model


def _error_row(path: str, error: str) -> dict[str, Any]:
    return {"path": path, "label": "", "confidence": 0.0, "error": error}


def predict_paths(
    paths: Sequence[str | os.PathLike[str]],
    model: Any,
    *,
    params: Any = None,
    out: str | os.PathLike[str] | None = None,
    batch_size: int = 32,
    progress: bool | None = None,
    log_writer: LogWriter | None = None,
    model_identity: ModelIdentity | None = None,
) -> pd.DataFrame:
    """Predict every file under ``paths``; one row per file: path, label, confidence, <class>..., error.

    ``model`` is a URI (``models:/sem-classifier@champion``), a model folder, a ``.keras`` file (with ``params``)
    or a loaded model. Files that cannot be read or decoded get a row with ``error`` set and an empty label.
    ``progress``: a tqdm bar on stderr (None: only when stderr is a terminal). Writes ``out`` (CSV) if given.
    ``log_writer``: each answered file is queued to the prediction log as ``model_identity`` (the caller closes
    the writer).
    """
    from tqdm import tqdm

    files, missing = expand_paths(paths)
    predictor = load_predictor(model, params)
    rows: list[pd.DataFrame] = [pd.DataFrame([_error_row(p, reason) for p, reason in missing])] if missing else []
    bar = tqdm(total=len(files), unit="img", disable=None if progress is None else not progress, desc="predict")
    try:
        for start in range(0, len(files), batch_size):
            chunk = files[start : start + batch_size]
            rows.append(_predict_chunk(predictor, chunk, log_writer, model_identity or ModelIdentity()))
            bar.update(len(chunk))
    finally:
        bar.close()
    frame = pd.concat([r for r in rows if not r.empty], ignore_index=True) if rows else pd.DataFrame()
    if frame.empty:
        frame = pd.DataFrame(columns=["path", "label", "confidence", "error"])
    frame["error"] = frame["error"].fillna("").astype(str)
    frame["label"] = frame["label"].fillna("").astype(str)
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        frame.to_csv(out, index=False)
    return frame


def _predict_chunk(
    predictor: Any, chunk: Sequence[str], log_writer: LogWriter | None, identity: ModelIdentity
) -> pd.DataFrame:
    facts: list[ImageFacts | None] | None = None
    if hasattr(predictor, "prepare_many"):
        frame, facts = _predict_chunk_native(predictor, chunk, details=log_writer is not None)
        checked = getattr(predictor, "familiarity", None) is not None
    else:
        frame = _predict_chunk_pyfunc(predictor, chunk)
        checked = "unfamiliar" in frame.columns
    if log_writer is not None:
        log_frame(log_writer, frame, facts, identity, familiarity_checked=checked)
    return frame


def _predict_chunk_native(
    model: Any, chunk: Sequence[str], *, details: bool = False
) -> tuple[pd.DataFrame, list[ImageFacts | None]]:
    errors: list[str] = []
    images: list[np.ndarray] = []
    good: list[int] = []
    facts: list[ImageFacts | None] = []
    prepared = model.prepare_many(list(chunk), files=True, details=details)
    for i, p in enumerate(prepared):
        errors.append(p.error)
        facts.append(p.facts)
        if p.image is not None:
            images.append(p.image)
            good.append(i)
    proba = np.zeros((len(chunk), len(model.classes)), dtype=np.float32)
    unfamiliar = np.zeros(len(chunk))
    scales = [p.scale for p in prepared]
    if images and getattr(model, "scale_aware", False):
        proba[good], unfamiliar[good] = model.score(np.stack(images), scale_batch([scales[i] for i in good]))
    elif images:
        proba[good], unfamiliar[good] = model.score(np.stack(images))
    frame = model.result_frame(proba, errors, unfamiliar, scales)
    frame.insert(0, "path", list(chunk))
    return frame, facts


def log_frame(
    writer: LogWriter,
    frame: pd.DataFrame,
    facts: Sequence[ImageFacts | None] | None,
    identity: ModelIdentity,
    *,
    familiarity_checked: bool,
) -> int:
    """Queue one ``cli`` row per answered file of a prediction frame (origin: its path); returns how many.

    ``facts``: per row, from the decode; None (a generic pyfunc model) logs the file's sha256 alone."""
    classes = class_columns(frame)
    queued = 0
    for i, row in enumerate(frame.to_dict("records")):
        if row.get("error") or not row.get("label"):
            continue
        path = str(row["path"])
        f = facts[i] if facts is not None else None
        if f is None:
            f = ImageFacts(file_sha256(path))
        checked = familiarity_checked and "unfamiliar" in row
        writer.record(
            prediction_row(
                "cli", f, identity,
                label=str(row["label"]),
                confidence=float(row["confidence"]),
                probabilities={c: float(row[c]) for c in classes},
                needs_review=bool(row.get("needs_review", False)),
                unfamiliar=bool(row["unfamiliar"]) if checked else None,
                unfamiliar_score=float(row["unfamiliar_score"]) if checked else None,
                origin=path,
            )
        )  # fmt: skip
        queued += 1
    return queued


def _predict_chunk_pyfunc(model: Any, chunk: Sequence[str]) -> pd.DataFrame:
    """Any pyfunc model taking the ``image`` column, in-process, through the scoring client's batching."""
    from mlflow.exceptions import MlflowException

    def send(images_b64: list[str]) -> pd.DataFrame:
        try:
            return pd.DataFrame(model.predict(pd.DataFrame({"image": images_b64})))
        except MlflowException as exc:  # in-process: every refusal is this batch's own, never a dead server
            raise ServingError(400, exc.message) from exc

    return predict_in_batches(chunk, send, batch_size=max(1, len(chunk)))


def top_k(frame: pd.DataFrame, classes: Sequence[str], k: int = 3) -> list[str]:
    """One line per row: ``path: A 0.91, B 0.05, C 0.02`` (or ``path: ERROR reason``)."""
    present = [c for c in classes if c in frame.columns]
    lines = []
    for _, row in frame.iterrows():
        if row.get("error"):
            lines.append(f"{row['path']}: ERROR {row['error']}")
            continue
        scores = sorted(((float(row[c]), c) for c in present), reverse=True)[: max(1, k)]
        check = f"  [check: {row['review_reason']}]" if bool(row.get("needs_review", False)) else ""
        lines.append(f"{row['path']}: " + ", ".join(f"{c} {p:.3f}" for p, c in scores) + check)
    return lines


def class_columns(frame: pd.DataFrame) -> list[str]:
    """The per-class probability columns of a prediction frame (between ``confidence`` and ``error``)."""
    skip = {"path", "label", "confidence", "error", *TRUST_COLUMNS}
    return [c for c in frame.columns if c not in skip]
