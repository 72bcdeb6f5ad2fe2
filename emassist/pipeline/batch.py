"""``emassist batch``: archive-scale classification on Apache Spark with the registered model (issue 17).

The job, in order (see docs/batch.md):

1. **Model first, before Spark** (:func:`resolve_model`): the model URI (default ``models:/<name>@champion``) is
   downloaded once on the driver and its serving config read. A URI that does not exist fails here, in a second,
   with one clear line: no JVM was started for it.
2. **Listing** (:func:`list_source`) with Spark's ``binaryFile`` source (``recursiveFileLookup``,
   ``pathGlobFilter`` = ``batch.glob``). A local SRC is walked on the driver first without following folder
   symlinks (Hadoop's local listing follows them: a ``loop -> .`` link would list every file again at each level);
   Spark gets the symlink-free subtrees as folders and the other files one by one, so each file is listed once. A
   listing that matches nothing fails here, before anything is written (a re-run with a wrong ``--glob`` keeps the
   previous results). Files over ``batch.max_file_bytes`` get an error row from their listed length; Spark never
   reads them (the ``length`` filter is pushed into the scan). Files the scan does not return get an error row after
   the answers are written (:func:`missing_rows`): zero-byte files (Spark drops them silently), and files removed or
   unreadable between the listing and the read (``ignoreMissingFiles`` / ``ignoreCorruptFiles`` on this read only:
   such a file costs its row an error, never the job).
3. **Pre-check** (a pandas UDF, no TensorFlow): each file goes through the model's own
   :class:`~emassist.data.preprocess.Preprocessor` (from the model's serving config) exactly as the pyfunc's
   ``prepare`` does; a file it refuses gets that reason. The pyfunc answers a batch of only bad images with an
   exception (HTTP 400 on the server), which in Spark would fail the task: so a refused file is replaced by a tiny
   valid image before scoring and its answer is overwritten by the error row afterwards. No Arrow batch the model
   sees can be all bad, whatever ``maxRecordsPerBatch`` / ``maxBytesPerBatch`` cut.
4. **Scoring** with ``mlflow.pyfunc.spark_udf(spark, <the downloaded model>, env_manager="local",
   result_type=<the pyfunc's output columns>)``: the SAME pyfunc ``mlflow models serve`` runs, fed base64 file
   bytes in its ``image`` column. On a cluster MLflow ships the model as an archive and its ``SparkModelCache``
   keeps the loaded model per Python worker process; ``spark.python.worker.reuse`` (set true) keeps those processes
   across tasks: one load per executor Python process. In local mode MLflow skips that cache and loads the model
   once per task (``mlflow/pyfunc/__init__.py``: ``should_use_spark_to_broadcast_file`` is false for a local master),
   so the job packs small files into large tasks (``batch.files_per_task``).
5. **Output** under OUT: ``predictions/`` (Parquet; one row per file), ``summary.csv`` (per class) and
   ``batch.json`` (the run: model, training data notice, counts). A re-run replaces them (written beside, then
   swapped in), so rows are never duplicated. The prediction log gets each answer once per (image sha256, model
   version): a re-run logs only images not logged for that model version before (:func:`log_rows`).

A scale-aware model (``scale_input`` in its serving config, :mod:`emassist.model.scale`) reads each file's own pixel
size (its tags, else its data bar) in the pyfunc, and the Parquet gets three more columns before the model's name:
``pixel_size_nm`` (of the file; null when unknown), ``model_pixel_size_nm`` (of the model input) and
``pixel_size_source`` (``tags | databar_scalebar | databar_mag | unknown``; empty for a file that got no answer).
Older models write the columns they always wrote.

``s3://`` sources are mirrored to a local folder first (:mod:`emassist.pipeline.batch_s3`): the pyspark wheel
ships no ``hadoop-aws`` jars; ``s3a://`` goes straight to Spark where those jars are supplied.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

import pandas as pd

from emassist.config.settings import Params
from emassist.core.atomic import atomic_open
from emassist.data.hashing import sha256_of
from emassist.data.predlog import LogWriter, PredictionLog
from emassist.model.provenance import describe_training_data
from emassist.pipeline.batch_udf import precheck_udf, sentinel_png
from emassist.serve.predict import MODEL_CONFIG_PATH, training_data_lines
from emassist.serve.predlog_hooks import ImageFacts, ModelIdentity, open_writer, prediction_row
from emassist.serve.pyfunc import ERROR_COLUMN, SCALE_COLUMNS, TRUST_COLUMNS

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

    from emassist.pipeline.batch_s3 import Mirror

CHAMPION_URI = "models:/{name}@champion"
PREDICTIONS_DIR = "predictions"
SUMMARY_FILE = "summary.csv"
MANIFEST_FILE = "batch.json"
REJECTED_REVIEW_REASON = "image rejected"  # what the pyfunc's result_frame says for a bad row
ERROR_LABEL = "(error)"  # the summary's row for files that got no answer
APP_NAME = "emassist-batch"
EMPTY_SHA256 = sha256_of(b"")
LOG_SOURCE = "batch"  # the prediction log's source for these rows
MISSING_REASON = "missing or unreadable when read"  # listed, then not returned by the read (removed, no permission)
LOG_CHUNK = 1000  # rows looked up in the prediction log and written per round (at most monitoring.max_pending)
LIST_ATTEMPTS = 3  # a path removed between the driver's walk and Spark's listing: walk again
_GLOB_CHARS = re.compile(r"([\\{}\[\]*?])")  # what Hadoop's glob would read in a path Spark is given
#: Only the binaryFile read skips files that vanish or cannot be read (each then gets an error row); the job's own
#: Parquet reads keep Spark's defaults, so a damaged result file fails loudly instead of losing rows.
READ_OPTIONS = {"recursiveFileLookup": "true", "ignoreMissingFiles": "true", "ignoreCorruptFiles": "true"}
# Files per input task when they are small (``batch.files_per_task``): Spark counts each file as
# ``spark.sql.files.openCostInBytes`` (4 MiB by default) when it packs files into tasks, so thousands of small images
# would make tasks of ~32 files; in local mode MLflow's spark_udf loads the model once per TASK (no SparkModelCache
# there), so tasks should be large: the session sets openCostInBytes to MAX_PARTITION_BYTES / files_per_task.
MAX_PARTITION_BYTES = 128 * 1024 * 1024  # Spark's default spark.sql.files.maxPartitionBytes
#: Spark settings the job always makes (a --conf of the same key wins).
BASE_CONF: dict[str, str] = {
    "spark.python.worker.reuse": "true",  # the pyfunc stays loaded in a worker across tasks (SparkModelCache)
    "spark.sql.chunkBase64String.enabled": "false",  # one base64 line per file: the pyfunc's fast strict path
    "spark.sql.execution.arrow.pyspark.enabled": "true",
}


class BatchError(RuntimeError):
    """The batch job cannot run; the message says why and what to do."""


# --------------------------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class ResolvedModel:
    """A model made ready on the driver: where its files are, its serving config and what the rows call it."""

    uri: str
    local_path: str
    config: dict[str, Any]
    name: str
    version: str

    @property
    def classes(self) -> list[str]:
        return [str(c) for c in self.config["classes"]]

    @property
    def scale_aware(self) -> bool:
        """Whether the model takes the pixel size (its serving config's ``scale_input``; older models: no)."""
        return bool(self.config.get("scale_input", False))


def default_model_uri(params: Params) -> str:
    return CHAMPION_URI.format(name=params.mlflow.registered_model)


def resolve_model(uri: str, params: Params, download_dir: str | os.PathLike[str] | None = None) -> ResolvedModel:
    """Download ``uri`` (``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, ``runs:/...`` or a local pyfunc folder) and
    read its serving config; :class:`BatchError` with one line when it does not exist or is not a SEM pyfunc.

    Nothing here starts Spark: a wrong URI costs seconds, not a JVM."""
    import mlflow  # lazy: importing MLflow takes seconds
    from mlflow.exceptions import MlflowException

    from emassist.model.tracking import tracking_client

    tracking_client(params)  # models:/ URIs resolve against the configured tracking URI
    name, version = "", ""
    try:
        if Path(uri).is_dir():
            local = str(Path(uri).resolve())
        else:
            if uri.startswith("models:/"):
                name, version = _registry_version(uri)
            local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=_mkdir(download_dir))
    except MlflowException as exc:
        raise BatchError(f"cannot load model {uri}: {exc.message}") from exc
    except OSError as exc:
        raise BatchError(f"cannot load model {uri}: {exc}") from exc
    config_file = Path(local) / MODEL_CONFIG_PATH
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
        if not isinstance(config, dict) or not config.get("classes"):
            raise ValueError("no classes")
    except (OSError, ValueError) as exc:
        raise BatchError(
            f"{uri} is not an emassist SEM classifier pyfunc (no usable {MODEL_CONFIG_PATH.as_posix()}: {exc})"
        ) from exc
    return ResolvedModel(uri, str(local), config, name, version)


