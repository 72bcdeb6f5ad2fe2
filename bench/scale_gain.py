"""What the scale input buys (issue 15, part 4): scale-blind against scale-aware models on the same demo data.

In the current checkout (refused when params.yaml has uncommitted changes; params.yaml is restored afterwards):

1. ``dvc repro augment`` once: acquire -> ingest -> validate -> split -> augment, the shared upstream stages, so
   every model below sees the same images, the same pixel sizes and the same split;
2. for each seed of ``--seeds`` and each of scale-blind / scale-aware, a DVC experiment in the workspace::

       dvc exp run evaluate -S train.scale_input=<false|true> -S train.seed=<seed> -n <name>

   (train + evaluate only, the ``evaluate`` target: no register stage, nothing promoted in MLflow; the epochs and
   every other key are params.yaml's). Each run's reports, which ``dvc exp run`` leaves in the workspace, are read
   before the next run: ``reports/metrics.json`` (test macro-F1, accuracy and, for a scale-aware model,
   ``macro_f1_scale_withheld``) and ``reports/plots/confusion.csv`` (one ``actual, predicted`` row per test
   image). For a scale-aware model the test split is also predicted here with every pixel size withheld (as the
   evaluate stage does for its ``*_scale_withheld`` figures), which gives that row's confusions.

The Fibres<->Nanowires and Particles<->Powder confusions are the test images of one class predicted as the other,
both directions summed, out of the two classes' test images. The configuration that equals params.yaml's own
``train.scale_input`` / ``train.seed`` runs last, so the workspace ends with the outputs params.yaml describes.
Every experiment stays listed in ``dvc exp show`` (names ``sg-<blind|aware>-s<seed>-<stamp>``).

    TF_CPP_MIN_LOG_LEVEL=2 python bench/scale_gain.py                 # 3 seeds: 6 trainings, ~20-30 min on 2 cores
    python bench/scale_gain.py --seeds 42 --json bench/results/scale_gain.json

Prints a Markdown table (min / median / max over seeds, and each seed's gain) and a per-run table with each run's
training and evaluation wall time on stdout; progress (and DVC's own output) goes to stderr.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow is first imported (lazily, below)
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's emassist (not another one an editable install points at)

DEFAULT_SEEDS = (42, 43, 44)
PAIRS: tuple[tuple[str, str], ...] = (("Fibres", "Nanowires"), ("Particles", "Powder"))
METRICS_FILE = Path("reports/metrics.json")
CONFUSION_FILE = Path("reports/plots/confusion.csv")
UPSTREAM_TARGET = "augment"
EXP_TARGET = "evaluate"
EXP_STAGES = ("train", "evaluate")  # what each experiment must run (the upstream stages are unchanged by design)
CONFIGS = ("scale-blind", "scale-aware", "scale-aware, sizes withheld")
_STAGE_START = re.compile(r"^Running stage '([^']+)'")
_STAGE_SKIPPED = re.compile(r"^Stage '([^']+)' (?:didn't change|is cached)")


class BenchError(RuntimeError):
    """A condition under which the experiment cannot run or its results cannot be read (exit 2)."""


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------- pure logic


def pair_confusion(actual: Sequence[str], predicted: Sequence[str], pair: tuple[str, str]) -> tuple[int, int]:
    """(test images of one class of ``pair`` predicted as the other, both directions summed; test images of the two
    classes). Rows of other classes are ignored whatever they were predicted as."""
    if len(actual) != len(predicted):
        raise ValueError(f"{len(actual)} actual labels but {len(predicted)} predictions")
    a, b = pair
    confused = total = 0
    for truth, guess in zip(actual, predicted, strict=True):
        if truth in pair:
            total += 1
            confused += (truth == a and guess == b) or (truth == b and guess == a)
    return confused, total


def spread(values: Iterable[float]) -> tuple[float, float, float]:
    """(min, median, max) of ``values`` (at least one)."""
    items = list(values)
    if not items:
        raise ValueError("no values")
    return min(items), statistics.median(items), max(items)


@dataclass
class RunResult:
    """One trained model's test figures. ``confusions``: pair label -> (confused, pair images)."""

    seed: int
    scale_input: bool
    macro_f1: float
    accuracy: float
    confusions: dict[str, tuple[int, int]]
    withheld_macro_f1: float | None = None
    withheld_accuracy: float | None = None
    withheld_confusions: dict[str, tuple[int, int]] | None = None
    train_s: float | None = None  # None: the stage did not run (skipped or cached)
    evaluate_s: float | None = None
    total_s: float | None = None
    load_before: float | None = None  # 1-min load average when the run started / ended
    load_after: float | None = None
    experiment: str = ""
    notes: list[str] = field(default_factory=list)


