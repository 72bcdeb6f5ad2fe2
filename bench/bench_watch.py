"""The folder watcher's timings: latency from a file being complete to its result, burst throughput against
``emassist predict``'s path over the same files, and peak memory for 10,000 files at once.

Model: ``train.model`` at ``train.image_size`` from params.yaml, untrained unless ``--model`` names a ``.keras``
file (the weights do not change the timings). Images: demo PNGs (``--side`` px, data bar included).

* **latency**: the watcher runs in this process (inotify, the params' ``watch.settle_s``); ``--latency-files``
  files are written one at a time, ``--gap`` s apart; latency = result seen by a listener − the file closed by the
  writer. It includes ``watch.settle_s`` by design (a file is complete once unchanged that long), so the table also
  shows it without.
* **burst**: ``--burst`` files appear at once (renamed into the folder); throughput = files / (last result − first
  rename). The floor: :func:`emassist.serve.predict.predict_paths` over the same files with the same loaded model
  and batch size (decode + forward pass, no watching); ratio = floor time / watcher time.
* **peak RSS**: ``emassist watch DIR --once`` as a child process over ``--rss-files`` files, and over 100 files
  for the baseline (model and libraries loaded); ru_maxrss of the child.

Every figure: min / median / max of ``--runs`` runs.

    python bench/bench_watch.py [--runs 3] [--burst 500] [--rss-files 10000]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from emassist.config.settings import load_params  # noqa: E402


def demo_pngs(folder: Path, n: int, side: int) -> list[Path]:
    """``n`` distinct demo PNGs of several classes (a few rendered, then varied by flips and a pixel tweak)."""
    from PIL import Image

    from emassist.config.classes import CLASSES
    from emassist.data.demo.generate import Job, render_image

    folder.mkdir(parents=True, exist_ok=True)
    bases = []
    for k in range(10):
        img, _ = render_image(Job("", k % len(CLASSES), k, "x.png", True, side, side, 42))
        bases.append((img * 255.0 + 0.5).astype(np.uint8))
    paths = []
    for i in range(n):
        g = bases[i % 10]
        g = np.flip(g, axis=(i // 10) % 2).copy()
        g[0, 0] = i % 256  # distinct bytes: distinct sha256
        path = folder / f"img{i:05d}.png"
        Image.fromarray(g).save(path, format="PNG", compress_level=1)
        paths.append(path)
    return paths


def untrained_model(params_file: Path, path: Path) -> Path:
    from emassist.model.builders import build_model
    from emassist.model.saving import save_serving_copy

    params = load_params(params_file)
    model = build_model(params.train.model, num_classes=len(params.data.classes), image_size=params.train.image_size)
    return save_serving_copy(model, path)


def stats3(values: list[float]) -> tuple[float, float, float]:
    return min(values), statistics.median(values), max(values)


def fmt(values: list[float], unit: str, scale: float = 1.0, digits: int = 0) -> str:
    lo, mid, hi = stats3([v * scale for v in values])
    return f"{lo:.{digits}f} / {mid:.{digits}f} / {hi:.{digits}f} {unit}"


class Run:
    """One in-process watcher on a fresh folder; results timed by a listener."""

    def __init__(self, params: Any, backend: Any, tmp: Path, name: str) -> None:
        from emassist.pipeline.watch import Watcher, WatchOptions
        from emassist.pipeline.watch_scorer import Scorer

        self.folder = tmp / name
        self.folder.mkdir()
        self.done: dict[str, float] = {}
        self.cond = threading.Condition()
        options = WatchOptions(folder=self.folder, out=tmp / f"{name}-out")
        self.watcher = Watcher(options, params, Scorer(backend), say=lambda line: None, listeners=[self.listen])
        self.watcher.start()
        self.thread = threading.Thread(target=self.watcher.run, daemon=True)
        self.thread.start()

    def listen(self, record: dict[str, Any], image: Any) -> None:
        with self.cond:
            self.done[record["relpath"]] = time.monotonic()
            self.cond.notify_all()

    def wait(self, n: int, timeout: float = 600) -> None:
        with self.cond:
            self.cond.wait_for(lambda: len(self.done) >= n, timeout)
        if len(self.done) < n:
            raise RuntimeError(f"only {len(self.done)} of {n} results")

    def close(self) -> None:
        self.watcher.stop()
        self.thread.join()


def latency_run(params: Any, backend: Any, tmp: Path, sources: list[Path], gap: float, k: int) -> list[float]:
    run = Run(params, backend, tmp, f"latency{k}")
    closed: dict[str, float] = {}
    try:
        for i, src in enumerate(sources):
            data = src.read_bytes()
            name = f"lat{i:03d}.png"
            with open(run.folder / name, "wb") as fh:
                fh.write(data)
            closed[name] = time.monotonic()
            time.sleep(gap)
        run.wait(len(sources))
    finally:
        run.close()
    return [run.done[n] - t for n, t in closed.items()]


def burst_run(params: Any, backend: Any, tmp: Path, sources: list[Path], k: int) -> float:
    staging = tmp / f"staging{k}"
    staging.mkdir()
    for src in sources:
        shutil.copyfile(src, staging / src.name)
    run = Run(params, backend, tmp, f"burst{k}")
    try:
        start = time.monotonic()
        for src in sources:
            os.rename(staging / src.name, run.folder / src.name)
        run.wait(len(sources))
        return max(run.done.values()) - start
    finally:
        run.close()


def predict_run(backend: Any, sources: list[Path], batch_size: int) -> float:
    from emassist.serve.predict import predict_paths

    start = time.perf_counter()
    frame = predict_paths([str(p) for p in sources], backend.model, batch_size=batch_size, progress=False)
    seconds = time.perf_counter() - start
    assert len(frame) == len(sources) and not frame["error"].astype(bool).any()
    return seconds


def rss_run(params_file: Path, model: str, folder: Path, out: Path) -> tuple[float, float]:
    """(seconds, peak RSS MiB) of ``emassist watch folder --once`` as a child process."""
    code = (
        "import resource, subprocess, sys, time; t = time.monotonic(); "
        "rc = subprocess.call(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL); "
        "print(rc, time.monotonic() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    cmd = [sys.executable, "-m", "emassist.cli.main", "--params", str(params_file), "watch", str(folder), "--once",
           "--model", model, "--no-log", "--no-progress", "--out", str(out)]  # fmt: skip
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(ROOT)}
    code = code.replace("stderr=subprocess.DEVNULL", "stderr=open(sys.argv[1] + '.err', 'w')")
    log_file = str(out) + ".log"
    text = subprocess.run(
        [
            sys.executable,
            "-c",
            code.replace("sys.argv[1:]", "sys.argv[2:]").replace("sys.argv[1] + '.err'", "sys.argv[1]"),
            log_file,
            *cmd,
        ],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    rc, seconds, kib = text.stdout.split()
    if rc != "0":
        raise RuntimeError(f"emassist watch --once exited with {rc}: {Path(log_file).read_text()[-2000:]}")
    shutil.rmtree(out, ignore_errors=True)
    return float(seconds), int(kib) / 1024


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    ap.add_argument("--model", help="a .keras file (default: an untrained train.model)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--side", type=int, default=256, help="demo image side, pixels")
    ap.add_argument("--latency-files", type=int, default=20)
    ap.add_argument("--gap", type=float, default=0.3, help="seconds between the latency run's files")
    ap.add_argument("--burst", type=int, default=500)
    ap.add_argument("--rss-files", type=int, default=10_000)
    args = ap.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    params = load_params(args.params)
    from emassist.serve.backend import load_backend

    with tempfile.TemporaryDirectory(prefix="bench-watch-") as tmp_name:
        tmp = Path(tmp_name)
        model = args.model or str(untrained_model(args.params, tmp / "model.keras"))
        print(f"rendering {args.burst} + {args.rss_files} demo images ({args.side} px) ...", file=sys.stderr)
        sources = demo_pngs(tmp / "sources", args.burst, args.side)
        backend = load_backend(params, model_uri=model)
        predict_run(backend, sources[:64], params.watch.batch_size)  # warm: the compiled forward pass
        latencies: list[float] = []
        lat_medians: list[float] = []
        bursts: list[float] = []
        floors: list[float] = []
        for k in range(args.runs):
            lat = latency_run(params, backend, tmp, sources[: args.latency_files], args.gap, k)
            latencies += lat
            lat_medians.append(statistics.median(lat))
            bursts.append(burst_run(params, backend, tmp, sources, k))
            floors.append(predict_run(backend, sources, params.watch.batch_size))
            print(f"run {k + 1}: latency p50 {statistics.median(lat) * 1e3:.0f} ms, burst {bursts[-1]:.2f} s, "
                  f"predict {floors[-1]:.2f} s", file=sys.stderr)  # fmt: skip
        many = tmp / "many"
        many.mkdir()
        for i in range(args.rss_files):  # the burst's files again under new names (hard links: no disk cost)
            os.link(sources[i % len(sources)], many / f"f{i:05d}.png")
        few = tmp / "few"
        few.mkdir()
        for i in range(100):
            os.link(sources[i % len(sources)], few / f"f{i:05d}.png")
        rss_many, rss_few, secs_many = [], [], []
        for k in range(args.runs):
            s, r = rss_run(args.params.resolve(), model, many, tmp / f"rss-out{k}")
            secs_many.append(s)
            rss_many.append(r)
            rss_few.append(rss_run(args.params.resolve(), model, few, tmp / f"rss-few{k}")[1])
            print(f"run {k + 1}: {args.rss_files} files {s:.1f} s, peak RSS {r:.0f} MiB; 100 files "
                  f"{rss_few[-1]:.0f} MiB", file=sys.stderr)  # fmt: skip
    settle = params.watch.settle_s
    p95 = float(np.percentile(latencies, 95))
    per_run_p95 = [p95]
    rate = [args.burst / b for b in bursts]
    floor_rate = [args.burst / f for f in floors]
    ratio = [f / b for f, b in zip(floors, bursts, strict=True)]
    rows = [
        ("latency p50, file complete → result", fmt(lat_medians, "ms", 1e3), f"includes watch.settle_s {settle:g} s"),
        ("latency p50 beyond settle_s", fmt([m - settle for m in lat_medians], "ms", 1e3), "stat tick + read + answer"),
        ("latency p95 (all runs)", fmt(per_run_p95, "ms", 1e3), f"{len(latencies)} files"),
        (f"burst of {args.burst}: watcher", fmt(rate, "img/s", digits=1), "first rename → last result"),
        (f"burst of {args.burst}: predict_paths (floor)", fmt(floor_rate, "img/s", digits=1), "same model, files"),
        ("watcher / floor throughput", fmt(ratio, "x", digits=2), "1.00 = no cost for watching"),
        (f"--once over {args.rss_files} files", fmt(secs_many, "s", digits=1), "child process, model load included"),
        (f"peak RSS, {args.rss_files} files", fmt(rss_many, "MiB"), "ru_maxrss of the child"),
        ("peak RSS, 100 files (baseline)", fmt(rss_few, "MiB"), "model + libraries"),
    ]
    print(f"model: {params.train.model} {params.train.image_size} px ({'given' if args.model else 'untrained'}); "
          f"{args.side} px PNGs; batch {params.watch.batch_size}; cpus {os.cpu_count()}; runs {args.runs} "
          "(min / median / max)")  # fmt: skip
    width = max(len(r[0]) for r in rows)
    for name, value, note in rows:
        print(f"  {name:<{width}}  {value:>28}  {note}")
    _ = resource  # the child's peak memory comes from its own getrusage
    return 0


if __name__ == "__main__":
    sys.exit(main())
