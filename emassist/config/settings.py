"""params.yaml → typed, validated settings: the one place where a setting is checked.

:func:`load_params` reads params.yaml, builds the frozen ``*Params`` dataclasses and validates every value (with a
message naming the key) before any work starts; the library then takes these objects (or plain values read from
them) and does not check them again. The allowed values live in :mod:`emassist.config.choices`.

Defaults: every dataclass default is params.yaml's value (a test compares them), so a key missing from a params
file means the same thing as in the repository's params.yaml. The one exception is an augmentation policy
(:class:`PolicyParams`): a key it does not list is off.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from emassist.config.choices import (
    DATA_SOURCES,
    DEMO_MAX_SIDE,
    DEMO_MIN_SIDE,
    EMBEDDING_BACKBONES,
    LR_SCHEDULES,
    MIN_EMBEDDING_SIZE,
    MIN_IMAGE_SIZE,
    MIN_TILE,
    MODEL_NAMES,
    OPTIMIZERS,
    POLICY_FRACTIONS,
    PRETRAINED_MODELS,
    WEBAPP_SOURCES,
    WEIGHTS_SUFFIXES,
    XCEPTION_BLOCKS,
)
from emassist.config.classes import CLASSES

DEFAULT_PARAMS = Path("params.yaml")


class ParamsError(ValueError):
    """A value in params.yaml is missing, of the wrong type or out of range."""


@dataclass(frozen=True)
class DataParams:
    source: str = "demo"
    raw_dir: str = "data/raw"
    interim_dir: str = "data/interim"
    splits_dir: str = "data/splits"
    augmented_dir: str = "data/augmented"
    classes: tuple[str, ...] = CLASSES

    def check(self) -> None:
        _one_of("data.source", self.source, DATA_SOURCES)
        check_class_names("data.classes", self.classes)
        if len(set(self.classes)) < 2:
            raise ParamsError(f"data.classes: need at least two distinct classes, got {list(self.classes)}")


@dataclass(frozen=True)
class DemoParams:
    seed: int = 42
    n_images: int = 4000
    width: int = 256
    height: int = 256
    min_per_class: int = 330
    tif_fraction: float = 0.1
    databar_fraction: float = 0.8

    def check(self) -> None:
        _at_least("demo.seed", self.seed, 0)
        _at_least("demo.n_images", self.n_images, len(CLASSES))
        _between("demo.width", self.width, DEMO_MIN_SIDE, DEMO_MAX_SIDE)
        _between("demo.height", self.height, DEMO_MIN_SIDE, DEMO_MAX_SIDE)
        _at_least("demo.min_per_class", self.min_per_class, 1)
        _fraction("demo.tif_fraction", self.tif_fraction)
        _fraction("demo.databar_fraction", self.databar_fraction)
        if self.n_images < self.min_per_class * len(CLASSES):
            raise ParamsError(
                f"demo.n_images: {self.n_images} is less than demo.min_per_class × {len(CLASSES)} classes "
                f"= {self.min_per_class * len(CLASSES)}"
            )


@dataclass(frozen=True)
class NffaParams:
    base_url: str = "https://b2share.eudat.eu/api/records/862nr-cn036/files"
    download_dir: str = "data/downloads"
    retries: int = 5
    timeout_s: float = 60.0

    def check(self) -> None:
        if not self.base_url.startswith(("http://", "https://")):
            raise ParamsError(f"nffa.base_url: must be an http(s) URL, got {self.base_url!r}")
        _at_least("nffa.retries", self.retries, 0)
        _positive("nffa.timeout_s", self.timeout_s)


@dataclass(frozen=True)
class IngestParams:
    cache_size: int = 256
    max_pixels: int = 100_000_000
    min_side: int = 16
    crop_databar: bool = True
    min_contrast: float = 2.0  # std of gray levels (0..255) after the data-bar crop; flatter frames: featureless
    read_databar: bool = True  # pixel size off the data bar (OCR + scale bar) where the tags lack it
    workers: int = 0

    def check(self) -> None:
        _at_least("ingest.cache_size", self.cache_size, 16)
        _at_least("ingest.min_contrast", self.min_contrast, 0)
        _at_least("ingest.max_pixels", self.max_pixels, 1)
        _at_least("ingest.min_side", self.min_side, 1)
        _at_least("ingest.workers", self.workers, 0)


@dataclass(frozen=True)
class ValidateParams:
    min_per_class: int = 20
    max_rejected_fraction: float = 0.05
    min_side: int = 16
    max_side: int = 20000

    def check(self) -> None:
        _at_least("validate.min_per_class", self.min_per_class, 1)
        _fraction("validate.max_rejected_fraction", self.max_rejected_fraction)
        _at_least("validate.min_side", self.min_side, 1)
        if self.max_side < self.min_side:
            raise ParamsError(f"validate.max_side: {self.max_side} is below validate.min_side {self.min_side}")


@dataclass(frozen=True)
class SplitParams:
    seed: int = 42
    train: float = 0.7
    val: float = 0.2
    test: float = 0.1
    near_dup_distance: int = 4
    embedding: str | None = None  # null: no embedding grouping | imagenet | path to a local weights file
    embedding_backbone: str = "xception"  # the frozen backbone whose global-pooled features are compared
    embedding_image_size: int = 224  # side of the images the backbone sees
    embedding_threshold: float = 0.94  # cosine similarity at or above which two images are near duplicates

    def check(self) -> None:
        for name in ("train", "val", "test"):
            value = getattr(self, name)
            if not 0 < value < 1:
                raise ParamsError(f"split.{name}: must be a ratio between 0 and 1 (exclusive), got {value}")
        total = self.train + self.val + self.test
        if not math.isclose(total, 1.0, abs_tol=1e-6):
            raise ParamsError(f"split.train + split.val + split.test must sum to 1, got {total:g}")
        _at_least("split.near_dup_distance", self.near_dup_distance, 0)
        if self.near_dup_distance > 32:
            raise ParamsError(f"split.near_dup_distance: at most 32 of 64 hash bits, got {self.near_dup_distance}")
        _one_of("split.embedding_backbone", self.embedding_backbone, EMBEDDING_BACKBONES)
        smallest = MIN_EMBEDDING_SIZE[self.embedding_backbone]
        if self.embedding_image_size < smallest:
            raise ParamsError(
                f"split.embedding_image_size: {self.embedding_backbone} needs at least {smallest} pixels, "
                f"got {self.embedding_image_size}"
            )
        _between("split.embedding_threshold", self.embedding_threshold, -1.0, 1.0)
        check_weights_file("split.embedding", self.embedding, f"the {self.embedding_backbone} backbone")

    @property
    def ratios(self) -> dict[str, float]:
        return {"train": self.train, "val": self.val, "test": self.test}


@dataclass(frozen=True)
class PolicyParams:
    """An augmentation policy (fractions as in Keras' preprocessing layers), used offline and online alike.

    A policy lists what it turns on: a key it leaves out is off (0 / false), so these defaults are the identity.
    """

    rotation: float = 0.0  # fraction of a full turn (0.1 -> ±36°)
    width_shift: float = 0.0  # fraction of the width
    height_shift: float = 0.0  # fraction of the height
    shear: float = 0.0  # shear coefficient (x += shear * y)
    zoom: float = 0.0  # ± fraction of the visible field
    flip: bool = False  # random horizontal and vertical flips
    rot90: bool = False  # a random multiple of 90° (SEM images have no preferred orientation)
    brightness: float = 0.0  # ± fraction of the 0..255 range
    contrast: float = 0.0  # contrast factor drawn from [1 - contrast, 1 + contrast]

    def check(self, prefix: str = "augment.policy") -> None:
        for key in POLICY_FRACTIONS:
            _fraction(f"{prefix}.{key}", getattr(self, key))

    def as_dict(self) -> dict[str, float | bool]:
        return dataclasses.asdict(self)


def _offline_policy() -> PolicyParams:
    return PolicyParams(rotation=0.1, width_shift=0.1, height_shift=0.1, shear=0.1, zoom=0.1, flip=True, rot90=True,
                        brightness=0.1, contrast=0.1)  # fmt: skip


def _online_policy() -> PolicyParams:
    return PolicyParams(flip=True, rot90=True)


@dataclass(frozen=True)
class AugmentParams:
    target_per_class: int = 300  # rare classes of the train split are grown to this many images
    seed: int = 42
    online: bool = True  # also augment training batches on the fly (Keras preprocessing layers) with online_policy
    policy: PolicyParams = field(default_factory=_offline_policy)  # offline copies of the rare classes
    online_policy: PolicyParams = field(default_factory=_online_policy)  # training batches (same keys and fractions)

    def check(self) -> None:
        _at_least("augment.target_per_class", self.target_per_class, 0)
        self.policy.check()
        self.online_policy.check("augment.online_policy")


@dataclass(frozen=True)
class TrainParams:
    model: str = "compact_cnn"  # simple_cnn (the study's baseline) | compact_cnn (CPU default) | xception
    image_size: int = 64
    batch_size: int = 64
    epochs: int = 28  # phase 1 (xception: head only, base frozen)
    learning_rate: float = 0.003
    optimizer: str = "adam"
    lr_schedule: str = "cosine"  # plateau: ReduceLROnPlateau | cosine: cosine decay to 0 over each phase
    dropout: float = 0.3
    label_smoothing: float = 0.1  # of the cross-entropy targets (0: off)
    weights: str | None = None  # imagenet | path to a local weights file | null
    finetune_epochs: int = 0  # phase 2 (xception only): top blocks unfrozen
    finetune_learning_rate: float = 0.0001
    finetune_blocks: int = 2  # Xception blocks unfrozen in phase 2 (1..14)
    class_weights: bool = True  # balanced class weights
    early_stopping_patience: int = 10
    reduce_lr_patience: int = 3
    reduce_lr_factor: float = 0.5
    mixed_precision: bool = False
    xla: bool = False
    cache: bool = True
    shuffle_buffer: int = 2048
    seed: int = 42
    work_pool: str | None = None  # Prefect work pool for the train step (e.g. gpu); null: run in-process
    scale_input: bool = True  # a second input: log10 of the model input's pixel size and a known/unknown flag
    scale_dropout: float = 0.2  # share of known pixel sizes masked as unknown in training (scale_input only)

    def check(self) -> None:
        _one_of("train.model", self.model, MODEL_NAMES)
        _one_of("train.optimizer", self.optimizer, OPTIMIZERS)
        _one_of("train.lr_schedule", self.lr_schedule, LR_SCHEDULES)
        smallest = MIN_IMAGE_SIZE[self.model]
        if self.image_size < smallest:
            raise ParamsError(f"train.image_size: {self.model} needs at least {smallest} pixels, got {self.image_size}")
        _at_least("train.batch_size", self.batch_size, 1)
        _at_least("train.epochs", self.epochs, 1)
        _at_least("train.finetune_epochs", self.finetune_epochs, 0)
        _positive("train.learning_rate", self.learning_rate)
        _positive("train.finetune_learning_rate", self.finetune_learning_rate)
        _below_one("train.dropout", self.dropout)
        _below_one("train.label_smoothing", self.label_smoothing)
        if not 1 <= self.finetune_blocks <= XCEPTION_BLOCKS:
            raise ParamsError(
                f"train.finetune_blocks: must be between 1 and {XCEPTION_BLOCKS} (Xception's blocks unfrozen in the "
                f"fine-tuning phase), got {self.finetune_blocks}; set train.finetune_epochs: 0 to skip fine-tuning"
            )
        _at_least("train.early_stopping_patience", self.early_stopping_patience, 0)
        _at_least("train.reduce_lr_patience", self.reduce_lr_patience, 0)
        _fraction("train.reduce_lr_factor", self.reduce_lr_factor)
        _at_least("train.shuffle_buffer", self.shuffle_buffer, 1)
        _fraction("train.scale_dropout", self.scale_dropout)
        if self.model not in PRETRAINED_MODELS and self.weights is not None:
            raise ParamsError(f"train.weights: {self.model} trains from scratch; set train.weights to null")
        check_weights_file("train.weights", self.weights, "the Xception base")


@dataclass(frozen=True)
class EvaluateParams:
    """What the evaluate stage fits on val and ships with the model: the review threshold and the familiarity one."""

    target_accuracy: float = 0.99  # review threshold: the lowest confidence whose accepted val images reach this
    unfamiliar_quantile: float = 0.95  # share of val images whose familiarity score sits below the threshold

    def check(self) -> None:
        _fraction("evaluate.target_accuracy", self.target_accuracy)
        _fraction("evaluate.unfamiliar_quantile", self.unfamiliar_quantile)


@dataclass(frozen=True)
class MlflowParams:
    tracking_uri: str = "sqlite:///mlflow.db"  # MLFLOW_TRACKING_URI overrides this
    experiment: str = "sem-classifier"
    registered_model: str = "sem-classifier"
    promotion_margin: float = 0.0  # challenger's test macro-F1 must beat the champion's by more than this

    def check(self) -> None:
        _fraction("mlflow.promotion_margin", self.promotion_margin)
        if not self.experiment.strip():
            raise ParamsError("mlflow.experiment: must not be empty")
        if not self.registered_model.strip():
            raise ParamsError("mlflow.registered_model: must not be empty")

    def resolved_tracking_uri(self) -> str:
        return os.environ.get("MLFLOW_TRACKING_URI") or self.tracking_uri


@dataclass(frozen=True)
class WebappParams:
    """The web page (``emassist web``) and the tile scan (``emassist scan``)."""

    source: str = "registry"  # registry: load models:/<mlflow.registered_model>@<alias> | endpoint: call endpoint_url
    alias: str = "champion"
    endpoint_url: str = "http://127.0.0.1:5001"  # a running `mlflow models serve` (source: endpoint)
    endpoint_timeout_s: float = 60.0
    low_confidence: float | None = None  # null: the model's review threshold | a fixed confidence that overrides it
    max_upload_bytes: int = 50_000_000
    max_pixels: int = 64_000_000  # of one uploaded image (declared size, checked before decoding)
    max_files: int = 50  # per batch on the page
    tile_size: int = 256  # tile scan defaults (pixels of the full-resolution image)
    tile_stride: int = 128
    tile_batch: int = 32
    max_tiles: int = 20000
    temp_dir: str | None = None  # where uploads are kept for the session; null: the system temporary folder

    def check(self) -> None:
        _one_of("webapp.source", self.source, WEBAPP_SOURCES)
        if not self.alias.strip():
            raise ParamsError("webapp.alias: must not be empty")
        if not self.endpoint_url.startswith(("http://", "https://")):
            raise ParamsError(f"webapp.endpoint_url: must be an http(s) URL, got {self.endpoint_url!r}")
        _positive("webapp.endpoint_timeout_s", self.endpoint_timeout_s)
        if self.low_confidence is not None:
            _fraction("webapp.low_confidence", self.low_confidence)
        _at_least("webapp.max_upload_bytes", self.max_upload_bytes, 1024)
        _at_least("webapp.max_pixels", self.max_pixels, 256)
        _at_least("webapp.max_files", self.max_files, 1)
        check_tiling(self.tile_size, self.tile_stride, tile_key="webapp.tile_size", stride_key="webapp.tile_stride")
        _at_least("webapp.tile_batch", self.tile_batch, 1)
        _at_least("webapp.max_tiles", self.max_tiles, 1)


@dataclass(frozen=True)
class OrchestrationParams:
    """Prefect: deployments, schedules and how long to wait (pipelines/)."""

    retrain_cron: str = "0 3 * * 1"  # scheduled retraining (weekly, Monday 03:00)
    timezone: str = "UTC"
    pipeline_pool: str = "cpu"  # process work pool that runs the pipeline and retraining deployments
    retries: int = 2  # retries of the steps where a retry can help (acquire, DVC push/pull, dispatch, register)
    retry_delay_s: float = 10.0
    train_timeout_s: float = 21600.0  # how long the pipeline waits for a training sent to train.work_pool
    connect_timeout_s: float = 5.0  # reachability checks of the Prefect API and the MLflow server

    def check(self) -> None:
        check_cron("orchestration.retrain_cron", self.retrain_cron)
        if not self.pipeline_pool.strip():
            raise ParamsError("orchestration.pipeline_pool: must not be empty")
        if not self.timezone.strip():
            raise ParamsError("orchestration.timezone: must not be empty")
        _at_least("orchestration.retries", self.retries, 0)
        _at_least("orchestration.retry_delay_s", self.retry_delay_s, 0)
        _positive("orchestration.train_timeout_s", self.train_timeout_s)
        _positive("orchestration.connect_timeout_s", self.connect_timeout_s)


@dataclass(frozen=True)
class MonitoringParams:
    """The feedback loop: the prediction log, corrections, drift and the retraining it triggers."""

    db_uri: str = "sqlite:///monitoring.db"  # SQLAlchemy URL; EMASSIST_MONITORING_DB_URI overrides; postgresql://...
    log_predictions: bool = True  # the page, `emassist predict` and `emassist scan` log every answer
    batch_size: int = 64  # rows per write transaction
    flush_interval_s: float = 1.0  # the writer flushes at least this often
    max_pending: int = 10000  # rows kept in memory while the store is unreachable; beyond: dropped and counted
    feedback_dir: str = "data/feedback"  # corrected images, content-addressed: <Class>/<sha256>.<ext> (DVC-tracked)
    window_days: float = 7.0  # drift: the recent part of the log compared with the reference
    min_rows: int = 50  # fewer logged predictions in the window: "not enough data"
    drift_share: float = 0.5  # share of drifted columns (Evidently) at which the log is called drifted
    review_rate_increase: float = 0.2  # needs_review rate above the reference's by more than this: drift too
    retrain_min_corrections: int = 20  # new corrections since the champion's data that trigger a retraining
    monitor_cron: str = "0 * * * *"  # the sem-monitor deployment (hourly)

    def check(self) -> None:
        if "://" not in self.db_uri:
            raise ParamsError(f"monitoring.db_uri: need an SQLAlchemy URL (sqlite:///file.db, postgresql://...), "
                              f"got {self.db_uri!r}")  # fmt: skip
        _at_least("monitoring.batch_size", self.batch_size, 1)
        _positive("monitoring.flush_interval_s", self.flush_interval_s)
        _at_least("monitoring.max_pending", self.max_pending, 1)
        if not self.feedback_dir.strip():
            raise ParamsError("monitoring.feedback_dir: must not be empty")
        _positive("monitoring.window_days", self.window_days)
        _at_least("monitoring.min_rows", self.min_rows, 1)
        _fraction("monitoring.drift_share", self.drift_share)
        _fraction("monitoring.review_rate_increase", self.review_rate_increase)
        _at_least("monitoring.retrain_min_corrections", self.retrain_min_corrections, 1)
        check_cron("monitoring.monitor_cron", self.monitor_cron)

    def resolved_db_uri(self) -> str:
        return os.environ.get("EMASSIST_MONITORING_DB_URI") or self.db_uri


@dataclass(frozen=True)
class WatchParams:
    """``emassist watch DIR``: the folder watcher beside the microscope."""

    settle_s: float = 1.0  # complete once the size has not changed for this long and it decodes
    incomplete_timeout_s: float = 120.0  # still growing or undecodable after this: reported incomplete
    batch_size: int = 32  # images per forward pass in a burst
    max_wait_s: float = 0.5  # a partial batch waits at most this long for more files
    queue_size: int = 256  # completed files waiting for the model (bounded)
    poll_interval_s: float = 1.0  # --poll: how often the folder is listed
    min_confidence: float = 0.9  # --alert fires at or above this calibrated confidence
    alert_timeout_s: float = 5.0  # the --alert-url POST
    state_file: str = ".emassist-watch.db"  # beside the results: path + sha256 already classified
    rescan_s: float = 60.0  # a full walk this often catches what file-system events missed
    ignore_suffixes: tuple[str, ...] = (".tmp", ".temp", ".part", ".partial", ".crdownload", ".download", ".swp", "~")
    ignore_prefixes: tuple[str, ...] = (".", "~$")  # hidden and Office-lock names

    def check(self) -> None:
        _at_least("watch.settle_s", self.settle_s, 0)
        _positive("watch.incomplete_timeout_s", self.incomplete_timeout_s)
        if self.incomplete_timeout_s <= self.settle_s:
            raise ParamsError(
                f"watch.incomplete_timeout_s: {self.incomplete_timeout_s} must exceed watch.settle_s {self.settle_s}"
            )
        _at_least("watch.batch_size", self.batch_size, 1)
        _at_least("watch.max_wait_s", self.max_wait_s, 0)
        _at_least("watch.queue_size", self.queue_size, 1)
        _positive("watch.poll_interval_s", self.poll_interval_s)
        _fraction("watch.min_confidence", self.min_confidence)
        _positive("watch.alert_timeout_s", self.alert_timeout_s)
        if not self.state_file.strip():
            raise ParamsError("watch.state_file: must not be empty")
        _positive("watch.rescan_s", self.rescan_s)
        for key in ("ignore_suffixes", "ignore_prefixes"):
            if any(not isinstance(v, str) or not v for v in getattr(self, key)):
                raise ParamsError(f"watch.{key}: a list of non-empty strings, got {list(getattr(self, key))!r}")


@dataclass(frozen=True)
class BatchParams:
    """``emassist batch``: archive-scale scoring with ``mlflow.pyfunc.spark_udf`` on Spark."""

    master: str = "local[*]"  # SPARK_MASTER and --master override
    glob: str = "*.{png,PNG,jpg,JPG,jpeg,JPEG,tif,TIF,tiff,TIFF}"  # pathGlobFilter of the binaryFile source
    max_records_per_batch: int = 64  # spark.sql.execution.arrow.maxRecordsPerBatch
    max_file_bytes: int = 200_000_000  # larger files: an error row instead of a read
    partitions: int = 0  # input partitions; 0: Spark's default
    files_per_task: int = 512  # small files packed per input task (spark.sql.files.openCostInBytes = 128 MiB / this)

    def check(self) -> None:
        if not self.master.strip():
            raise ParamsError("batch.master: must not be empty (e.g. local[*] or spark://host:7077)")
        if not self.glob.strip():
            raise ParamsError("batch.glob: must not be empty (e.g. *.png)")
        _at_least("batch.max_records_per_batch", self.max_records_per_batch, 1)
        _at_least("batch.max_file_bytes", self.max_file_bytes, 1)
        _at_least("batch.partitions", self.partitions, 0)
        _at_least("batch.files_per_task", self.files_per_task, 1)

    def resolved_master(self) -> str:
        return os.environ.get("SPARK_MASTER") or self.master


_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_REMOTE_NAME_RE = re.compile(r"^[A-Za-z0-9_-]+$")


@dataclass(frozen=True)
class S3Params:
    """Where the data and artifacts live on S3 (or an S3-compatible store). Never credentials: those come only from
    the standard AWS chain (environment, profile, instance role)."""

    bucket: str | None = None  # required for data.source: s3 and the `emassist s3` commands
    prefix: str = "raw"  # images under s3://bucket/prefix/<Class>/...
    endpoint_url: str | None = None  # MinIO/moto/...; null: AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, else AWS
    region: str | None = None  # null: the AWS chain (AWS_DEFAULT_REGION, profile)
    profile: str | None = None  # a named AWS profile; null: the default chain
    workers: int = 16  # parallel transfers
    retries: int = 5  # per object, exponential backoff
    timeout_s: float = 60.0  # connect/read timeout per request
    dvc_remote: str = "s3"  # name of the DVC remote written by `emassist s3 dvc-remote`
    dvc_prefix: str = "dvcstore"  # DVC remote at s3://bucket/dvc_prefix
    dvc_jobs: int = 0  # DVC transfer jobs for that remote; 0: DVC's default
    mlflow_prefix: str = "mlartifacts"  # MLflow server artifacts at s3://bucket/mlflow_prefix

    def check(self) -> None:
        if self.bucket is not None:
            if self.bucket.startswith("s3://"):
                raise ParamsError(f"s3.bucket: give the bucket name only, without s3:// (got {self.bucket!r})")
            if not _BUCKET_RE.match(self.bucket) or ".." in self.bucket:
                raise ParamsError(
                    f"s3.bucket: not a valid bucket name {self.bucket!r} (3-63 lowercase letters, digits, '.', '-')"
                )
        for key in ("prefix", "dvc_prefix", "mlflow_prefix"):
            value: str = getattr(self, key)
            parts = value.strip("/").split("/")
            if value.strip("/") and ("\\" in value or any(p in ("", ".", "..") for p in parts)):
                raise ParamsError(f"s3.{key}: must be a plain key prefix like 'raw' or 'sem/raw', got {value!r}")
        if self.endpoint_url is not None:
            if not self.endpoint_url.startswith(("http://", "https://")):
                raise ParamsError(f"s3.endpoint_url: must be an http(s) URL, got {self.endpoint_url!r}")
            if "@" in self.endpoint_url.split("://", 1)[1].split("/", 1)[0]:
                raise ParamsError(
                    "s3.endpoint_url: must not carry credentials; use the AWS credential chain "
                    "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or an instance role)"
                )
        _at_least("s3.workers", self.workers, 1)
        _at_least("s3.retries", self.retries, 0)
        _positive("s3.timeout_s", self.timeout_s)
        _at_least("s3.dvc_jobs", self.dvc_jobs, 0)
        if not _REMOTE_NAME_RE.match(self.dvc_remote):
            raise ParamsError(f"s3.dvc_remote: letters, digits, '_' and '-' only, got {self.dvc_remote!r}")

    def require_bucket(self) -> str:
        """The bucket name; :class:`ParamsError` naming ``s3.bucket`` when it is not set (it is optional in general)."""
        if not self.bucket:
            raise ParamsError("s3.bucket: not set in params.yaml (needed for data.source: s3 and `emassist s3`)")
        return self.bucket

    @property
    def key_prefix(self) -> str:
        """The prefix without surrounding slashes ('' for the whole bucket)."""
        return self.prefix.strip("/")

    def resolved_endpoint_url(self) -> str | None:
        """params first, then the AWS SDKs' own variables, else None (AWS itself)."""
        return self.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


@dataclass(frozen=True)
class Params:
    data: DataParams = field(default_factory=DataParams)
    demo: DemoParams = field(default_factory=DemoParams)
    nffa: NffaParams = field(default_factory=NffaParams)
    ingest: IngestParams = field(default_factory=IngestParams)
    validate: ValidateParams = field(default_factory=ValidateParams)
    split: SplitParams = field(default_factory=SplitParams)
    augment: AugmentParams = field(default_factory=AugmentParams)
    train: TrainParams = field(default_factory=TrainParams)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)
    mlflow: MlflowParams = field(default_factory=MlflowParams)
    orchestration: OrchestrationParams = field(default_factory=OrchestrationParams)
    webapp: WebappParams = field(default_factory=WebappParams)
    monitoring: MonitoringParams = field(default_factory=MonitoringParams)
    watch: WatchParams = field(default_factory=WatchParams)
    batch: BatchParams = field(default_factory=BatchParams)
    s3: S3Params = field(default_factory=S3Params)

    def check(self) -> None:
        for f in dataclasses.fields(self):
            getattr(self, f.name).check()
        if self.ingest.cache_size < self.train.image_size:
            raise ParamsError(
                f"ingest.cache_size: {self.ingest.cache_size} is below train.image_size {self.train.image_size}; "
                "the cached images would be upscaled"
            )
        if self.data.source == "s3" and not self.s3.bucket:
            raise ParamsError("s3.bucket: data.source is s3 but no bucket is set")


