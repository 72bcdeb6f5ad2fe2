"""Benchmark the ingest stage against the floor of a bare Pillow decode loop.

Generates ``--n`` synthetic SEM images (``emassist.data.demo.generate_demo`` when available, else a small built-in
JPEG generator), then measures, each as the median of ``--repeats`` runs:

* floor: ``PIL.Image.open(p).load()`` over every file, one process;
* the per-image stages of ingest in one process: read, decode, hash (sha256 + dhash), standardize (data bar +
  resize), write (PNG);
* the full ``run_ingest`` with all cores (``--workers 0``).

Prints a Markdown table and the ratio ingest/floor (target >= 0.6).

    python bench/bench_ingest.py --n 1000 --repeats 3
"""

from __future__ import annotations

import argparse
import hashlib
import multiprocessing
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from emassist.config.classes import CLASSES
from emassist.data.databar import find_databar
from emassist.data.decode import decode_image
from emassist.data.hashing import dhash
from emassist.data.ingest import _cpu_count, run_ingest
from emassist.data.preprocess import Preprocessor

STAGES = ("read", "decode", "hash", "standardize", "write")


def _fallback_generate(out: Path, n: int, width: int, height: int, seed: int) -> None:
    """Textured grayscale JPEGs, 80% with a black data bar, spread over the class folders."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        folder = out / CLASSES[i % len(CLASSES)]
        folder.mkdir(parents=True, exist_ok=True)
        small = rng.normal(0, 1, (height // 16 + 1, width // 16 + 1)).astype(np.float32)
        relief = np.asarray(Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC))
        arr = np.clip(relief * 40 + 120 + rng.normal(0, 15, (height, width)), 0, 255).astype(np.uint8)
        im = Image.fromarray(arr)
        if rng.random() < 0.8:
            bar = int(height * rng.uniform(0.08, 0.12))
            draw = ImageDraw.Draw(im)
            draw.rectangle([0, height - bar, width, height], fill=0)
            draw.text((10, height - bar + 5), "HV 5.00 kV   mag 50 000 x   WD 4.1 mm", fill=255)
        im.save(folder / f"img_{i:05d}.jpg", quality=90)


def generate(out: Path, n: int, width: int, height: int, seed: int) -> str:
    try:
        from emassist.data.demo import generate_demo
    except ImportError:
        _fallback_generate(out, n, width, height, seed)
        return "built-in JPEG generator"
    from emassist.config.settings import DemoParams

    demo = DemoParams(n_images=n, width=width, height=height, seed=seed, min_per_class=max(1, min(40, n // 20)),
                      tif_fraction=0.1, databar_fraction=0.8)  # fmt: skip
    demo.check()
    generate_demo(out, demo, progress=True)
    return "emassist.data.demo.generate_demo (jpg/png/16-bit tif)"


def list_files(raw: Path) -> list[Path]:
    return sorted(p for p in raw.rglob("*") if p.is_file())


def time_floor(files: list[Path]) -> float:
    started = time.perf_counter()
    for path in files:
        with Image.open(path) as im:
            im.load()
    return time.perf_counter() - started


def _floor_chunk(files: list[Path]) -> None:
    for path in files:
        with Image.open(path) as im:
            im.load()


def time_floor_parallel(files: list[Path], workers: int) -> float:
    """The same bare loop split over ``workers`` processes: what this machine's cores really give."""
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        started = time.perf_counter()
        pool.map(_floor_chunk, [files[i::workers] for i in range(workers)])
        return time.perf_counter() - started


def time_stages(files: list[Path], out: Path, cache_size: int) -> dict[str, float]:
    """Seconds spent per stage over all files, in one process (what one worker does per image)."""
    totals = dict.fromkeys(STAGES, 0.0)
    out.mkdir(parents=True, exist_ok=True)
    clock = time.perf_counter
    pre = Preprocessor(cache_size=cache_size, crop_databar=True, max_pixels=100_000_000, min_side=16)
    for path in files:
        t0 = clock()
        data = path.read_bytes()
        t1 = clock()
        decoded = pre.decode(data)
        t2 = clock()
        std, _ = pre.standardize(decoded.gray)
        t3 = clock()
        hashlib.sha256(data).hexdigest()
        dhash(std)
        t4 = clock()
        Image.fromarray(std).save(out / f"{path.stem}.png", format="PNG", compress_level=1)
        t5 = clock()
        for stage, seconds in zip(STAGES, (t1 - t0, t2 - t1, t4 - t3, t3 - t2, t5 - t4), strict=True):
            totals[stage] += seconds
    return totals


