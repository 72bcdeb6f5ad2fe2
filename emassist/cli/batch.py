"""``emassist batch SRC --out OUT``: classify an archive of SEM images on Apache Spark with the registered model.

Also a ``spark-submit`` entry point: ``spark-submit [spark options] path/to/emassist/cli/batch.py SRC --out OUT``
(the master comes from spark-submit then; see docs/batch.md).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from emassist.config.settings import load_params
from emassist.pipeline.stagerun import error_exit

DESCRIPTION = (
    "Score every image file under SRC (a folder, hdfs://..., s3a://... where the cluster has the hadoop-aws jars, "
    "or s3://bucket/prefix, mirrored locally first) with a registered model (default: the champion) through "
    "mlflow.pyfunc.spark_udf: the same pyfunc `mlflow models serve` runs. Writes OUT/predictions/ (Parquet, one "
    "row per file: path, sha256, label, calibrated confidence, every class probability, error, needs_review, "
    "model name and version), OUT/summary.csv (per class) and OUT/batch.json. Files over batch.max_file_bytes, "
    "over the model's max_pixels, unreadable, empty or removed while the job runs get a row with the error set, "
    "never a failed job. Folder symlinks are not followed (each file gets one row; a file symlink is a file of its "
    "own). A re-run replaces the output (no duplicated rows); one that matches no file fails before writing "
    "anything, so the previous output stays. Answers go to the prediction log once per image and model version "
    "(a re-run logs only new images). Before the results it says what the model was trained on, with a notice "
    "when that was the synthetic demo data. Needs Java 17 and pip install '.[spark]'."
)
EPILOG = (
    "Exit codes: 0 all files classified; 3 some files failed (see the error column); 1 none classified or the job "
    "could not run; 2 bad params (naming the key). Examples: emassist batch /archive/sem --out results/ "
    "--master 'local[4]' · emassist batch s3://sem-archive/2024 --out results/ · "
    "SPARK_MASTER=spark://head:7077 emassist batch hdfs:///sem --out /shared/results --conf spark.executor.memory=8g"
)


def _conf(items: Sequence[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--conf {item!r}: expected KEY=VALUE (e.g. spark.executor.memory=4g)")
        out[key.strip()] = value
    return out


def _cmd_batch(args: argparse.Namespace) -> int:
    from emassist.pipeline.batch import BatchError, run_batch  # lazy: pyspark/MLflow only for this command

    params = load_params(args.params)
    conf = _conf(args.conf or [])

    try:
        report = run_batch(params, args.src, str(args.out), model=args.model, master=args.master, glob=args.glob,
                           conf=conf, log_predictions=False if args.no_log else None,
                           progress=False if args.no_progress else None,
                           announce=lambda line: print(line, file=sys.stderr))  # fmt: skip
    except BatchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for line in report.lines():
        print(line)
    if report.files == report.errors:
        return 1
    return 3 if report.errors else 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", metavar="SRC", help="folder or URI of the images (searched recursively)")
    p.add_argument("--out", type=Path, required=True, help="output folder (predictions/, summary.csv, batch.json)")
    p.add_argument("--model", help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/... or a pyfunc model folder "
                   "(default: models:/<mlflow.registered_model>@champion)")  # fmt: skip
    p.add_argument("--master", help="Spark master, e.g. local[2], spark://host:7077, yarn "
                   "(default: SPARK_MASTER, else batch.master)")  # fmt: skip
    p.add_argument("--glob", help="file name filter, Spark's pathGlobFilter (default: batch.glob); matching "
                   "nothing is an error and writes nothing")  # fmt: skip
    p.add_argument("--conf", action="append", metavar="KEY=VALUE",
                   help="extra Spark setting, repeatable (e.g. spark.executor.memory=8g)")  # fmt: skip
    p.add_argument("--no-log", action="store_true",
                   help="do not append the answers to the prediction log (monitoring.db_uri; otherwise each "
                   "image once per model version)")  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="no progress bar (the S3 mirror)")


def add_commands(sub: Any) -> None:
    """Register ``batch`` on the ``emassist`` subparsers."""
    p = sub.add_parser(
        "batch",
        help="classify an archive of images on Apache Spark (spark_udf of the registered model); write Parquet",
        description=DESCRIPTION,
        epilog=EPILOG,
    )
    add_arguments(p)
    p.set_defaults(func=_cmd_batch)


def main(argv: Sequence[str] | None = None) -> int:
    """The ``spark-submit`` entry point: the same arguments as ``emassist batch`` (``--params`` first)."""
    parser = argparse.ArgumentParser(prog="batch.py", description=DESCRIPTION, epilog=EPILOG)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file (default: params.yaml)")
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return _cmd_batch(args)
    except (ValueError, OSError, RuntimeError) as exc:
        return error_exit(exc, args.params)


if __name__ == "__main__":
    sys.exit(main())
