"""Where a single-image request goes: `mlflow models serve` sampled by py-spy, the in-process pyfunc by pyinstrument.

    python bench/profile_serving.py                 # 400 requests, py-spy at 500 Hz; 400 in-process predict calls
    python bench/profile_serving.py --help

Registers the same untrained demo model as bench/bench_serving.py (``train.model`` at ``train.image_size``, classes
from params.yaml) in a throw-away sqlite MLflow store, starts ``mlflow models serve`` of it on 127.0.0.1 and sends
``--requests`` single-image requests (the bench's 256x256 PNGs) one after another while ``py-spy record --format
raw --nonblocking`` samples the uvicorn process. Then ``PyFuncModel.predict`` of the same model on one image,
``--calls`` times in this process, under pyinstrument.

Each sampled stack (root → leaf) goes to one bucket (:data:`BUCKETS`) by this rule: walk it from the leaf upward and
take the first frame that a *named* bucket matches (a function of ours or MLflow's, or TensorFlow/Keras code); when
none does, walk it again and take the first frame a *package* bucket matches (the rest of emassist, of MLflow, the
thread hand-off, starlette/fastapi, uvicorn/asyncio); else "other"; two buckets matching one frame: the one listed
first. Library frames (pandas, NumPy, json, PIL) have no bucket of their own: they count for the nearest bucket
above them. py-spy drops idle samples (``--idle`` off): a thread blocked in a wait (e.g. on TensorFlow's own C++
threads, which py-spy does not see) counts nothing, while a thread that is runnable but waiting for a CPU (a loaded
host) counts as busy. Linux only (the server's pid is found in /proc); py-spy needs ptrace rights (root, or
kernel.yama.ptrace_scope=0).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO))

from bench_serving import VENV_BIN, log, make_images, model_server, register_bench_model, stand_in_model  # noqa: E402

#: One frame of a stack: (function, file path).
Frame = tuple[str, str]


#: (function, file path with "/" separators) -> whether the frame is in a bucket.
Matcher = Callable[[str, str], bool]


@dataclass(frozen=True)
class Bucket:
    name: str
    named: Matcher | None = None  # named functions (or TensorFlow's code): the first walk
    package: Matcher | None = None  # the rest of a package: the second walk


def _in(*parts: str) -> Matcher:
    """Frames of files whose path contains one of ``parts``."""
    return lambda fn, path: any(p in path for p in parts)


def _short(fn: str) -> str:
    """A function's own name (py-spy writes methods as ``Class.method``)."""
    return fn.rsplit(".", 1)[-1]


def _fn(path_part: str, *names: str, prefix: str = "") -> Matcher:
    """Frames of the functions ``names`` (or named ``prefix...``) in a file whose path contains ``path_part``."""

    def match(fn: str, path: str) -> bool:
        short = _short(fn)
        return path_part in path and (short in names or bool(prefix and short.startswith(prefix)))

    return match


def _any(*matchers: Matcher) -> Matcher:
    return lambda fn, path: any(m(fn, path) for m in matchers)