def time_ingest(raw: Path, out: Path, cache_size: int, workers: int) -> float:
    started = time.perf_counter()
    run_ingest(
        raw,
        out,
        classes=CLASSES,
        cache_size=cache_size,
        max_pixels=100_000_000,
        min_side=16,
        crop_databar=True,
        workers=workers,
        progress=False,
    )
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python bench/bench_ingest.py",
        description="Time ingest (decode/hash/standardize/write, and run_ingest on all cores) against a bare "
        "Pillow open+load loop. Prints a Markdown table.",
    )
    parser.add_argument("--n", type=int, default=1000, help="number of images to generate (default: 1000)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement; the median is kept (3)")
    parser.add_argument("--width", type=int, default=1024, help="image width (default: 1024)")
    parser.add_argument("--height", type=int, default=768, help="image height (default: 768)")
    parser.add_argument("--cache-size", type=int, default=256, help="ingest cache_size (default: 256)")
    parser.add_argument("--workers", type=int, default=0, help="run_ingest workers (default: 0 = all cores)")
    parser.add_argument("--seed", type=int, default=0, help="generator seed (default: 0)")
    parser.add_argument("--data", type=Path, help="keep/reuse the generated images in this folder")
    args = parser.parse_args(argv)
    if args.n < 10 or args.repeats < 1:
        parser.error("--n must be >= 10 and --repeats >= 1")

    work = Path(tempfile.mkdtemp(prefix="bench_ingest."))
    try:
        raw = args.data or work / "raw"
        if raw.is_dir() and len(list_files(raw)) == args.n:
            source = f"reused {raw}"
        else:
            t0 = time.perf_counter()
            source = generate(raw, args.n, args.width, args.height, args.seed)
            print(f"generated {args.n} images in {time.perf_counter() - t0:.0f} s with {source}", file=sys.stderr)
        files = list_files(raw)
        n = len(files)
        size_mb = sum(p.stat().st_size for p in files) / 1e6

        # Warm up what a long-running process has already paid for: imports (pandas, pyarrow) and the page cache.
        time_ingest(raw, work / "warmup", args.cache_size, args.workers)
        shutil.rmtree(work / "warmup", ignore_errors=True)
        load_before = os.getloadavg()[0]
        floors: list[float] = []
        par_floors: list[float] = []
        stage_runs: list[dict[str, float]] = []
        ingests: list[float] = []
        workers = min(args.workers or _cpu_count(), n)
        for r in range(args.repeats):  # interleaved, so that load from elsewhere hits all of them alike
            floors.append(time_floor(files))
            par_floors.append(time_floor_parallel(files, workers))
            stage_runs.append(time_stages(files, work / f"stages{r}", args.cache_size))
            ingests.append(time_ingest(raw, work / f"out{r}", args.cache_size, args.workers))
            print(f"run {r + 1}: floor {n / floors[-1]:.0f}/s, ingest {n / ingests[-1]:.0f}/s", file=sys.stderr)
        load_after = os.getloadavg()[0]

        floor_s = statistics.median(floors)
        ingest_s = statistics.median(ingests)
        stage_s = {s: statistics.median(run[s] for run in stage_runs) for s in STAGES}
        one_core_s = sum(stage_s.values())
        floor_ips, ingest_ips = n / floor_s, n / ingest_s
        par_floor_ips = n / statistics.median(par_floors)
        bar_s = statistics.median(_time_databar(files[: min(n, 200)]) for _ in range(args.repeats))

        print(f"\n### Ingest benchmark: {n} images, {args.width}x{args.height}, {size_mb:.0f} MB ({source})\n")
        print(
            f"{_cpu_count()} cores, run_ingest workers={workers}, cache_size={args.cache_size}; median of "
            f"{args.repeats} runs; 1-min load average {load_before:.1f} before, {load_after:.1f} after\n"
        )
        print("| measurement | ms / image | images / s |")
        print("|---|---:|---:|")
        print(f"| floor: `Image.open(p).load()`, 1 process | {1000 * floor_s / n:.2f} | {floor_ips:.0f} |")
        print(f"| floor split over {workers} processes (the cores' real capacity) | "
              f"{1000 / par_floor_ips:.2f} | {par_floor_ips:.0f} |")  # fmt: skip
        for stage in STAGES:
            print(f"| ingest stage: {stage}, 1 process | {1000 * stage_s[stage] / n:.2f} | |")
        print(f"| (of which find_databar) | {1000 * bar_s:.2f} | |")
        print(f"| ingest stages summed, 1 process | {1000 * one_core_s / n:.2f} | {n / one_core_s:.0f} |")
        print(f"| **`run_ingest`, {workers} workers** (wall, incl. scan + tables) | "
              f"{1000 * ingest_s / n:.2f} | **{ingest_ips:.0f}** |")  # fmt: skip
        verdict = "meets" if ingest_ips / floor_ips >= 0.6 else "misses"
        print(f"\nratio ingest / floor = **{ingest_ips / floor_ips:.2f}** ({verdict} the 0.6 target); "
              f"ingest / floor on {workers} processes = {ingest_ips / par_floor_ips:.2f}")  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def _time_databar(files: list[Path]) -> float:
    """Mean seconds of find_databar alone per image (it is part of the standardize stage)."""
    grays = [decode_image(p, max_pixels=100_000_000, min_side=16).gray for p in files]
    t0 = time.perf_counter()
    for g in grays:
        find_databar(g)
    return (time.perf_counter() - t0) / max(1, len(grays))


if __name__ == "__main__":
    sys.exit(main())
