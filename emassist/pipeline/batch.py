"""``emassist batch``: archive-scale classification on Apache Spark with the registered model (issue 17).

The job, in order (see docs/batch.md):

1. **Model first, before Spark** (:func:`resolve_model`): the model URI (default ``models:/<name>@champion``) is
   downloaded once on the driver and its serving config read. A URI that does not exist fails here, in a second,
   with one clear line: no JVM was started for it.
2. **Listing** with Spark's ``binaryFile`` source (``recursiveFileLookup``, ``pathGlobFilter`` = ``batch.glob``).
   Files over ``batch.max_file_bytes`` get an error row from their listed length; Spark never reads them (the
   ``length`` filter is pushed into the scan). Zero-byte files, which Spark's scan drops silently, are found as the
   listed files the scan did not return, and get an error row too.
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
   swapped in), so rows are never duplicated.

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
from emassist.model.provenance import describe_training_data
from emassist.pipeline.batch_udf import precheck_udf, sentinel_png
from emassist.serve.predict import MODEL_CONFIG_PATH, training_data_lines
from emassist.serve.pyfunc import ERROR_COLUMN, TRUST_COLUMNS

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

CHAMPION_URI = "models:/{name}@champion"
PREDICTIONS_DIR = "predictions"
SUMMARY_FILE = "summary.csv"
MANIFEST_FILE = "batch.json"
REJECTED_REVIEW_REASON = "image rejected"  # what the pyfunc's result_frame says for a bad row
ERROR_LABEL = "(error)"  # the summary's row for files that got no answer
APP_NAME = "emassist-batch"
EMPTY_SHA256 = sha256_of(b"")
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


def result_schema(classes: Sequence[str]) -> Any:
    """The pyfunc's output columns as a Spark struct (the model signature's outputs, in order)."""
    from pyspark.sql.types import BooleanType, DoubleType, StringType, StructField, StructType

    fields = [StructField("label", StringType()), StructField("confidence", DoubleType())]
    fields += [StructField(c, DoubleType()) for c in classes]
    fields += [StructField(ERROR_COLUMN, StringType()), StructField("needs_review", BooleanType()),
               StructField("review_reason", StringType()), StructField("unfamiliar", BooleanType()),
               StructField("unfamiliar_score", DoubleType())]  # fmt: skip
    return StructType(fields)


def output_columns(classes: Sequence[str]) -> list[str]:
    """The Parquet columns, in order."""
    return ["path", "sha256", "size_bytes", "label", "confidence", *classes, ERROR_COLUMN, *TRUST_COLUMNS,
            "model_name", "model_version"]  # fmt: skip


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


def scored_frame(spark: SparkSession, src: str, model: ResolvedModel, params: Params, *,
                 glob: str | None = None) -> DataFrame:  # fmt: skip
    """The job's DataFrame: one row per listed file, every column of :func:`output_columns` (lazy)."""
    import mlflow
    from pyspark.sql import functions as F

    b = params.batch
    files = (
        spark.read.format("binaryFile")
        .option("recursiveFileLookup", "true")
        .option("pathGlobFilter", glob or b.glob)
        .load(spark_path(src))
    )
    limit = b.max_file_bytes
    listed = files.select("path", "length")
    too_large = listed.where(F.col("length") > limit).select(
        "path",
        F.lit("").alias("sha256"),
        F.col("length").alias("size_bytes"),
        F.format_string(f"file too large: %d bytes exceeds batch.max_file_bytes={limit}", "length").alias("pre_error"),
    )
    # Spark's file scan drops zero-byte files (fifos among them) without a trace: they are the listed files
    # (inputFiles, the file index the scan reads) that the scan does not return.
    every = spark.createDataFrame([(listed_path(p),) for p in files.inputFiles()], "path string")
    scanned = listed.select(plain_path(F.col("path")).alias("path"))
    empty = every.join(scanned, "path", "left_anti").select(
        "path",
        F.lit(EMPTY_SHA256).alias("sha256"),
        F.lit(0).cast("long").alias("size_bytes"),
        F.lit("zero-byte file").alias("pre_error"),
    )
    skipped = too_large.unionByName(empty)
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
        spark, model.local_path, result_type=result_schema(model.classes), env_manager="local"
    )
    image = F.when(F.col("pre_error") == "", F.base64(F.col("content"))).otherwise(F.lit(sentinel))
    scored = checked.select("path", "sha256", "size_bytes", "pre_error", predict(image.alias("image")).alias("m"))
    answered = _answer_columns(scored, model.classes)
    refused = _error_columns(skipped, model.classes)
    named = [F.lit(model.name).alias("model_name"), F.lit(model.version).alias("model_version")]
    frame = answered.unionByName(refused).select("*", *named)
    return frame.select(plain_path(F.col("path")).alias("path"), *output_columns(model.classes)[1:])


def _answer_columns(scored: DataFrame, classes: Sequence[str]) -> DataFrame:
    """The model's answer per row, or the pre-check's error row where the file was refused."""
    from pyspark.sql import functions as F

    ok = F.col("pre_error") == ""

    def pick(name: str, bad: Any) -> Any:
        return F.when(ok, F.col(f"m.`{name}`")).otherwise(F.lit(bad)).alias(name)

    cols = [pick("label", ""), pick("confidence", 0.0), *[pick(c, 0.0) for c in classes],
            F.when(ok, F.col(f"m.{ERROR_COLUMN}")).otherwise(F.col("pre_error")).alias(ERROR_COLUMN),
            pick("needs_review", True), pick("review_reason", REJECTED_REVIEW_REASON), pick("unfamiliar", False),
            pick("unfamiliar_score", 0.0)]  # fmt: skip
    return scored.select("path", "sha256", "size_bytes", *cols)


