"""The train stage's job: the model named in params, trained on the augmented train list, tracked in one MLflow run.

tf.data (:mod:`emassist.data.dataset`, with the online augmentation of :mod:`emassist.model.online_augment`) →
simple_cnn | compact_cnn | xception (:mod:`emassist.model.builders`; xception in two phases,
:mod:`emassist.model.phases`) → the serving copy, history and curves under ``models/`` (:mod:`emassist.model.files`).
The run is tagged as the train stage's; a SIGTERM/SIGINT marks it KILLED, and runs earlier trainings left RUNNING
(their process gone) are closed as FAILED when a training starts (:mod:`emassist.model.tracking`).
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from emassist.config.settings import Params
from emassist.core.atomic import atomic_open
from emassist.data.dataset import DatasetError, SplitData, class_weights, make_dataset, read_split
from emassist.model.files import CURVES_FILE, HISTORY_FILE, MODEL_DIR, MODEL_FILE, RUN_FILE
from emassist.model.reports import plot_training_curves
from emassist.model.tracking import (
    close_orphaned_runs,
    end_run_on_signal,
    flat_params,
    process_tags,
    run_tags,
    setup_mlflow,
)

log = logging.getLogger(__name__)
STAGE = "train"


@dataclass
class TrainResult:
    run_id: str
    history: dict[str, list[float]]
    phase_boundaries: list[int]
    seconds: float
    images_per_second: float


def train_split_csv(params: Params) -> Path:
    """The training list: ``data.augmented_dir/train.csv``, written by the augment stage (never the plain split)."""
    augmented = Path(params.data.augmented_dir) / "train.csv"
    if not augmented.is_file():
        raise DatasetError(
            f"{augmented}: the augmented training list is missing: run the augment stage first (dvc repro augment)"
        )
    return augmented


def manifest_path(params: Params) -> Path:
    """Ingest's manifest (the pixel size and width of every image, for a scale-aware model)."""
    return Path(params.data.interim_dir) / "manifest.parquet"


def load_splits(params: Params) -> tuple[SplitData, SplitData]:
    """The train and val lists; with ``train.scale_input``, with every image's pixel size and width."""
    classes = params.data.classes
    manifest = manifest_path(params) if params.train.scale_input else None
    return (
        read_split(train_split_csv(params), classes, manifest=manifest),
        read_split(Path(params.data.splits_dir) / "val.csv", classes, manifest=manifest),
    )