def _mkdir(path: str | os.PathLike[str] | None) -> str | None:
    if path is None:
        return None
    Path(path).mkdir(parents=True, exist_ok=True)
    return str(path)


def _registry_version(uri: str) -> tuple[str, str]:
    """(name, version) of a ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` URI (an alias asks the registry)."""
    from mlflow import MlflowClient

    rest = uri[len("models:/") :].strip("/")
    if "@" in rest:
        name, alias = rest.split("@", 1)
        return name, str(MlflowClient().get_model_version_by_alias(name, alias).version)
    name, _, version = rest.partition("/")
    if version and version.isdigit():
        MlflowClient().get_model_version(name, version)  # fails clearly when it does not exist
        return name, version
    return name, version


# --------------------------------------------------------------------------------------------- Spark


def resolved_master(params: Params, master: str | None = None) -> str:
    """``--master``, else ``SPARK_MASTER``, else ``batch.master``."""
    return master or params.batch.resolved_master()


def spark_session(master: str, params: Params, conf: dict[str, str] | None = None) -> SparkSession:
    """A SparkSession on ``master`` with the job's settings: ``batch.max_records_per_batch`` images per Arrow batch,
    python worker reuse, unchunked base64. Under ``spark-submit`` (which has set the master) ``master`` is ignored
    unless it was given explicitly (``conf["spark.master"]``)."""
    from pyspark.sql import SparkSession

    settings = {
        **BASE_CONF,
        "spark.sql.execution.arrow.maxRecordsPerBatch": str(params.batch.max_records_per_batch),
        "spark.sql.sources.binaryFile.maxLength": str(min(params.batch.max_file_bytes, 2**31 - 1)),
        "spark.sql.files.openCostInBytes": str(max(1, MAX_PARTITION_BYTES // params.batch.files_per_task)),
        **(conf or {}),
    }
    submitted = "PYSPARK_GATEWAY_PORT" in os.environ  # under spark-submit: its master and Python win
    explicit = "spark.master" in (conf or {})
    if master.startswith("local") and not submitted:
        # local mode: the workers are this interpreter's (the venv with TensorFlow); a cluster sets its own
        # (pyspark reads PYSPARK_PYTHON when it starts the context; spark.pyspark.python only under spark-submit)
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    builder = SparkSession.builder.appName(APP_NAME)
    if not submitted or explicit:
        builder = builder.master(settings.pop("spark.master", master))
    for key, value in settings.items():
        builder = builder.config(key, value)
    return builder.getOrCreate()


def result_schema(classes: Sequence[str], *, scale: bool = False) -> Any:
    """The pyfunc's output columns as a Spark struct (the model signature's outputs, in order); ``scale``: a
    scale-aware model's, which end with the pixel size it used (:data:`~emassist.serve.pyfunc.SCALE_COLUMNS`)."""
    from pyspark.sql.types import BooleanType, DoubleType, StringType, StructField, StructType

    fields = [StructField("label", StringType()), StructField("confidence", DoubleType())]
    fields += [StructField(c, DoubleType()) for c in classes]
    fields += [StructField(ERROR_COLUMN, StringType()), StructField("needs_review", BooleanType()),
               StructField("review_reason", StringType()), StructField("unfamiliar", BooleanType()),
               StructField("unfamiliar_score", DoubleType())]  # fmt: skip
    if scale:
        fields += [StructField("pixel_size_nm", DoubleType()), StructField("model_pixel_size_nm", DoubleType()),
                   StructField("pixel_size_source", StringType())]  # fmt: skip
    return StructType(fields)


def output_columns(classes: Sequence[str], *, scale: bool = False) -> list[str]:
    """The Parquet columns, in order; a scale-aware model's (``scale``) add the pixel size each answer used (of the
    file, of the model input, and where it came from: tags | databar_scalebar | databar_mag | unknown) before the
    model's name."""
    return ["path", "sha256", "size_bytes", "label", "confidence", *classes, ERROR_COLUMN, *TRUST_COLUMNS,
            *(SCALE_COLUMNS if scale else ()), "model_name", "model_version"]  # fmt: skip


def spark_path(src: str) -> str:
    """A local folder as an absolute path Spark reads (URIs such as ``s3a://``, ``hdfs://`` pass through)."""
    if "://" in src or src.startswith("file:"):
        return src
    path = Path(src)
    if not path.exists():
        raise BatchError(f"{src}: no such file or folder")
    return str(path.resolve())


def plain_path(column: Any) -> Any:
    """Spark's ``file:/x`` paths as ``/x`` (what ``emassist predict`` prints); other URIs unchanged."""
    from pyspark.sql import functions as F

    return F.regexp_replace(column, r"^file:(//)?(?=/)", "")


def listed_path(uri: str) -> str:
    """A path of ``DataFrame.inputFiles()`` (a URI: ``file:///a%20b``) as the scan's ``path`` column reads after
    :func:`plain_path` (``/a b``)."""
    text = unquote(uri)
    return re.sub(r"^file:(//)?(?=/)", "", text)


def hadoop_escaped(path: str) -> str:
    """``path`` with Hadoop's glob characters escaped: Spark expands ``[``, ``{``, ``*``, ``?`` in the paths it is
    given, and archive names contain them (``scan [2].tif``)."""
    return _GLOB_CHARS.sub(r"\\\1", path)


def spark_hidden(name: str) -> bool:
    """A name Spark's file sources skip while listing (``.x``, ``_x`` but not ``_k=v``, ``x._COPYING_``)."""
    return name.startswith(".") or (name.startswith("_") and "=" not in name) or name.endswith("._COPYING_")


@dataclass
class LocalRoots:
    """What Spark is given for a local SRC: folders without folder symlinks below them (listed recursively by
    Spark) and the files of the folders that have one; the folder links that were not followed."""

    roots: list[str] = field(default_factory=list)
    links: list[str] = field(default_factory=list)


def local_roots(src: str | os.PathLike[str]) -> LocalRoots:
    """Walk ``src`` on the driver without following folder symlinks (``os.scandir``, no stat for plain entries).

    A subtree with no folder link is one root (Spark lists it, fast and in parallel); a folder holding one gives its
    files one by one and its subfolders' roots. So no file is listed twice and a link loop costs nothing. A file
    symlink is a file of its own (its row carries its own path and the target's bytes); a broken link is skipped, as
    Hadoop skips it; hidden names (:func:`spark_hidden`) are skipped as Spark skips them."""
    top = Path(src)
    if not top.is_dir():
        return LocalRoots([str(top)])
    found = LocalRoots()
    # iterative post-order walk: (folder, its plain files, its subfolders, subfolder results so far)
    stack: list[tuple[str, list[str], list[str], list[tuple[bool, list[str]]]]] = []

    def enter(folder: str) -> None:
        files, subdirs, clean = [], [], True
        try:
            entries = list(os.scandir(folder))
        except OSError:
            entries = []  # unreadable folder: Spark could not list it either
        for entry in entries:
            if spark_hidden(entry.name):
                continue
            try:
                if entry.is_dir(follow_symlinks=False):
                    subdirs.append(entry.path)
                elif entry.is_symlink():
                    if entry.is_dir():  # follows the link
                        found.links.append(entry.path)
                        clean = False
                    elif os.path.exists(entry.path):
                        files.append(entry.path)
                else:
                    files.append(entry.path)
            except OSError:
                continue
        stack.append((folder, files, sorted(subdirs, reverse=True), [(clean, [])]))

    enter(str(top))
    result: tuple[bool, list[str]] = (True, [])
    while stack:
        folder, files, subdirs, done = stack[-1]
        if subdirs:
            enter(subdirs.pop())
            continue
        stack.pop()
        own_clean = done[0][0]
        children = done[1:]
        if own_clean and all(clean for clean, _ in children):
            result = (True, [folder])
        else:
            result = (False, sorted(files) + [r for _, roots in children for r in roots])
        if stack:
            stack[-1][3].append(result)
    found.roots = result[1]
    return found


@dataclass
class Listing:
    """The files of one run: the ``binaryFile`` reader over them and every listed path (as the rows name them)."""

    files: DataFrame
    paths: list[str]
    uris: dict[str, str]  # listed path -> the URI Spark listed (for asking Hadoop about it later)
    links: list[str] = field(default_factory=list)  # folder symlinks not followed


def list_source(spark: SparkSession, src: str, params: Params, *, glob: str | None = None) -> Listing:
    """List the files under ``src`` matching ``glob`` (default ``batch.glob``) once each (see :func:`local_roots`);
    :class:`BatchError` when nothing matches, before anything is written."""
    pattern = glob or params.batch.glob
    local = not ("://" in src or src.startswith("file:"))
    for attempt in range(LIST_ATTEMPTS):
        walked = local_roots(spark_path(src)) if local else LocalRoots([src])
        if not walked.roots:
            break
        reader = spark.read.format("binaryFile").options(**READ_OPTIONS).option("pathGlobFilter", pattern)
        try:
            files = reader.load([hadoop_escaped(r) for r in walked.roots] if local else walked.roots)
            uris = files.inputFiles()
        except Exception as exc:
            if local and "PATH_NOT_FOUND" in str(exc) and attempt + 1 < LIST_ATTEMPTS:
                continue  # removed since the walk: walk again
            raise
        listed = {listed_path(u): u for u in uris}
        if listed:
            return Listing(files, list(listed), listed, walked.links)
        break
    raise BatchError(f"no files under {src} match {pattern!r} (batch.glob, --glob); nothing was written")


def scored_frame(spark: SparkSession, listing: Listing, model: ResolvedModel, params: Params) -> DataFrame:
    """The answered rows of ``listing`` and the error rows of files too large to read, every column of
    :func:`output_columns` (lazy). Files the read does not return get theirs from :func:`missing_rows`."""
    import mlflow
    from pyspark.sql import functions as F

    b = params.batch
    files = listing.files
    limit = b.max_file_bytes
    listed = files.select("path", "length")
    too_large = listed.where(F.col("length") > limit).select(
        "path",
        F.lit("").alias("sha256"),
        F.col("length").alias("size_bytes"),
        F.format_string(f"file too large: %d bytes exceeds batch.max_file_bytes={limit}", "length").alias("pre_error"),
    )
    readable = files.where(F.col("length") <= limit)
    if b.partitions > 0:
        readable = readable.repartition(b.partitions)
    precheck = precheck_udf(model.config)
    checked = readable.select(
        "path",
        F.sha2(F.col("content"), 256).alias("sha256"),
        F.col("length").alias("size_bytes"),
        "content",
        precheck(F.col("content")).alias("pre_error"),
    )
    try:
        sentinel = base64.b64encode(sentinel_png(model.config)).decode("ascii")
    except ValueError as exc:  # pragma: no cover - a model whose checks refuse noise
        raise BatchError(str(exc)) from exc
    predict = mlflow.pyfunc.spark_udf(
        spark, model.local_path, result_type=result_schema(model.classes, scale=model.scale_aware),
        env_manager="local",
    )  # fmt: skip
    image = F.when(F.col("pre_error") == "", F.base64(F.col("content"))).otherwise(F.lit(sentinel)).alias("image")
    # A scale-aware model's signature has the optional pixel_size_nm column: spark_udf given unnamed columns builds
    # its frame with EVERY signature column, the missing one all NaN, which the pyfunc refuses (a NaN size is a 400).
    # One struct argument arrives as the frame itself (image only): the pyfunc reads each file's own pixel size.
    scored = checked.select("path", "sha256", "size_bytes", "pre_error",
                            predict(F.struct(image) if model.scale_aware else image).alias("m"))  # fmt: skip
    answered = _answer_columns(scored, model.classes, scale=model.scale_aware)
    refused = _error_columns(too_large, model.classes, scale=model.scale_aware)
    named = [F.lit(model.name).alias("model_name"), F.lit(model.version).alias("model_version")]
    frame = answered.unionByName(refused).select("*", *named)
    columns = output_columns(model.classes, scale=model.scale_aware)
    return frame.select(plain_path(F.col("path")).alias("path"), *columns[1:])


def _answer_columns(scored: DataFrame, classes: Sequence[str], *, scale: bool = False) -> DataFrame:
    """The model's answer per row, or the pre-check's error row where the file was refused."""
    from pyspark.sql import functions as F

    ok = F.col("pre_error") == ""

    def pick(name: str, bad: Any) -> Any:
        return F.when(ok, F.col(f"m.`{name}`")).otherwise(F.lit(bad)).alias(name)

    cols = [pick("label", ""), pick("confidence", 0.0), *[pick(c, 0.0) for c in classes],
            F.when(ok, F.col(f"m.{ERROR_COLUMN}")).otherwise(F.col("pre_error")).alias(ERROR_COLUMN),
            pick("needs_review", True), pick("review_reason", REJECTED_REVIEW_REASON), pick("unfamiliar", False),
            pick("unfamiliar_score", 0.0)]  # fmt: skip
    if scale:  # the pyfunc's NaN (unknown) as null; a refused file used no pixel size: null, null, ""
        for name in ("pixel_size_nm", "model_pixel_size_nm"):
            value = F.col(f"m.{name}")
            cols.append(F.when(ok & ~F.isnan(value), value).otherwise(F.lit(None).cast("double")).alias(name))
        cols.append(pick("pixel_size_source", ""))
    return scored.select("path", "sha256", "size_bytes", *cols)


def _scale_defaults(scale: bool) -> list[Any]:
    """The pixel-size columns of a row that got no answer (none for a model without the scale input)."""
    from pyspark.sql import functions as F

    if not scale:
        return []
    return [F.lit(None).cast("double").alias("pixel_size_nm"), F.lit(None).cast("double").alias("model_pixel_size_nm"),
            F.lit("").alias("pixel_size_source")]  # fmt: skip


def _error_columns(skipped: DataFrame, classes: Sequence[str], *, scale: bool = False) -> DataFrame:
    """Rows for files never read (too large): what the pyfunc answers for a bad row."""
    from pyspark.sql import functions as F

    cols = [F.lit("").alias("label"), F.lit(0.0).alias("confidence"), *[F.lit(0.0).alias(c) for c in classes],
            F.col("pre_error").alias(ERROR_COLUMN), F.lit(True).alias("needs_review"),
            F.lit(REJECTED_REVIEW_REASON).alias("review_reason"), F.lit(False).alias("unfamiliar"),
            F.lit(0.0).alias("unfamiliar_score"), *_scale_defaults(scale)]  # fmt: skip
    return skipped.select("path", "sha256", "size_bytes", *cols)


# --------------------------------------------------------------------------------------------- output


def is_local(out: str) -> bool:
    return "://" not in out and not out.startswith("file:")


def missing_rows(spark: SparkSession, written: DataFrame, listing: Listing, model: ResolvedModel,
                 rename: Callable[[str], str] = str, unlisted: int = 0) -> DataFrame | None:  # fmt: skip
    """Error rows for the listed files that have no row in ``written`` (the Parquet just written): zero-byte files
    (Spark's scan drops them), and files removed or unreadable between the listing and the read. Comparing with
    what was written, not with a second scan, is what makes "one row per listed file" hold whatever changed on disk
    meanwhile. ``rename``: listed path -> the path the rows carry (the s3:// mirror's URIs); ``unlisted``: how many
    written rows are of no listed file (the mirror's refused keys). Hadoop is asked about each such file (few)."""
    names = {rename(p): p for p in listing.paths}
    if written.count() == len(names) + unlisted:  # Parquet footers only: nothing missing (the usual case), no join
        return None
    every = spark.createDataFrame([(n,) for n in names], "path string")
    absent = sorted(r[0] for r in every.join(written.select("path"), "path", "left_anti").collect())
    if not absent:
        return None
    rows = []
    for name in absent:
        size, reason = why_missing(spark, listing.uris[names[name]])
        row: dict[str, Any] = {
            "path": name, "sha256": EMPTY_SHA256 if reason == "zero-byte file" else "", "size_bytes": size,
            "label": "", "confidence": 0.0, ERROR_COLUMN: reason, "needs_review": True,
            "review_reason": REJECTED_REVIEW_REASON, "unfamiliar": False, "unfamiliar_score": 0.0,
            "model_name": model.name, "model_version": model.version,
            "pixel_size_nm": None, "model_pixel_size_nm": None, "pixel_size_source": "",  # (a scale-aware model's)
        }  # fmt: skip
        row.update(dict.fromkeys(model.classes, 0.0))
        rows.append(row)
    schema = written.schema
    return spark.createDataFrame([tuple(r[f.name] for f in schema.fields) for r in rows], schema)


def why_missing(spark: SparkSession, uri: str) -> tuple[int, str]:
    """(size, reason) of a listed file the read did not return, from Hadoop's view of it now."""
    jvm = spark.sparkContext._jvm
    try:
        path = jvm.org.apache.hadoop.fs.Path(jvm.java.net.URI(uri))
        status = path.getFileSystem(spark.sparkContext._jsc.hadoopConfiguration()).getFileStatus(path)
    except Exception as exc:  # py4j's error around Hadoop's FileNotFoundException (or a store that fails)
        gone = "FileNotFoundException" in str(exc)
        return 0, f"{MISSING_REASON} ({'removed after listing' if gone else type(exc).__name__})"
    size = int(status.getLen())
    if size == 0:
        return 0, "zero-byte file"
    return size, f"{MISSING_REASON} (cannot be read)"


def write_predictions(frame: DataFrame, out: str,
                      complete: Callable[[DataFrame], DataFrame | None] | None = None) -> str:  # fmt: skip
    """Write the Parquet rows to ``OUT/predictions``; a previous run's are replaced only once the new ones are
    complete (a local OUT: written beside, then swapped in; elsewhere Spark's overwrite). ``complete`` gets the
    written rows and returns rows to append before the swap (:func:`missing_rows`). Returns the folder."""
    spark = frame.sparkSession
    target = f"{out.rstrip('/')}/{PREDICTIONS_DIR}"
    # One shuffle of the small result rows (no image bytes): rows of a label together, adaptive execution merges
    # the partitions into few files.
    rows = frame.repartition("label").sortWithinPartitions("label", "path")

    def write(where: str) -> None:
        rows.write.mode("overwrite").parquet(where)
        extra = complete(spark.read.parquet(where)) if complete is not None else None
        if extra is not None:
            extra.coalesce(1).write.mode("append").parquet(where)

    if not is_local(out):
        write(target)
        return target
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    fresh = root / f".{PREDICTIONS_DIR}-{uuid.uuid4().hex[:8]}"
    try:
        write(str(fresh.resolve()))
    except BaseException:
        shutil.rmtree(fresh, ignore_errors=True)  # a failed run leaves the previous result and nothing else
        raise
    final = root / PREDICTIONS_DIR
    old = root / f".{PREDICTIONS_DIR}-old-{uuid.uuid4().hex[:8]}"
    if final.exists():
        final.rename(old)
    fresh.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return str(final)


def summary_frame(spark: SparkSession, predictions: str, classes: Sequence[str]) -> pd.DataFrame:
    """Per class (and one ``(error)`` row): files, mean calibrated confidence, needs_review and unfamiliar counts."""
    from pyspark.sql import functions as F

    rows = spark.read.parquet(predictions)
    grouped = (
        rows.withColumn("class", F.when(F.col(ERROR_COLUMN) == "", F.col("label")).otherwise(F.lit(ERROR_LABEL)))
        .groupBy("class")
        .agg(
            F.count("*").alias("files"),
            F.avg(F.when(F.col(ERROR_COLUMN) == "", F.col("confidence"))).alias("mean_confidence"),
            F.sum(F.col("needs_review").cast("int")).alias("needs_review"),
            F.sum(F.col("unfamiliar").cast("int")).alias("unfamiliar"),
        )
        .toPandas()
    )
    order = {c: i for i, c in enumerate([*classes, ERROR_LABEL])}
    grouped["order"] = grouped["class"].map(lambda c: order.get(c, len(order)))
    summary = grouped.sort_values(["order", "class"]).drop(columns="order").reset_index(drop=True)
    summary["share"] = summary["files"] / max(1, int(summary["files"].sum()))
    summary["mean_confidence"] = summary["mean_confidence"].astype(float).round(6)
    return summary[["class", "files", "share", "mean_confidence", "needs_review", "unfamiliar"]]


@dataclass
class BatchReport:
    """What a run did: counts, where it wrote, the model and how long each part took."""

    src: str
    out: str
    predictions: str
    model_uri: str
    model_name: str
    model_version: str
    master: str
    files: int = 0
    errors: int = 0
    needs_review: int = 0
    logged: int = 0
    training_data: str = ""
    notice: str = ""
    seconds: dict[str, float] = field(default_factory=dict)
    summary: list[dict[str, Any]] = field(default_factory=list)

    def lines(self) -> list[str]:
        """What the command prints at the end."""
        out = [f"{self.files - self.errors} classified, {self.errors} failed (error column), "
               f"{self.needs_review} to check by eye; wrote {self.predictions}"]  # fmt: skip
        for row in self.summary:
            out.append(f"  {row['class']:<30} {row['files']:>8}")
        timing = ", ".join(f"{k} {v:.1f} s" for k, v in self.seconds.items())
        out.append(f"model {self.model_uri} ({self.model_name or '-'} v{self.model_version or '-'}) on {self.master}; "
                   f"{timing}")  # fmt: skip
        return out


def run_batch(
    params: Params,
    src: str,
    out: str,
    *,
    model: str | None = None,
    master: str | None = None,
    glob: str | None = None,
    conf: dict[str, str] | None = None,
    log_predictions: bool | None = None,
    progress: bool | None = None,
    spark: SparkSession | None = None,
    announce: Callable[[str], None] | None = None,
) -> BatchReport:
    """Score every file under ``src`` into ``out`` (see the module docstring); returns the :class:`BatchReport`.

    ``model``: a URI or folder (default: the champion). ``master``: the Spark master (default: ``SPARK_MASTER``,
    else ``batch.master``). ``glob``: the file filter (default ``batch.glob``). ``conf``: extra Spark settings.
    ``log_predictions``: append the answers to the prediction log (source ``batch``; default
    ``monitoring.log_predictions``). ``spark``: an existing session (tests, notebooks); it is left running.
    ``announce``: called with each line saying what the model was trained on (the demo notice among them) before
    any file is scored.
    """
    from emassist.data.s3 import S3Error
    from emassist.pipeline.batch_s3 import is_s3, mirror_prefix, s3_paths, s3_uri

    started = time.perf_counter()
    seconds: dict[str, float] = {}
    uri = model or default_model_uri(params)
    download = Path(out) / ".model" if is_local(out) else None
    try:
        resolved = resolve_model(uri, params, download)
        seconds["model"] = time.perf_counter() - started
        for line in training_data_lines(resolved.config):
            if announce is not None:
                announce(line)
        mirror: Mirror | None = None
        if is_s3(src):  # no hadoop-aws in the pyspark wheel: mirror with boto3, then read the mirror
            t = time.perf_counter()
            if not is_local(out):
                raise BatchError(f"{src}: an s3:// source is mirrored beside OUT, which must be a local folder")
            try:
                mirror = mirror_prefix(params, src, Path(out) / ".s3-mirror", progress=progress)
            except S3Error as exc:
                raise BatchError(str(exc)) from exc
            seconds["s3 mirror"] = time.perf_counter() - t
        elif not ("://" in src or src.startswith("file:")):
            spark_path(src)  # a missing local folder: before Spark starts
        the_master = resolved_master(params, master)
        t = time.perf_counter()
        own = spark is None
        session = spark or spark_session(the_master, params, conf)
        seconds["spark start"] = time.perf_counter() - t
        try:
            t = time.perf_counter()
            listing = list_source(session, str(mirror.local) if mirror else src, params, glob=glob)
            if listing.links:
                shown = ", ".join(listing.links[:3]) + (" ..." if len(listing.links) > 3 else "")
                print(f"warning: {len(listing.links)} folder symlink(s) not followed (give their targets as SRC to "
                      f"score them): {shown}", file=sys.stderr)  # fmt: skip
            seconds["list"] = time.perf_counter() - t
            t = time.perf_counter()
            frame = scored_frame(session, listing, resolved, params)
            rename: Callable[[str], str] = str
            unlisted = len(mirror.refused) if mirror is not None else 0
            if mirror is not None:
                frame = s3_paths(frame, mirror, session, output_columns(resolved.classes, scale=resolved.scale_aware))
                rename = lambda path, m=mirror: s3_uri(m, path)  # noqa: E731
            predictions = write_predictions(
                frame, out, lambda written: missing_rows(session, written, listing, resolved, rename, unlisted)
            )
            seconds["score+write"] = time.perf_counter() - t
            summary = summary_frame(session, predictions, resolved.classes)
            logged = 0
            wants_log = params.monitoring.log_predictions if log_predictions is None else log_predictions
            if wants_log:
                t = time.perf_counter()
                logged = log_rows(session, predictions, resolved, params)
                seconds["log"] = time.perf_counter() - t
            used_master = session.sparkContext.master
        except Exception as exc:
            from pyspark.errors import PySparkException

            if not isinstance(exc, PySparkException):
                raise
            first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
            raise BatchError(f"the Spark job on {src} failed: {first[:500]}") from exc
        finally:
            if own:
                session.stop()
    finally:
        if download is not None:
            shutil.rmtree(download, ignore_errors=True)
    line, notice = describe_training_data(resolved.config)
    files = int(summary["files"].sum()) if len(summary) else 0
    report = BatchReport(
        src=src, out=out, predictions=predictions, model_uri=uri, model_name=resolved.name,
        model_version=resolved.version, master=used_master,
        files=files, errors=int(summary.loc[summary["class"] == ERROR_LABEL, "files"].sum()),
        needs_review=int(summary.loc[summary["class"] != ERROR_LABEL, "needs_review"].sum()), logged=logged,
        training_data=line, notice=notice, summary=summary.to_dict("records"),
    )  # fmt: skip
    if is_local(out):
        summary.to_csv(Path(out) / SUMMARY_FILE, index=False)
    seconds["total"] = time.perf_counter() - started
    report.seconds = {k: round(v, 3) for k, v in seconds.items()}
    if is_local(out):
        manifest = {**asdict(report), "training_data_lines": training_data_lines(resolved.config)}
        with atomic_open(Path(out) / MANIFEST_FILE, "w", encoding="utf-8") as fh:
            fh.write(json.dumps(manifest, indent=2, default=str) + "\n")
    return report


def already_logged(store: PredictionLog, sha256s: Sequence[str], model: ModelIdentity, *, source: str = LOG_SOURCE
                   ) -> set[str]:  # fmt: skip
    """Which of ``sha256s`` the prediction log already holds for ``source`` and ``model`` (a
    :class:`~emassist.serve.predlog_hooks.ModelIdentity`: the same name and version)."""
    return store.logged_sha256s(sha256s, source=source, model_name=model.name, model_version=model.version)


def log_rows(spark: SparkSession, predictions: str, model: ResolvedModel, params: Params) -> int:
    """Append the answered rows to the prediction log (source ``batch``, origin = the file's path), each image once
    per model version: rows whose (sha256, model name, version) the log already holds for ``batch`` are skipped, so
    a re-run logs only what is new. Rows go in rounds of :data:`LOG_CHUNK` (at most ``monitoring.max_pending``),
    each written before the next is read: the writer never holds more than it may, so none is dropped for room,
    however many files. Returns how many rows were written. A store that cannot be opened: a warning on stderr,
    nothing logged (the Parquet is the result); one that stops answering: logging stops with a warning."""
    writer, why = open_writer(params.monitoring.resolved_db_uri(), params.monitoring, check_now=True)
    if writer is None:
        print(f"warning: {why}; predictions are not logged (--no-log skips the log)", file=sys.stderr)
        return 0
    alias = model.uri.split("@", 1)[1] if "@" in model.uri else ""
    identity = ModelIdentity(model.name or os.path.basename(model.uri.rstrip("/")), model.version, alias)
    checked = bool(model.config.get("familiarity"))
    size = max(1, min(LOG_CHUNK, params.monitoring.max_pending))
    rows = spark.read.parquet(predictions).where(f"{ERROR_COLUMN} = ''")
    skipped = 0
    try:
        chunk: list[dict[str, Any]] = []
        for row in rows.toLocalIterator():
            chunk.append(row.asDict())
            if len(chunk) >= size:
                skipped += _log_chunk(writer, chunk, identity, model.classes, checked)
                chunk = []
        if chunk:
            skipped += _log_chunk(writer, chunk, identity, model.classes, checked)
    except _StoreDown as exc:
        print(f"warning: the prediction log stopped answering ({exc}); logging stopped, the Parquet is complete",
              file=sys.stderr)  # fmt: skip
    finally:
        writer.close()
    if writer.stats["dropped"]:
        print(f"warning: {writer.stats['dropped']} predictions could not be logged", file=sys.stderr)
    return int(writer.stats["written"])


class _StoreDown(RuntimeError):
    """The prediction log did not take a round of rows after a few tries."""


def _log_chunk(writer: LogWriter, chunk: list[dict[str, Any]], identity: ModelIdentity, classes: Sequence[str],
               checked: bool) -> int:  # fmt: skip
    """Queue the rows of ``chunk`` not logged yet and write them now; returns how many were skipped."""
    done = already_logged(writer.store, [r["sha256"] for r in chunk], identity)
    skipped = 0
    for r in chunk:
        if r["sha256"] in done:  # logged by an earlier run (or earlier in this one: the same bytes twice)
            skipped += 1
            continue
        done.add(r["sha256"])
        writer.record(
            prediction_row(
                LOG_SOURCE, ImageFacts(r["sha256"]), identity,
                label=r["label"], confidence=r["confidence"],
                probabilities={c: r[c] for c in classes}, needs_review=r["needs_review"],
                unfamiliar=r["unfamiliar"] if checked else None,
                unfamiliar_score=r["unfamiliar_score"] if checked else None, origin=r["path"],
            )
        )  # fmt: skip
    for delay in (0.0, 0.5, 1.0, 2.0, 4.0):  # back-pressure: the next round waits for this one
        time.sleep(delay)
        if writer.flush():
            return skipped
    raise _StoreDown(f"{writer.pending} rows pending")