def _error_columns(skipped: DataFrame, classes: Sequence[str]) -> DataFrame:
    """Rows for files never read (too large, zero bytes): what the pyfunc answers for a bad row."""
    from pyspark.sql import functions as F

    cols = [F.lit("").alias("label"), F.lit(0.0).alias("confidence"), *[F.lit(0.0).alias(c) for c in classes],
            F.col("pre_error").alias(ERROR_COLUMN), F.lit(True).alias("needs_review"),
            F.lit(REJECTED_REVIEW_REASON).alias("review_reason"), F.lit(False).alias("unfamiliar"),
            F.lit(0.0).alias("unfamiliar_score")]  # fmt: skip
    return skipped.select("path", "sha256", "size_bytes", *cols)


# --------------------------------------------------------------------------------------------- output


def is_local(out: str) -> bool:
    return "://" not in out and not out.startswith("file:")


def write_predictions(frame: DataFrame, out: str) -> str:
    """Write the Parquet rows to ``OUT/predictions``; a previous run's are replaced only once the new ones are
    complete (a local OUT: written beside, then swapped in; elsewhere Spark's overwrite). Returns the folder."""
    target = f"{out.rstrip('/')}/{PREDICTIONS_DIR}"
    # One shuffle of the small result rows (no image bytes): rows of a label together, adaptive execution merges
    # the partitions into few files.
    rows = frame.repartition("label").sortWithinPartitions("label", "path")
    if not is_local(out):
        rows.write.mode("overwrite").parquet(target)
        return target
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    fresh = root / f".{PREDICTIONS_DIR}-{uuid.uuid4().hex[:8]}"
    rows.write.mode("overwrite").parquet(str(fresh.resolve()))
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
    from emassist.pipeline.batch_s3 import is_s3, mirror_prefix, s3_paths

    started = time.perf_counter()
    seconds: dict[str, float] = {}
    uri = model or default_model_uri(params)
    resolved = resolve_model(uri, params, Path(out) / ".model" if is_local(out) else None)
    seconds["model"] = time.perf_counter() - started
    for line in training_data_lines(resolved.config):
        if announce is not None:
            announce(line)
    mirror = None
    if is_s3(src):  # no hadoop-aws in the pyspark wheel: mirror with boto3, then read the mirror
        t = time.perf_counter()
        if not is_local(out):
            raise BatchError(f"{src}: an s3:// source is mirrored beside OUT, which must be a local folder")
        mirror = mirror_prefix(params, src, Path(out) / ".s3-mirror", progress=progress)
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
        frame = scored_frame(session, str(mirror.local) if mirror else src, resolved, params, glob=glob)
        if mirror is not None:
            frame = s3_paths(frame, mirror, session, output_columns(resolved.classes))
        predictions = write_predictions(frame, out)
        seconds["score+write"] = time.perf_counter() - t
        summary = summary_frame(session, predictions, resolved.classes)
        logged = 0
        wants_log = params.monitoring.log_predictions if log_predictions is None else log_predictions
        if wants_log:
            logged = log_rows(session, predictions, resolved, params)
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
        shutil.rmtree(Path(out) / ".model", ignore_errors=True)
    seconds["total"] = time.perf_counter() - started
    report.seconds = {k: round(v, 3) for k, v in seconds.items()}
    if is_local(out):
        manifest = {**asdict(report), "training_data_lines": training_data_lines(resolved.config)}
        with atomic_open(Path(out) / MANIFEST_FILE, "w", encoding="utf-8") as fh:
            fh.write(json.dumps(manifest, indent=2, default=str) + "\n")
    if files == 0:
        raise BatchError(f"no files under {src} match {glob or params.batch.glob!r} (batch.glob, --glob)")
    return report


def log_rows(spark: SparkSession, predictions: str, model: ResolvedModel, params: Params) -> int:
    """Append every answered row to the prediction log (source ``batch``, origin = the file's path); returns how many
    were queued. A store that cannot be opened: a warning on stderr, nothing logged (the Parquet is the result)."""
    from emassist.serve.predlog_hooks import ImageFacts, ModelIdentity, open_writer, prediction_row

    writer, why = open_writer(params.monitoring.resolved_db_uri(), params.monitoring, check_now=True)
    if writer is None:
        print(f"warning: {why}; predictions are not logged (--no-log skips the log)", file=sys.stderr)
        return 0
    alias = model.uri.split("@", 1)[1] if "@" in model.uri else ""
    identity = ModelIdentity(model.name or os.path.basename(model.uri.rstrip("/")), model.version, alias)
    checked = bool(model.config.get("familiarity"))
    queued = 0
    rows = spark.read.parquet(predictions).where(f"{ERROR_COLUMN} = ''")
    try:
        for row in rows.toLocalIterator():
            r = row.asDict()
            writer.record(
                prediction_row(
                    "batch", ImageFacts(r["sha256"]), identity,
                    label=r["label"], confidence=r["confidence"],
                    probabilities={c: r[c] for c in model.classes}, needs_review=r["needs_review"],
                    unfamiliar=r["unfamiliar"] if checked else None,
                    unfamiliar_score=r["unfamiliar_score"] if checked else None, origin=r["path"],
                )
            )  # fmt: skip
            queued += 1
    finally:
        writer.close()
    if writer.stats["dropped"]:
        print(f"warning: {writer.stats['dropped']} predictions could not be logged", file=sys.stderr)
    return queued