OURS = "/emassist/"
PYFUNC = f"{OURS}serve/pyfunc.py"
MLFLOW = "/mlflow/"
#: The buckets, in table order (which is also the order of precedence when two match the same frame). ``ours``: the
#: pyfunc's (everything under emassist.*); the rest but "other" is MLflow's or its server's.
BUCKETS: tuple[Bucket, ...] = (
    Bucket("uvicorn / httptools / asyncio event loop",
           package=_in("/uvicorn/", "/httptools/", "/asyncio/", "/uvloop/")),
    Bucket("starlette / fastapi / anyio (middleware, routing, response)",
           package=_in("/starlette/", "/fastapi/", "/anyio/")),
    Bucket("`asyncio.to_thread` hand-off (thread pool)",
           named=_any(_in("/asyncio/threads.py"),
                      _fn("/concurrent/futures/", "submit", "_adjust_thread_count", "set_result", "set_exception",
                          "set_running_or_notify_cancel", "_invoke_callbacks"),
                      _fn("/asyncio/futures.py", "_call_set_state", "_set_state", "_copy_future_state",
                          "_set_concurrent_future_state", "_call_check_cancel"),
                      _fn("/asyncio/base_events.py", "run_in_executor", "call_soon_threadsafe")),
           package=_in("/concurrent/futures/thread.py", "/threading.py", "/queue.py")),
    Bucket("MLflow: JSON parse (`_parse_json_data`, `infer_and_parse_data`)",
           named=_fn(MLFLOW, "_parse_json_data", "infer_and_parse_data", "_decode_json_input",
                     "_split_data_and_params", "dataframe_from_parsed_json")),
    Bucket("MLflow: schema enforcement (`_validate_prediction_input`, `_enforce_*`)",
           named=_fn(MLFLOW, "_validate_prediction_input", "validate_schema", prefix="_enforce_")),
    Bucket("MLflow: `predictions_to_json`", named=_fn(MLFLOW, "predictions_to_json")),
    Bucket("MLflow: other (`invocations`, `PyFuncModel.predict` wrappers)", package=_in(MLFLOW)),
    Bucket("ours: base64 decode", named=_fn(PYFUNC, "decode_base64")),
    Bucket("ours: image decode (PIL → 8-bit gray)",
           named=_any(_in(f"{OURS}data/decode.py"), _fn(f"{OURS}data/preprocess.py", "decode"))),
    Bucket("ours: data-bar crop / resize / standardize",
           named=_in(f"{OURS}data/preprocess.py", f"{OURS}data/databar.py")),
    Bucket("ours: pixel size / OCR lookups",
           named=_any(_in(f"{OURS}serve/pixel_size.py", f"{OURS}data/scalebar.py", f"{OURS}data/pixelsize.py",
                          f"{OURS}model/scale.py"), _fn(PYFUNC, "scale_of"))),
    Bucket("ours: forward pass (TensorFlow / Keras, `score`)",
           named=_any(_in("/tensorflow/", "/keras/", "/tf_keras/"), _fn(PYFUNC, "score", "probabilities"))),
    Bucket("ours: answer table (`result_frame`, review)",
           named=_any(_in(f"{OURS}model/selective.py"), _fn(PYFUNC, "result_frame", "review"))),
    Bucket("ours: other (`predict`, `prepare` glue)", package=_in(OURS)),
)  # fmt: skip
OTHER = "other (interpreter, this script, unmatched)"


def bucket_of(stack: Sequence[Frame]) -> str:
    """The bucket of one stack (root first): the innermost frame a named bucket matches, else the innermost frame a
    package bucket matches, else :data:`OTHER`."""
    for walk in ("named", "package"):
        for fn, path in reversed(stack):
            for b in BUCKETS:
                match = getattr(b, walk)
                if match is not None and match(fn, path):
                    return b.name
    return OTHER


def aggregate(stacks: Iterable[tuple[Sequence[Frame], float]]) -> Counter[str]:
    """Weight (samples or seconds) per bucket."""
    got: Counter[str] = Counter()
    for stack, weight in stacks:
        got[bucket_of(stack)] += weight
    return got


# --------------------------------------------------------------------------------------------- py-spy / pyinstrument


def _slashed(path: str) -> str:
    """``/``-separated with a leading ``/`` (py-spy names files below sys.path relative: ``mlflow/pyfunc/...``)."""
    return "/" + path.replace("\\", "/").lstrip("/")


_PYSPY_FRAME = re.compile(r"^(?P<fn>.*?) \((?P<path>.*?)(?::\d+)?\)$")


def parse_pyspy_raw(text: str) -> list[tuple[list[Frame], float]]:
    """py-spy's ``--format raw`` (collapsed stacks: ``frame;frame;... count``, a frame ``function (file:line)``)."""
    out: list[tuple[list[Frame], float]] = []
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames: list[Frame] = []
        for part in stack.split(";"):
            m = _PYSPY_FRAME.match(part)
            frames.append((m["fn"], _slashed(m["path"])) if m else (part, ""))
        out.append((frames, float(count)))
    return out


def pyinstrument_stacks(session: Any) -> list[tuple[list[Frame], float]]:
    """A pyinstrument session's samples (the records its frame tree is built from) as stacks with seconds."""
    out: list[tuple[list[Frame], float]] = []
    for stack, seconds in session.frame_records:
        frames: list[Frame] = []
        for info in stack:
            fn, path, *_ = [*info.split("\x01", 1)[0].split("\x00"), "", ""]
            frames.append((fn, _slashed(path)))
        out.append((frames, float(seconds)))
    return out