def pair_label(pair: tuple[str, str]) -> str:
    return f"{pair[0]}↔{pair[1]}"


def config_figures(runs: Sequence[RunResult], config: str) -> dict[int, tuple[float, dict[str, tuple[int, int]]]]:
    """seed -> (macro-F1, confusions) of one configuration of :data:`CONFIGS`."""
    out: dict[int, tuple[float, dict[str, tuple[int, int]]]] = {}
    for run in runs:
        if config == CONFIGS[run.scale_input]:  # scale-blind / scale-aware: the figures with the sizes it was given
            out[run.seed] = (run.macro_f1, run.confusions)
        elif config == CONFIGS[2] and run.scale_input and run.withheld_macro_f1 is not None:
            out[run.seed] = (run.withheld_macro_f1, run.withheld_confusions or {})
    return out


def _spread_text(values: Sequence[float], fmt: str) -> str:
    low, mid, high = spread(values)
    return " / ".join(format(v, fmt) for v in (low, mid, high))


def _confusion_text(per_seed: Sequence[dict[str, tuple[int, int]]], label: str) -> str:
    counts = [c[label] for c in per_seed if label in c]
    if not counts:
        return "—"
    totals = sorted({total for _, total in counts})
    low, mid, high = spread([n for n, _ in counts])
    of = "/".join(str(t) for t in totals)
    return f"{low:g} / {mid:g} / {high:g} of {of}"


def gain_text(runs: Sequence[RunResult], config: str) -> str:
    """Each seed's macro-F1 of ``config`` minus the scale-blind model's of the same seed (seeds with both)."""
    if config == CONFIGS[0]:
        return "—"
    blind = config_figures(runs, CONFIGS[0])
    other = config_figures(runs, config)
    seeds = sorted(set(blind) & set(other))
    if not seeds:
        return "—"
    return ", ".join(f"{s}: {other[s][0] - blind[s][0]:+.3f}" for s in seeds)