# --------------------------------------------------------------------------------------------- loading


def load_params(path: str | os.PathLike[str] = DEFAULT_PARAMS) -> Params:
    """Read and validate ``params.yaml``; raise :class:`ParamsError` naming the bad key."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: params file not found (run from the repository root or pass --params)")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {exc}") from exc
    return params_from_dict(raw)


def params_from_dict(raw: dict[str, Any]) -> Params:
    if not isinstance(raw, dict):
        raise ParamsError("params: the top level must be a mapping of sections")
    hints = typing.get_type_hints(Params)
    sections: dict[str, Any] = {}
    known = {f.name for f in dataclasses.fields(Params)}
    for key in raw:
        if key not in known:
            raise ParamsError(f"{key}: unknown section (known: {', '.join(sorted(known))})")
    for f in dataclasses.fields(Params):
        sections[f.name] = _build(hints[f.name], raw.get(f.name) or {}, f.name)
    params = Params(**sections)
    params.check()
    return params


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ParamsError(f"{prefix}: must be a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in names:
            raise ParamsError(f"{prefix}.{key}: unknown key (known: {', '.join(sorted(names))})")
    values = {}
    for key, value in raw.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            values[key] = _build(hint, value or {}, f"{prefix}.{key}")
        else:
            values[key] = _coerce(f"{prefix}.{key}", hint, value)
    return cls(**values)


def _coerce(key: str, hint: Any, value: Any) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(key, inner[0], value)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ParamsError(f"{key}: must be a list, got {value!r}")
        (item,) = typing.get_args(hint)[:1]
        return tuple(_coerce(f"{key}[{i}]", item, v) for i, v in enumerate(value))
    if hint is bool:
        if not isinstance(value, bool):
            raise ParamsError(f"{key}: must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamsError(f"{key}: must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ParamsError(f"{key}: must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ParamsError(f"{key}: must be a string, got {value!r}")
        return value
    return value


def _at_least(key: str, value: float, low: float) -> None:
    if value < low:
        raise ParamsError(f"{key}: must be >= {low}, got {value}")


def _positive(key: str, value: float) -> None:
    if not value > 0:
        raise ParamsError(f"{key}: must be > 0, got {value}")


def _between(key: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise ParamsError(f"{key}: must be between {low} and {high}, got {value}")


def _below_one(key: str, value: float) -> None:
    if not 0 <= value < 1:
        raise ParamsError(f"{key}: must be >= 0 and below 1, got {value}")


def _fraction(key: str, value: float) -> None:
    if not 0 <= value <= 1:
        raise ParamsError(f"{key}: must be between 0 and 1, got {value}")


def _one_of(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ParamsError(f"{key}: unknown value {value!r} (choose one of: {', '.join(allowed)})")


def check_tiling(tile: int, stride: int, *, tile_key: str = "tile", stride_key: str = "stride") -> None:
    """The one rule for a tile scan's tile side and stride (params.yaml's defaults and every request's values):
    :class:`ParamsError` naming ``tile_key`` / ``stride_key``."""
    if isinstance(tile, bool) or not isinstance(tile, int) or tile < MIN_TILE:
        raise ParamsError(f"{tile_key}: must be an integer >= {MIN_TILE} pixels, got {tile!r}")
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
        raise ParamsError(f"{stride_key}: must be an integer >= 1 pixel, got {stride!r}")
    if stride > tile:
        raise ParamsError(
            f"{stride_key}: {stride} is larger than the tile ({tile_key} {tile}); parts of the image would be skipped"
        )


def check_cron(key: str, value: str) -> None:
    """A 5-field cron expression (minute hour day month weekday), else a ParamsError naming ``key``."""
    fields = value.split()
    if len(fields) != 5 or not all(re.fullmatch(r"[0-9A-Za-z*/,\-?]+", f) for f in fields):
        raise ParamsError(f"{key}: need a 5-field cron expression (minute hour day month weekday), got {value!r}")


def check_weights_file(key: str, value: str | None, what: str) -> None:
    """``value`` is null, ``imagenet`` or an existing local ``.h5`` / ``.weights.h5`` file (else a ParamsError naming
    ``key``): checked when params load, before any work."""
    if value in (None, "imagenet"):
        return
    path = Path(value).expanduser()
    if not path.is_file():
        raise ParamsError(
            f"{key}: weights file {value!r} does not exist "
            f"(use imagenet, null, or the path of a local .h5 / .weights.h5 file of {what})"
        )
    if path.suffix.lower() not in WEIGHTS_SUFFIXES:
        raise ParamsError(f"{key}: {value!r} is not an .h5 / .weights.h5 weights file")


def check_class_names(key: str, names: typing.Iterable[str]) -> None:
    for name in names:
        if name not in CLASSES:
            raise ParamsError(f"{key}: unknown class name {name!r} (known: {', '.join(CLASSES)})")