def server_pid(port: int) -> int:
    """The uvicorn process listening on ``port`` (``mlflow models serve`` execs it from a bash child of its own)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if any(a.endswith("uvicorn") for a in argv) and any(
            a == "--port" and i + 1 < len(argv) and argv[i + 1] == str(port) for i, a in enumerate(argv)
        ):
            return int(entry.name)
    raise RuntimeError(f"no uvicorn process with --port {port} found in /proc")


# --------------------------------------------------------------------------------------------- profiling


@dataclass
class Profile:
    weights: Counter[str]  # samples (py-spy) or seconds (pyinstrument) per bucket
    calls: int
    wall_s: float  # wall time of the calls
    plain_s: float  # wall time of as many calls without the profiler, just before
    ms_per_unit: float  # ms one unit of weight stands for (1000 / rate for samples, 1000 for seconds)
    note: str


def profile_server(url: str, images: list[str], n: int, rate: int, raw_out: Path, gil: bool = False) -> Profile:
    """``n`` single-image requests while py-spy samples the server (after 20 warm-up requests and ``n`` timed without
    it). The sampled column uses the rate py-spy kept (its sample count over the time it ran), not the one asked."""
    import requests

    pid = server_pid(int(url.rsplit(":", 1)[1]))
    with requests.Session() as session:

        def send(i: int) -> None:
            body = {"dataframe_split": {"columns": ["image"], "data": [[images[i % len(images)]]]}}
            r = session.post(f"{url}/invocations", json=body, timeout=120)
            r.raise_for_status()

        for i in range(20):
            send(i)
        t0 = time.perf_counter()
        for i in range(n):
            send(i)
        plain = time.perf_counter() - t0
        cmd = [str(VENV_BIN / "py-spy"), "record", "--format", "raw", "--rate", str(rate), "--pid", str(pid),
               "--nonblocking", *(["--gil"] if gil else []), "-o", str(raw_out)]  # fmt: skip
        started = time.perf_counter()
        spy = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        time.sleep(1.0)  # attach; the server idles meanwhile (idle samples are dropped)
        if spy.poll() is not None:
            raise RuntimeError(f"py-spy exited ({spy.returncode}): {spy.stdout.read() if spy.stdout else ''}")
        t0 = time.perf_counter()
        for i in range(n):
            send(i)
        wall = time.perf_counter() - t0
        spy.send_signal(signal.SIGINT)
        spied = time.perf_counter() - started
        said, _ = spy.communicate(timeout=60)
    counted = re.search(r"Samples: (\d+) Errors: (\d+)", said or "")
    taken = int(counted[1]) if counted else 0
    kept = taken / spied if taken else float(rate)
    note = (f"py-spy{' --gil' if gil else ''}: {taken} samples in {spied:.1f} s ({kept:.0f}/s of {rate}/s asked), "
            f"{counted[2] if counted else '?'} errors (torn stacks of --nonblocking)")  # fmt: skip
    weights = aggregate(parse_pyspy_raw(raw_out.read_text()))
    return Profile(weights, n, wall, plain, 1000.0 / kept, note)


def profile_in_process(uri: str, images: list[str], n: int, interval_s: float) -> Profile:
    """``PyFuncModel.predict`` of one image, ``n`` times under pyinstrument (after 20 warm-up calls and ``n`` timed
    without it; the DataFrames are built before)."""
    import mlflow
    import pandas as pd
    from pyinstrument import Profiler

    model = mlflow.pyfunc.load_model(uri)
    frames = [pd.DataFrame({"image": [images[i % len(images)]]}) for i in range(n)]
    for df in frames[:20]:
        model.predict(df)
    t0 = time.perf_counter()
    for df in frames:
        model.predict(df)
    plain = time.perf_counter() - t0
    profiler = Profiler(interval=interval_s, async_mode="disabled")
    profiler.start()
    t0 = time.perf_counter()
    for df in frames:
        model.predict(df)
    wall = time.perf_counter() - t0
    session = profiler.stop()
    weights = aggregate(pyinstrument_stacks(session))
    note = f"pyinstrument: {len(session.frame_records)} samples, interval {interval_s * 1000:g} ms, wall clock"
    return Profile(weights, n, wall, plain, 1000.0, note)


def table(title: str, prof: Profile, share_col: str, sampled_col: str) -> str:
    """The buckets of one profile as a Markdown table, with the sums of MLflow's and of ours."""
    total = sum(prof.weights.values()) or 1.0
    per_call = 1000 * prof.wall_s / prof.calls
    plain = 1000 * prof.plain_s / prof.calls
    lines = [f"**{title}**: {prof.calls} calls, {per_call:.2f} ms wall per call profiled ({plain:.2f} ms without the "
             f"profiler, just before); {prof.note}", "",
             f"| bucket | {share_col} | ms / request (share × wall / N) | {sampled_col} |",
             "|---|---:|---:|---:|"]  # fmt: skip
    order = [b.name for b in BUCKETS] + [OTHER]
    sums = {"MLflow and its server": 0.0, "ours (emassist.*)": 0.0}
    for name in order:
        w = prof.weights.get(name, 0.0)
        sampled = w * prof.ms_per_unit / prof.calls
        lines.append(f"| {name} | {100 * w / total:.1f} % | {w / total * per_call:.2f} | {sampled:.2f} |")
        if name.startswith("ours"):
            sums["ours (emassist.*)"] += w
        elif name != OTHER:
            sums["MLflow and its server"] += w
    for name, w in sums.items():
        lines.append(f"| **sum: {name}** | {100 * w / total:.1f} % | {w / total * per_call:.2f} | "
                     f"{w * prof.ms_per_unit / prof.calls:.2f} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python bench/profile_serving.py",
        description=(__doc__ or "").split("\n\n")[0],
        epilog="Prints Markdown (stdout); progress goes to stderr. py-spy needs ptrace rights on the server "
        "(root, or kernel.yama.ptrace_scope=0).",
    )
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml", help="params file (default: %(default)s)")
    parser.add_argument("--requests", type=int, default=400, help="single-image requests sampled (default: 400)")
    parser.add_argument("--calls", type=int, default=400, help="in-process predict calls profiled (default: 400)")
    parser.add_argument("--rate", type=int, default=500, help="py-spy samples per second (default: 500)")
    parser.add_argument("--interval-ms", type=float, default=0.5, help="pyinstrument interval (default: 0.5 ms)")
    parser.add_argument("--side", type=int, default=256, help="side of the test PNGs in pixels (default: 256)")
    parser.add_argument("--raw", type=Path, help="also keep py-spy's collapsed stacks here")
    parser.add_argument("--gil", action="store_true", help="py-spy --gil: only the thread holding the GIL")
    args = parser.parse_args(argv)
    given = list(argv) if argv is not None else sys.argv[1:]
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    import mlflow

    from emassist.config.settings import load_params, params_from_dict

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="profile-serving-") as tmp_name:
        tmp = Path(tmp_name)
        log("registering the demo model in a temporary store ...")
        base = load_params(args.params) if args.params.is_file() else params_from_dict({})
        model_file = stand_in_model(tmp / "model.keras", base.train.image_size, len(base.data.classes),
                                    base.train.model)  # fmt: skip
        what = f"untrained {base.train.model} at {base.train.image_size} px, {len(base.data.classes)} classes"
        tracking_uri, uri, _ = register_bench_model(base, tmp, model_file)
        images = make_images(64, args.side)
        log("starting mlflow models serve ...")
        with model_server(uri, tracking_uri, tmp / "serve.log", 1) as url:
            log(f"{args.requests} requests under py-spy ...")
            served = profile_server(url, images, args.requests, args.rate, args.raw or tmp / "pyspy.txt", args.gil)
        log(f"{args.calls} in-process predict calls under pyinstrument ...")
        local = profile_in_process(uri, images, args.calls, args.interval_ms / 1000)
    load_after = os.getloadavg()
    print(f"`{shlex.join(['python', 'bench/profile_serving.py', *given])}`: {what}; "
          f"{args.side}x{args.side} PNGs, one per request; MLflow {mlflow.__version__}; {os.cpu_count()} CPUs; "
          f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after\n")  # fmt: skip
    print(table("`mlflow models serve` (py-spy, uvicorn process, every Python thread)", served,
                "share of busy samples", "sampled ms / request (samples ÷ rate kept ÷ N)"))  # fmt: skip
    print()
    print(table("in-process `PyFuncModel.predict` (pyinstrument)", local, "share of samples (wall clock)",
                "sampled ms / call (seconds ÷ N)"))  # fmt: skip
    print(
        "\nA stack's bucket: the innermost frame a named bucket matches (functions of ours or MLflow's, TensorFlow), "
        "else the innermost frame a package bucket matches. Idle samples are not taken (py-spy without --idle): a "
        "thread waiting on TensorFlow's C++ threads or on the network counts nothing, a runnable thread waiting for a "
        "CPU counts as busy. pyinstrument samples this thread's wall clock, waits included, and its per-call "
        "overhead inflates code of many small calls (pandas). ms / request by share × wall "
        "/ N is approximate: the wall time includes the client and the idle gaps, shared out in proportion. The "
        "sampled column counts what the samples saw (py-spy: several threads can be busy at once; a sampler that "
        "falls behind its rate undercounts)."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