def summary_table(runs: Sequence[RunResult], pairs: Sequence[tuple[str, str]] = PAIRS) -> str:
    """The Markdown table: one row per configuration with min / median / max over seeds."""
    labels = [pair_label(p) for p in pairs]
    header = ["configuration", "seeds", "macro-F1 min / median / max"]
    header += [f"{label} confused min / median / max" for label in labels]
    header += ["macro-F1 gain over scale-blind, per seed"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for config in CONFIGS:
        figures = config_figures(runs, config)
        if not figures:
            continue
        seeds = sorted(figures)
        f1s = [figures[s][0] for s in seeds]
        cells = [config, str(len(seeds)), _spread_text(f1s, ".3f")]
        cells += [_confusion_text([figures[s][1] for s in seeds], label) for label in labels]
        cells.append(gain_text(runs, config))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _seconds(value: float | None) -> str:
    return "—" if value is None else f"{value:.0f}"


def runs_table(runs: Sequence[RunResult], pairs: Sequence[tuple[str, str]] = PAIRS) -> str:
    """One row per trained model: its figures, withheld figures and wall times."""
    labels = [pair_label(p) for p in pairs]
    header = ["seed", "model", "macro-F1", "accuracy", *labels, "macro-F1 sizes withheld", "accuracy sizes withheld"]
    header += [f"{label} withheld" for label in labels]
    header += ["train s", "evaluate s", "load (1 min) before → after"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for run in sorted(runs, key=lambda r: (r.seed, r.scale_input)):
        withheld = run.withheld_confusions or {}
        cells = [str(run.seed), "scale-aware" if run.scale_input else "scale-blind", f"{run.macro_f1:.4f}",
                 f"{run.accuracy:.4f}"]  # fmt: skip
        cells += [f"{run.confusions[label][0]} / {run.confusions[label][1]}" for label in labels]
        cells += ["—" if run.withheld_macro_f1 is None else f"{run.withheld_macro_f1:.4f}",
                  "—" if run.withheld_accuracy is None else f"{run.withheld_accuracy:.4f}"]  # fmt: skip
        cells += [f"{withheld[label][0]} / {withheld[label][1]}" if label in withheld else "—" for label in labels]
        load = "—" if run.load_before is None else f"{run.load_before:.1f} → {run.load_after:.1f}"
        cells += [_seconds(run.train_s), _seconds(run.evaluate_s), load]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def stage_times(events: Sequence[tuple[float, str]], end: float) -> dict[str, float]:
    """Wall seconds of each stage DVC ran, from ``(time, line)`` events of its output: a stage runs from its
    ``Running stage 'x':`` line to the next stage's line (or ``end``). Skipped stages are not in the answer."""
    starts = [(t, m.group(1)) for t, line in events if (m := _STAGE_START.match(line.strip()))]
    out: dict[str, float] = {}
    for i, (t, name) in enumerate(starts):
        stop = starts[i + 1][0] if i + 1 < len(starts) else end
        out[name] = stop - t
    return out


def skipped_stages(lines: Iterable[str]) -> list[str]:
    """Stages DVC did not run (unchanged, or restored from its run cache)."""
    return [m.group(1) for line in lines if (m := _STAGE_SKIPPED.match(line.strip()))]


def exp_command(scale_input: bool, seed: int, name: str) -> list[str]:
    return ["dvc", "exp", "run", EXP_TARGET, "-S", f"train.scale_input={str(scale_input).lower()}",
            "-S", f"train.seed={seed}", "-n", name]  # fmt: skip


def run_order(seeds: Sequence[int], current: tuple[bool, int]) -> list[tuple[bool, int]]:
    """Every (scale_input, seed), seed by seed (blind first); the one equal to params.yaml's ``current`` last."""
    order = [(aware, seed) for seed in seeds for aware in (False, True)]
    if current in order:
        order.remove(current)
        order.append(current)
    return order


def read_confusion(path: Path) -> tuple[list[str], list[str]]:
    """``actual`` and ``predicted`` columns of the evaluate stage's confusion.csv."""
    if not path.is_file():
        raise BenchError(f"{path} not found: the evaluate stage did not write its confusion file")
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames or not {"actual", "predicted"} <= set(reader.fieldnames):
            raise BenchError(f"{path}: expected columns actual, predicted; found {reader.fieldnames}")
        rows = list(reader)
    return [r["actual"] for r in rows], [r["predicted"] for r in rows]


def confusions_of(actual: Sequence[str], predicted: Sequence[str], pairs: Sequence[tuple[str, str]]) -> dict[str, Any]:
    return {pair_label(p): pair_confusion(actual, predicted, p) for p in pairs}


# --------------------------------------------------------------------------------------------- running


def git(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", *args], capture_output=True, text=True, check=False)


def check_clean_params(params_file: Path) -> None:
    """Refuse a params file with staged or unstaged changes (the experiments rewrite it, and it is restored)."""
    probe = git("rev-parse", "--is-inside-work-tree")
    if probe.returncode != 0:
        raise BenchError("not inside a git work tree: run from the repository root (dvc exp run needs git)")
    if git("ls-files", "--error-unmatch", str(params_file)).returncode != 0:
        raise BenchError(f"{params_file} is not tracked by git: commit it first")
    changed = git("diff", "--name-only", "HEAD", "--", str(params_file))  # the work tree against HEAD
    staged = git("diff", "--cached", "--name-only", "--", str(params_file))  # the index against HEAD
    if changed.returncode != 0 or changed.stdout.strip() or staged.returncode != 0 or staged.stdout.strip():
        raise BenchError(
            f"{params_file} has uncommitted changes: commit or undo them first (the experiments set "
            "train.scale_input and train.seed in it and put the committed file back afterwards)"
        )


def restore_params(params_file: Path, original: bytes) -> None:
    """Put back the committed params file: its bytes, and its index entry (``dvc exp run`` stages what it changes)."""
    if params_file.read_bytes() != original:
        params_file.write_bytes(original)
        log(f"{params_file} restored")
    if git("diff", "--cached", "--quiet", "--", str(params_file)).returncode != 0:
        git("reset", "-q", "--", str(params_file))
        log(f"{params_file} unstaged (dvc exp run had staged the experiment's values)")


def current_config(params_file: Path) -> tuple[bool, int]:
    import yaml

    raw = yaml.safe_load(params_file.read_text()) or {}
    train = raw.get("train") or {}
    return bool(train.get("scale_input", False)), int(train.get("seed", 42))


def stream(cmd: Sequence[str]) -> tuple[int, list[tuple[float, str]], float]:
    """Run ``cmd``, copying its output to stderr; (return code, ``(time, line)`` of each line, end time)."""
    log("$ " + " ".join(cmd))
    events: list[tuple[float, str]] = []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            events.append((time.monotonic(), line))
            sys.stderr.write(line)
        rc = proc.wait()
    return rc, events, time.monotonic()


def withheld_predictions(params_file: Path) -> tuple[list[str], list[str]]:
    """The workspace's model on the test split with every pixel size withheld: (actual, predicted) class names."""
    import keras

    from emassist.config.settings import load_params
    from emassist.model.features import with_features
    from emassist.model.files import MODEL_FILE
    from emassist.model.testset import predict_split

    params = load_params(params_file)
    scorer = with_features(keras.models.load_model(MODEL_FILE, compile=False))
    y_true, proba, _ = predict_split(scorer, params, Path(params.data.splits_dir) / "test.csv", withhold_scale=True)
    classes = list(params.data.classes)
    keras.backend.clear_session()
    return [classes[int(k)] for k in y_true], [classes[int(k)] for k in proba.argmax(axis=1)]


def run_one(scale_input: bool, seed: int, stamp: str, params_file: Path) -> RunResult:
    name = f"sg-{'aware' if scale_input else 'blind'}-s{seed}-{stamp}"
    load_before = os.getloadavg()[0]
    start = time.monotonic()
    rc, events, end = stream(exp_command(scale_input, seed, name))
    if rc != 0:
        raise BenchError(f"dvc exp run failed (exit {rc}) for train.scale_input={scale_input} train.seed={seed}")
    times = stage_times(events, end)
    skipped = [s for s in skipped_stages(line for _, line in events) if s in EXP_STAGES]
    notes = [f"{s} not run (unchanged or cached): no wall time" for s in skipped]
    metrics = json.loads(METRICS_FILE.read_text())
    actual, predicted = read_confusion(CONFUSION_FILE)
    result = RunResult(
        seed=seed, scale_input=scale_input, macro_f1=float(metrics["macro_f1"]), accuracy=float(metrics["accuracy"]),
        confusions=confusions_of(actual, predicted, PAIRS), train_s=times.get("train"),
        evaluate_s=times.get("evaluate"), total_s=end - start, load_before=load_before, experiment=name, notes=notes,
    )  # fmt: skip
    if scale_input:
        if "macro_f1_scale_withheld" not in metrics:
            raise BenchError(f"{METRICS_FILE} has no macro_f1_scale_withheld: the model did not get the scale input")
        result.withheld_macro_f1 = float(metrics["macro_f1_scale_withheld"])
        result.withheld_accuracy = float(metrics["accuracy_scale_withheld"])
        log("predicting the test split with every pixel size withheld (for that row's confusions) ...")
        w_actual, w_predicted = withheld_predictions(params_file)
        result.withheld_confusions = confusions_of(w_actual, w_predicted, PAIRS)
        hits = sum(a == p for a, p in zip(w_actual, w_predicted, strict=True))
        if w_actual and abs(hits / len(w_actual) - result.withheld_accuracy) > 1e-6:
            result.notes.append(f"withheld accuracy here {hits / len(w_actual):.4f} vs evaluate's")
    result.load_after = os.getloadavg()[0]
    log(
        f"seed {seed} {'aware' if scale_input else 'blind'}: macro-F1 {result.macro_f1:.4f}"
        + ("" if result.withheld_macro_f1 is None else f" (sizes withheld {result.withheld_macro_f1:.4f})")
        + f"; train {_seconds(result.train_s)} s, evaluate {_seconds(result.evaluate_s)} s"
    )
    return result


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/scale_gain.py",
        description=(
            "Scale-blind vs scale-aware models on the same demo data and split: dvc repro augment once, then "
            "dvc exp run evaluate -S train.scale_input=false|true -S train.seed=S for each seed. Markdown on "
            "stdout, progress on stderr. Run from the repository root with params.yaml committed."
        ),
    )
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=list(DEFAULT_SEEDS), help="train.seed values (default: 42 43 44)"
    )
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="the params file DVC reads")
    parser.add_argument("--json", type=Path, default=None, help="also write every run's figures here (JSON)")
    parser.add_argument("--skip-upstream", action="store_true", help="do not run dvc repro augment first")
    args = parser.parse_args(argv)
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds: repeated seed in {args.seeds}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    os.chdir(REPO)  # DVC, git and the report paths are the repository root's
    params_file: Path = args.params
    try:
        check_clean_params(params_file)
    except BenchError as exc:
        log(f"error: {exc}")
        return 2
    original = params_file.read_bytes()
    started = dt.datetime.now().astimezone()
    load_start = os.getloadavg()
    stamp = started.strftime("%m%d%H%M%S")
    runs: list[RunResult] = []
    upstream_s: float | None = None
    upstream_ran: list[str] = []
    try:
        if not args.skip_upstream:
            t0 = time.monotonic()
            rc, events, end = stream(["dvc", "repro", UPSTREAM_TARGET])
            if rc != 0:
                raise BenchError(f"dvc repro {UPSTREAM_TARGET} failed (exit {rc})")
            upstream_s = end - t0
            upstream_ran = list(stage_times(events, end))
        order = run_order(args.seeds, current_config(params_file))
        for i, (aware, seed) in enumerate(order, 1):
            log(f"--- run {i}/{len(order)}: train.scale_input={str(aware).lower()} train.seed={seed}")
            runs.append(run_one(aware, seed, stamp, params_file))
    except BenchError as exc:
        log(f"error: {exc}")
        return 2
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        restore_params(params_file, original)
    load_end = os.getloadavg()
    print(f"## Scale input gain ({started:%Y-%m-%d %H:%M %Z}, {platform.node()}, {os.cpu_count()} cores)\n")
    print(
        f"Seeds {' '.join(map(str, args.seeds))}; each model: `dvc exp run {EXP_TARGET} -S train.scale_input=... "
        f"-S train.seed=...` (params.yaml's epochs). Upstream `dvc repro {UPSTREAM_TARGET}`: "
        + ("skipped" if upstream_s is None else f"{upstream_s:.0f} s (ran: {', '.join(upstream_ran) or 'nothing'})")
        + f". Load average (1/5/15 min) {load_start[0]:.1f}/{load_start[1]:.1f}/{load_start[2]:.1f} at the start, "
        f"{load_end[0]:.1f}/{load_end[1]:.1f}/{load_end[2]:.1f} at the end.\n"
    )
    print(summary_table(runs))
    print()
    print(runs_table(runs))
    notes = [f"{r.experiment}: {n}" for r in runs for n in r.notes]
    if notes:
        print("\nNotes: " + "; ".join(notes))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload: Mapping[str, Any] = {
            "started": started.isoformat(), "seeds": args.seeds, "upstream_s": upstream_s,
            "load_start": load_start, "load_end": load_end, "runs": [asdict(r) for r in runs],
        }  # fmt: skip
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