def _epoch_logger(offset: list[int]) -> Any:
    """Keras callback logging every epoch's metrics of both phases on one continuous step axis."""
    import keras  # lazy: Keras and MLflow take seconds to import
    import mlflow

    class MlflowEpochLogger(keras.callbacks.Callback):
        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            logs = dict(logs or {})
            logs["learning_rate"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
            mlflow.log_metrics({k: float(v) for k, v in logs.items()}, step=offset[0] + epoch)

    return MlflowEpochLogger()


def _callbacks(params: Params, offset: list[int]) -> list[Any]:
    """Early stopping (best weights restored), ReduceLROnPlateau unless the rate follows a cosine schedule, and
    the per-epoch MLflow logger."""
    import keras  # lazy, as above

    t = params.train
    callbacks: list[Any] = [
        keras.callbacks.EarlyStopping(
            monitor="val_loss", patience=t.early_stopping_patience, restore_best_weights=True, verbose=1
        )
    ]
    if t.lr_schedule == "plateau":
        callbacks.append(
            keras.callbacks.ReduceLROnPlateau(
                monitor="val_loss", factor=t.reduce_lr_factor, patience=t.reduce_lr_patience, verbose=1
            )
        )
    callbacks.append(_epoch_logger(offset))
    return callbacks


def _strategy() -> Any:
    import tensorflow as tf  # lazy: TensorFlow takes seconds to import

    gpus = tf.config.list_logical_devices("GPU")
    if len(gpus) > 1:
        log.info("%d GPUs visible: MirroredStrategy", len(gpus))
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


def train(params: Params) -> TrainResult:
    """Run the whole training (both phases) inside one MLflow run; write models/ atomically."""
    train_split, val_split = load_splits(params)  # fails on bad inputs before anything heavy starts
    # Lazy: these import Keras / MLflow (seconds), which the CLI and the other stages do not need.
    import keras
    import mlflow

    from emassist.model.builders import build_model
    from emassist.model.online_augment import build_augmentation
    from emassist.model.phases import compile_model, count_params, set_phase
    from emassist.model.saving import save_serving_copy
    from emassist.model.scale import split_scale

    t = params.train
    keras.utils.set_random_seed(t.seed)
    if t.mixed_precision:
        keras.mixed_precision.set_global_policy("mixed_float16")
    augmentation = build_augmentation(params.augment.online_policy, seed=t.seed) if params.augment.online else None
    common = {"image_size": t.image_size, "batch_size": t.batch_size, "cache": t.cache, "seed": t.seed}
    train_scale = val_scale = None
    if t.scale_input:
        train_scale, val_scale = split_scale(train_split, t.image_size), split_scale(val_split, t.image_size)
        for split in (train_split, val_split):
            known = split.n_known_pixel_sizes
            (log.info if known else log.warning)(
                "scale input: %d of %d %s images have a known pixel size%s", known, len(split), split.name,
                "" if known else " (no TIFF tags and ingest.read_databar false?): the scale input learns nothing",
            )  # fmt: skip
    train_ds = make_dataset(
        train_split, training=True, shuffle_buffer=t.shuffle_buffer, augmentation=augmentation,
        scale=train_scale, scale_dropout=t.scale_dropout, **common,
    )  # fmt: skip
    val_ds = make_dataset(val_split, training=False, scale=val_scale, **common)
    weights = class_weights(train_split.labels, len(params.data.classes)) if t.class_weights else None

    setup_mlflow(params)
    experiment = mlflow.get_experiment_by_name(params.mlflow.experiment)
    if experiment is not None:
        close_orphaned_runs(experiment.experiment_id, STAGE)
    verbose = 1 if sys.stdout.isatty() else 2
    history: dict[str, list[float]] = {}
    boundaries: list[int] = []
    started = time.perf_counter()
    seen_images = 0
    with end_run_on_signal(), mlflow.start_run(run_name=f"{t.model}-{t.image_size}px", tags=process_tags(STAGE)) as run:
        mlflow.log_params(flat_params(params))
        mlflow.set_tags(run_tags(params))
        mlflow.log_params({"n_train": len(train_split), "n_val": len(val_split)})
        if t.scale_input:
            mlflow.log_params({"n_train_pixel_size_known": train_split.n_known_pixel_sizes,
                               "n_val_pixel_size_known": val_split.n_known_pixel_sizes})  # fmt: skip
        with _strategy().scope():
            model = build_model(
                t.model,
                num_classes=len(params.data.classes),
                image_size=t.image_size,
                weights=t.weights,
                dropout=t.dropout,
                seed=t.seed,
                scale_input=t.scale_input,
            )
        phases = [("head", t.epochs, t.learning_rate)]
        if t.model == "xception" and t.finetune_epochs > 0:
            phases.append(("finetune", t.finetune_epochs, t.finetune_learning_rate))
        offset = [0]
        for phase, epochs, lr in phases:
            set_phase(model, phase, finetune_blocks=t.finetune_blocks)
            steps = epochs * math.ceil(len(train_split) / t.batch_size) if t.lr_schedule == "cosine" else None
            compile_model(
                model, optimizer=t.optimizer, learning_rate=lr, jit_compile=t.xla, decay_steps=steps,
                label_smoothing=t.label_smoothing,
            )  # fmt: skip
            trainable, frozen = count_params(model)
            log.info(
                "phase %s: %d epochs at lr %g; %d trainable / %d frozen params", phase, epochs, lr, trainable, frozen
            )
            mlflow.log_params({f"{phase}.trainable_params": trainable, f"{phase}.frozen_params": frozen})
            fit = model.fit(
                train_ds, validation_data=val_ds, epochs=epochs, class_weight=weights, shuffle=False,
                callbacks=_callbacks(params, offset), verbose=verbose,
            )  # fmt: skip
            ran = len(fit.history.get("loss", []))
            seen_images += ran * len(train_split)
            for key, values in fit.history.items():
                history.setdefault(key, []).extend(float(v) for v in values)
            offset[0] += ran
            boundaries.append(offset[0])
        seconds = time.perf_counter() - started

        MODEL_DIR.mkdir(parents=True, exist_ok=True)
        save_serving_copy(model, MODEL_FILE)
        plot_training_curves(history, CURVES_FILE, phase_boundaries=boundaries[:-1])
        with atomic_open(HISTORY_FILE) as fh:
            json.dump({"history": history, "phase_boundaries": boundaries[:-1]}, fh, indent=2)
        throughput = seen_images / seconds if seconds else 0.0
        mlflow.log_metrics({"train_seconds": seconds, "train_images_per_second": throughput})
        mlflow.log_artifact(str(CURVES_FILE), artifact_path="plots")
        mlflow.log_artifact(str(HISTORY_FILE))
        mlflow.log_artifact(str(MODEL_FILE), artifact_path="model")
        run_id = run.info.run_id
    with atomic_open(RUN_FILE) as fh:
        json.dump({"run_id": run_id, "tracking_uri": mlflow.get_tracking_uri()}, fh, indent=2)
    return TrainResult(run_id, history, boundaries[:-1], seconds, throughput)
