"""Training benchmark: the tf.data input pipeline alone against the training step it has to feed.

Builds a throw-away dataset in a temp folder (``emassist.data.demo.generate_demo`` → ``run_ingest`` → a
:class:`~emassist.data.dataset.SplitData` of the manifest) and measures, in images/s, the median of ``--repeats`` timed
windows taken after a warm-up (the first epoch of the input pipeline, the first training step with its trace,
are never timed):

* **input**: ``make_dataset(training=True, cache=False, augmentation=<params.yaml policy>)`` iterated on its own,
  so every window pays PNG decode + resize + online augmentation (``--policy``), as in the first epoch of a real run;
* **train**: ``model.train_on_batch`` on batches pulled from that same pipeline (augmentation on), for
  ``simple_cnn`` and ``compact_cnn`` at the smallest size and ``xception`` (``weights=None``; the ``head`` phase,
  then the ``finetune`` phase with ``--finetune-blocks`` blocks unfrozen) at every size; at sizes >= 224 px
  xception uses ``--large-batch-size`` / ``--large-steps`` so the CPU run stays short;
* **ratio** input / train for each model row, against the goal of >= 3 (the input never starves the model).

With a GPU visible, the largest xception size is also timed under ``mixed_float16``.

    TF_CPP_MIN_LOG_LEVEL=2 python bench/bench_training.py            # defaults: 128 and 299 px, ~5-8 min on 2 cores
    python bench/bench_training.py --quick                           # smoke test, about a minute
    python bench/bench_training.py --models xception --sizes 299 --repeats 5

Prints a Markdown table on stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from emassist.config.choices import MODEL_NAMES
from emassist.config.classes import CLASSES

if TYPE_CHECKING:
    from emassist.config.settings import PolicyParams
    from emassist.data.dataset import SplitData

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow is first imported (lazily, below)


GOAL_RATIO = 3.0
LARGE_SIZE = 224  # xception at this size or above uses --large-batch-size / --large-steps
SMALL_MODELS = ("simple_cnn", "compact_cnn")  # run at the smallest size only (simple_cnn's Dense grows with S²)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass
class Row:
    kind: str  # "input" | "train"
    label: str
    size: int
    batch: int
    images: int  # images per timed window
    rates: list[float]
    first_s: float | None = None  # train rows: the first step (trace + compile), excluded from the rates
    ratio: float | None = None

    @property
    def median(self) -> float:
        return statistics.median(self.rates)


# ------------------------------------------------------------------------------------------------- dataset


def build_split(work: Path, *, n_images: int, side: int, seed: int) -> SplitData:
    """generate_demo → run_ingest (cache_size = ``side``) → one SplitData over every accepted image."""
    import pandas as pd

    from emassist.config.settings import DemoParams
    from emassist.data.dataset import SplitData
    from emassist.data.demo import generate_demo
    from emassist.data.ingest import run_ingest

    raw, interim = work / "raw", work / "interim"
    t0 = time.perf_counter()
    demo = DemoParams(n_images=n_images, width=side, height=side, seed=seed,
                      min_per_class=max(1, min(10, n_images // len(CLASSES))), tif_fraction=0.1,
                      databar_fraction=0.8)  # fmt: skip
    demo.check()
    generate_demo(raw, demo, workers=0, progress=False)
    t1 = time.perf_counter()
    run_ingest(
        raw,
        interim,
        classes=CLASSES,
        cache_size=side,
        max_pixels=100_000_000,
        min_side=16,
        crop_databar=True,
        workers=0,
        progress=False,
    )
    t2 = time.perf_counter()
    frame = pd.read_parquet(interim / "manifest.parquet")
    if frame.empty:
        raise RuntimeError("ingest accepted no image; cannot benchmark")
    index = {c: i for i, c in enumerate(CLASSES)}
    paths = [str(interim / p) for p in frame["image_path"]]
    labels = frame["label"].map(index).to_numpy(dtype="int32")
    log(f"dataset: {len(paths)} images, {side}x{side} (generate {t1 - t0:.1f} s, ingest {t2 - t1:.1f} s)")
    return SplitData("bench", paths, labels)


def training_dataset(split: SplitData, size: int, batch: int, policy: PolicyParams, seed: int) -> Any:
    """An endless make_dataset(training=True, cache=False, augmentation on)."""
    from emassist.data.dataset import make_dataset
    from emassist.model.online_augment import build_augmentation

    return make_dataset(
        split,
        image_size=size,
        batch_size=batch,
        training=True,
        cache=False,
        shuffle_buffer=2048,
        seed=seed,
        augmentation=build_augmentation(policy, seed),
    ).repeat()


# ---------------------------------------------------------------------------------------------- measuring


def bench_input(
    split: SplitData, size: int, batch: int, policy: PolicyParams, seed: int, *, window_images: int, repeats: int
) -> Row:
    """Pull batches as fast as possible; the first epoch (tracing, buffers filling) is not timed."""
    it = iter(training_dataset(split, size, batch, policy, seed))
    for _ in range(math.ceil(len(split) / batch)):
        next(it)
    n_batches = max(1, math.ceil(window_images / batch))
    rates: list[float] = []
    for _ in range(repeats):
        seen = 0
        t0 = time.perf_counter()
        for _ in range(n_batches):
            x, _y = next(it)
            seen += int(x.shape[0])
        rates.append(seen / (time.perf_counter() - t0))
    row = Row("input", "input pipeline: decode + resize + augment (no cache)", size, batch, seen, rates)
    log(f"  input {size:>3} px, batch {batch:>2}: {row.median:7.1f} img/s  {_spread(rates)}")
    return row


def bench_train(
    model: Any, batches: Any, *, label: str, size: int, batch: int, steps: int, repeats: int, warmup_steps: int
) -> Row:
    """``steps`` train_on_batch calls per window; the first call (trace) and ``warmup_steps`` more are not timed.

    ``train_on_batch`` returns its logs as NumPy values, so every call waits for its step to finish.
    """
    x, y = next(batches)
    t0 = time.perf_counter()
    model.train_on_batch(x, y)
    first_s = time.perf_counter() - t0
    for _ in range(warmup_steps):
        x, y = next(batches)
        model.train_on_batch(x, y)
    rates: list[float] = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            x, y = next(batches)
            model.train_on_batch(x, y)
        rates.append(steps * batch / (time.perf_counter() - t0))
    row = Row("train", label, size, batch, steps * batch, rates, first_s=first_s)
    log(
        f"  {label:<40} {size:>3} px, batch {batch:>2}: {row.median:7.2f} img/s  {_spread(rates)}, "
        f"first step {first_s:.1f} s"
    )
    return row


def _spread(rates: Sequence[float]) -> str:
    return f"(min {min(rates):.1f}, max {max(rates):.1f})"


def train_rows(
    split: SplitData,
    name: str,
    size: int,
    batch: int,
    *,
    policy: PolicyParams,
    args: argparse.Namespace,
    steps: int,
    warmup_steps: int,
    dtype_policy: str | None = None,
) -> list[Row]:
    """Build ``name`` at ``size`` and time it (xception: head, then finetune with the same model)."""
    import keras
    import tensorflow as tf

    from emassist.model.builders import build_model
    from emassist.model.phases import compile_model, set_phase

    keras.backend.clear_session()
    gc.collect()
    keras.utils.set_random_seed(args.seed)
    # Built before any dtype policy: the augmentation layers must hand float32 to the model, as in training.
    batches = iter(
        training_dataset(split, size, batch, policy, args.seed).filter(lambda x, y: tf.shape(x)[0] == batch)
    )  # full batches only: a partial one would retrace the step function inside a timed window
    suffix = f", {dtype_policy}" if dtype_policy else ""
    rows: list[Row] = []
    try:
        if dtype_policy:
            keras.mixed_precision.set_global_policy(dtype_policy)
        model = build_model(name, num_classes=len(CLASSES), image_size=size, weights=None, seed=args.seed)
        phases: list[tuple[str, float, str]] = [("head", args.learning_rate, name)]
        if name == "xception":
            phases = [
                ("head", args.learning_rate, "xception, head phase"),
                ("finetune", args.finetune_learning_rate, f"xception, finetune ({args.finetune_blocks} blocks)"),
            ]
        for phase, lr, label in phases:
            set_phase(model, phase, finetune_blocks=args.finetune_blocks)
            compile_model(model, optimizer=args.optimizer, learning_rate=lr)
            rows.append(
                bench_train(
                    model,
                    batches,
                    label=f"train {label}{suffix}",
                    size=size,
                    batch=batch,
                    steps=steps,
                    repeats=args.repeats,
                    warmup_steps=warmup_steps,
                )
            )
        del model
    finally:
        if dtype_policy:
            keras.mixed_precision.set_global_policy("float32")
    return rows


# ------------------------------------------------------------------------------------------------ planning


@dataclass(frozen=True)
class Job:
    model: str
    size: int
    batch: int
    steps: int
    dtype_policy: str | None = None


def plan(args: argparse.Namespace, gpu: bool) -> list[Job]:
    small = min(args.sizes)
    jobs: list[Job] = []
    for name in args.models:
        if name in SMALL_MODELS:
            jobs.append(Job(name, small, args.batch_size, args.steps))
            continue
        for size in args.sizes:
            large = size >= LARGE_SIZE
            batch = args.large_batch_size if large else args.batch_size
            jobs.append(Job(name, size, batch, args.large_steps if large else args.steps))
    if gpu and "xception" in args.models:
        big = max(args.sizes)
        last = next(j for j in jobs if j.model == "xception" and j.size == big)
        jobs.append(Job("xception", big, last.batch, last.steps, "mixed_float16"))
    return jobs


# --------------------------------------------------------------------------------------------------- output


def print_table(rows: list[Row], *, header: str, notes: list[str]) -> None:
    print(f"\n### {header}\n")
    for note in notes:
        print(note)
    print()
    print(
        "| measurement | px | batch | images / window | images / s (median) | min – max | first step s | "
        "input / train |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        first = f"{r.first_s:.1f}" if r.first_s is not None else ""
        ratio = "" if r.ratio is None else f"**{r.ratio:.1f}** {'✓' if r.ratio >= GOAL_RATIO else '✗'}"
        rate = f"{r.median:.1f}" if r.median >= 10 else f"{r.median:.2f}"
        print(
            f"| {r.label} | {r.size} | {r.batch} | {r.images} | {rate} | "
            f"{min(r.rates):.1f} – {max(r.rates):.1f} | {first} | {ratio} |"
        )


# ----------------------------------------------------------------------------------------------------- main


def _int_list(text: str) -> list[int]:
    try:
        values = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from exc
    if not values:
        raise argparse.ArgumentTypeError("expected at least one size")
    return values


def _model_list(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [n for n in names if n not in MODEL_NAMES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown model(s) {unknown or text!r}; choose from {', '.join(MODEL_NAMES)}")
    return list(dict.fromkeys(names))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python bench/bench_training.py",
        description="Time the tf.data input pipeline (decode + resize + online augmentation, no cache) on its own "
        "and the training step of each model fed by it (train_on_batch), as images/s: median of --repeats timed "
        "windows after a warm-up. Reports input/train per model row (goal >= 3: the input never starves the "
        "model). Builds its own throw-away dataset (demo images → ingest) in a temp folder; prints a Markdown "
        "table.",
        epilog="simple_cnn and compact_cnn run at the smallest --sizes value; xception (weights=None) at every size, "
        f"head phase and finetune phase, with --large-batch-size/--large-steps at sizes >= {LARGE_SIZE}. With a GPU "
        "visible, xception at the largest size is also timed under mixed_float16.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--sizes", type=_int_list, default="128,299", help="model input sizes in px, comma-separated")
    parser.add_argument("--models", type=_model_list, default=",".join(MODEL_NAMES), help="models, comma-separated")
    parser.add_argument("--batch-size", type=int, default=32, help="batch size (input rows and small-size models)")
    parser.add_argument("--steps", type=int, default=10, help="timed training steps per window")
    parser.add_argument("--large-batch-size", type=int, default=8, help=f"xception batch size at >= {LARGE_SIZE} px")
    parser.add_argument("--large-steps", type=int, default=3, help=f"xception steps per window at >= {LARGE_SIZE} px")
    parser.add_argument("--warmup-steps", type=int, default=2, help="untimed steps after the first (traced) one")
    parser.add_argument("--repeats", type=int, default=3, help="timed windows per measurement; the median is kept")
    parser.add_argument("--input-images", type=int, default=640, help="images per timed window of the input rows")
    parser.add_argument("--n-images", type=int, default=200, help="demo images to generate")
    parser.add_argument("--image-side", type=int, default=320, help="side of the demo images and ingest cache_size")
    parser.add_argument("--finetune-blocks", type=int, default=2, help="xception blocks unfrozen in the finetune row")
    parser.add_argument("--optimizer", default="adam", choices=("adam", "rmsprop", "sgd"), help="optimizer")
    parser.add_argument("--learning-rate", type=float, default=1e-3, help="learning rate (head / small models)")
    parser.add_argument("--finetune-learning-rate", type=float, default=1e-4, help="learning rate (finetune)")
    parser.add_argument(
        "--params",
        type=Path,
        default=Path("params.yaml"),
        help="params file whose augmentation policy is used (if missing: the dataclass defaults, equal to params.yaml)",
    )
    parser.add_argument(
        "--policy",
        choices=("online", "offline"),
        default="online",
        help="online: augment.online_policy (what training applies to its batches); offline: augment.policy",
    )
    parser.add_argument("--seed", type=int, default=42, help="seed of the demo data, shuffling, augmentation, models")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny smoke run: 40 images of 128 px, --sizes 96, batch 8, 2 steps, 1 repeat",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.n_images, args.image_side, args.sizes = 40, 128, [96]
        args.batch_size = args.large_batch_size = 8
        args.steps = args.large_steps = 2
        args.warmup_steps, args.repeats, args.input_images = 1, 1, 64
    for key in ("batch_size", "steps", "large_batch_size", "large_steps", "repeats", "input_images"):
        if getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be >= 1")
    if args.warmup_steps < 0:
        parser.error("--warmup-steps must be >= 0")
    if args.n_images < len(CLASSES):
        parser.error(f"--n-images must be >= {len(CLASSES)} (one per class)")
    if "xception" in args.models and min(args.sizes) < 71:
        parser.error("xception needs --sizes >= 71")
    if min(args.sizes) < 8:
        parser.error("--sizes must be >= 8")
    if max(args.sizes) > args.image_side:
        log(f"warning: --sizes up to {max(args.sizes)} px exceed --image-side {args.image_side}: images are upscaled")
    return args


def load_policy(path: Path, which: str = "online") -> tuple[PolicyParams, str]:
    from emassist.config.settings import AugmentParams, load_params

    if path.is_file():
        augment = load_params(path).augment
        policy = augment.online_policy if which == "online" else augment.policy
        key = "augment.online_policy" if which == "online" else "augment.policy"
        return policy, f"{key} of {path}"
    defaults = AugmentParams()  # the dataclass defaults are params.yaml's (tested)
    return (defaults.online_policy if which == "online" else defaults.policy), f"{which} policy of params.yaml defaults"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    policy, policy_source = load_policy(args.params, args.policy)

    import keras
    import tensorflow as tf

    gpu = bool(tf.config.list_physical_devices("GPU"))
    jobs = plan(args, gpu)
    input_keys: list[tuple[int, int]] = [(s, args.batch_size) for s in args.sizes]
    input_keys += [(j.size, j.batch) for j in jobs if (j.size, j.batch) not in input_keys]
    cores = os.cpu_count() or 1
    load_before = os.getloadavg()[0]

    work = Path(tempfile.mkdtemp(prefix="bench_training."))
    rows: list[Row] = []
    try:
        split = build_split(work, n_images=args.n_images, side=args.image_side, seed=args.seed)
        log("input pipeline alone:")
        inputs: dict[tuple[int, int], Row] = {}
        for size, batch in input_keys:
            inputs[(size, batch)] = bench_input(
                split, size, batch, policy, args.seed, window_images=args.input_images, repeats=args.repeats
            )
        rows.extend(inputs.values())
        log("training (train_on_batch, fed by the same pipeline):")
        for job in jobs:
            for row in train_rows(
                split,
                job.model,
                job.size,
                job.batch,
                policy=policy,
                args=args,
                steps=job.steps,
                warmup_steps=args.warmup_steps,
                dtype_policy=job.dtype_policy,
            ):
                row.ratio = inputs[(job.size, job.batch)].median / row.median
                rows.append(row)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        keras.backend.clear_session()
    wall = time.perf_counter() - started
    load_after = os.getloadavg()[0]

    train = [r for r in rows if r.kind == "train"]
    worst = min(train, key=lambda r: r.ratio or math.inf) if train else None
    device = ", ".join(d.name for d in tf.config.list_physical_devices("GPU")) or "CPU only"
    notes = [
        f"TensorFlow {tf.__version__}, Keras {keras.__version__}; {cores} cores, {device}; "
        f"{len(split)} demo images ({args.image_side} px, ingest cache_size {args.image_side}); "
        f"augmentation policy from {policy_source}; optimizer {args.optimizer}.",
        f"Median of {args.repeats} timed window(s) after a warm-up (input: one full epoch; train: the first step, "
        f"whose trace time is shown, plus {args.warmup_steps} more step(s)). 1-min load average "
        f"{load_before:.1f} before, {load_after:.1f} after; wall time {wall:.0f} s.",
        "Train rows include pulling their batches from the pipeline (prefetch overlaps it with the step, but it "
        f"shares the same cores). input / train compares the input row of the same px and batch; goal >= "
        f"{GOAL_RATIO:g}.",
    ]
    print_table(rows, header=f"Training benchmark ({'quick' if args.quick else 'default'} run)", notes=notes)
    if worst is not None and worst.ratio is not None:
        verdict = "met for every model row" if worst.ratio >= GOAL_RATIO else "missed"
        print(
            f"\nlowest input / train = **{worst.ratio:.1f}** ({worst.label}, {worst.size} px): goal >= "
            f"{GOAL_RATIO:g} {verdict}."
        )
    print(f"\nwall time: {wall:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
