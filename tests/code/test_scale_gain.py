"""bench/scale_gain.py's logic without training anything: the pair confusions, the summary over seeds, the per-seed
gain, DVC's output parsed into stage times, the run order and the refusal of an uncommitted params.yaml."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[2]


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("scale_gain", REPO / "bench" / "scale_gain.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["scale_gain"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


sg = _load()


def test_pair_confusion_counts_both_directions_out_of_the_pair() -> None:
    actual = ["Fibres", "Fibres", "Fibres", "Nanowires", "Nanowires", "Tips", "Tips"]
    predicted = ["Fibres", "Nanowires", "Tips", "Fibres", "Nanowires", "Fibres", "Nanowires"]
    # Fibres->Nanowires once, Nanowires->Fibres once; Fibres->Tips is no pair confusion; Tips rows are ignored
    assert sg.pair_confusion(actual, predicted, ("Fibres", "Nanowires")) == (2, 5)
    assert sg.pair_confusion(actual, predicted, ("Particles", "Powder")) == (0, 0)
    with pytest.raises(ValueError, match="2 actual labels but 1"):
        sg.pair_confusion(["Fibres", "Tips"], ["Fibres"], ("Fibres", "Nanowires"))


def test_spread_is_min_median_max() -> None:
    assert sg.spread([0.9, 0.7, 0.8]) == (0.7, 0.8, 0.9)
    assert sg.spread([3, 1]) == (1, 2, 3)
    with pytest.raises(ValueError):
        sg.spread([])


def _run(seed: int, aware: bool, f1: float, fn: int, pp: int, withheld: float | None = None) -> object:
    conf = {"Fibres↔Nanowires": (fn, 60), "Particles↔Powder": (pp, 70)}
    run = sg.RunResult(seed=seed, scale_input=aware, macro_f1=f1, accuracy=f1, confusions=conf)
    if aware:
        run.withheld_macro_f1 = withheld
        run.withheld_accuracy = withheld
        run.withheld_confusions = {"Fibres↔Nanowires": (fn + 5, 60), "Particles↔Powder": (pp + 4, 70)}
    return run


RUNS = [
    _run(42, False, 0.90, 10, 8),
    _run(42, True, 0.95, 2, 1, 0.88),
    _run(43, False, 0.92, 12, 6),
    _run(43, True, 0.94, 4, 3, 0.91),
    _run(44, False, 0.91, 11, 7),
    _run(44, True, 0.97, 3, 2, 0.89),
]


def test_summary_table_rows_spreads_and_gains() -> None:
    table = sg.summary_table(RUNS)
    lines = table.splitlines()
    assert len(lines) == 2 + 3  # header, rule, three configurations
    blind, aware, withheld = lines[2:]
    assert blind.startswith("| scale-blind | 3 | 0.900 / 0.910 / 0.920 | 10 / 11 / 12 of 60 | 6 / 7 / 8 of 70 | — |")
    assert "| 0.940 / 0.950 / 0.970 | 2 / 3 / 4 of 60 | 1 / 2 / 3 of 70 |" in aware
    assert aware.endswith("42: +0.050, 43: +0.020, 44: +0.060 |")
    assert "| 0.880 / 0.890 / 0.910 | 7 / 8 / 9 of 60 | 5 / 6 / 7 of 70 |" in withheld
    assert withheld.endswith("42: -0.020, 43: -0.010, 44: -0.020 |")


def test_gain_only_over_seeds_with_both_models() -> None:
    runs = [_run(42, False, 0.9, 1, 1), _run(42, True, 0.95, 0, 0, 0.9), _run(43, True, 0.99, 0, 0, 0.9)]
    assert sg.gain_text(runs, sg.CONFIGS[1]) == "42: +0.050"
    assert sg.gain_text(runs[1:], sg.CONFIGS[1]) == "—"


def test_runs_table_one_row_per_model() -> None:
    RUNS[0].train_s, RUNS[0].evaluate_s, RUNS[0].load_before, RUNS[0].load_after = 151.2, 40.4, 3.5, 4.25
    table = sg.runs_table(RUNS)
    rows = table.splitlines()[2:]
    assert len(rows) == 6
    assert rows[0].startswith("| 42 | scale-blind | 0.9000 | 0.9000 | 10 / 60 | 8 / 70 | — | — | — | — | 151 | 40 |")
    assert "| 42 | scale-aware | 0.9500 | 0.9500 | 2 / 60 | 1 / 70 | 0.8800 | 0.8800 | 7 / 60 | 5 / 70 |" in rows[1]


def test_stage_times_from_dvc_output() -> None:
    events = [
        (0.0, "Stage 'augment' didn't change, skipping\n"),
        (1.0, "Running stage 'train':\n"),
        (2.0, "> python -m stages.train\n"),
        (101.0, "Running stage 'evaluate':\n"),
        (130.0, "Updating lock file 'dvc.lock'\n"),
    ]
    assert sg.stage_times(events, end=141.0) == {"train": 100.0, "evaluate": 40.0}
    lines = [line for _, line in events] + ["Stage 'train' is cached - skipping run, checking out outputs\n"]
    assert sg.skipped_stages(lines) == ["augment", "train"]


def test_run_order_ends_with_params_yaml_configuration() -> None:
    order = sg.run_order([42, 43], (False, 42))
    assert order == [(True, 42), (False, 43), (True, 43), (False, 42)]
    assert sg.run_order([43], (False, 42)) == [(False, 43), (True, 43)]


def test_exp_command_sets_both_keys_and_targets_evaluate() -> None:
    cmd = sg.exp_command(True, 43, "sg-aware-s43-x")
    assert cmd[:4] == ["dvc", "exp", "run", "evaluate"]
    assert "train.scale_input=true" in cmd and "train.seed=43" in cmd and cmd[-2:] == ["-n", "sg-aware-s43-x"]


def test_read_confusion_columns_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "confusion.csv"
    path.write_text("actual,predicted\nFibres,Nanowires\nPowder,Powder\n")
    assert sg.read_confusion(path) == (["Fibres", "Powder"], ["Nanowires", "Powder"])
    path.write_text("truth,guess\nFibres,Fibres\n")
    with pytest.raises(sg.BenchError, match="expected columns actual, predicted"):
        sg.read_confusion(path)
    with pytest.raises(sg.BenchError, match="not found"):
        sg.read_confusion(tmp_path / "nope.csv")


def _git(cwd: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True)


def test_uncommitted_params_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _git(tmp_path, "init", "-q")
    params = tmp_path / "params.yaml"
    committed = "train:\n  seed: 42\n  scale_input: false\n"
    params.write_text(committed)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(sg.BenchError, match="not tracked"):
        sg.check_clean_params(Path("params.yaml"))
    _git(tmp_path, "add", "params.yaml")
    _git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "p")
    sg.check_clean_params(Path("params.yaml"))  # committed: accepted
    assert sg.current_config(Path("params.yaml")) == (False, 42)
    params.write_text("train:\n  seed: 43\n")
    with pytest.raises(sg.BenchError, match="uncommitted changes"):
        sg.check_clean_params(Path("params.yaml"))
    _git(tmp_path, "add", "params.yaml")  # staged but not committed: still refused
    with pytest.raises(sg.BenchError, match="uncommitted changes"):
        sg.check_clean_params(Path("params.yaml"))
    params.write_text(committed)  # staged change, work tree as committed (what dvc exp run leaves): refused
    with pytest.raises(sg.BenchError, match="uncommitted changes"):
        sg.check_clean_params(Path("params.yaml"))
    params.write_text("train:\n  seed: 44\n")
    sg.restore_params(Path("params.yaml"), committed.encode())  # bytes and index entry back
    assert params.read_text() == committed
    sg.check_clean_params(Path("params.yaml"))


def test_help_and_repeated_seeds() -> None:
    script = str(REPO / "bench" / "scale_gain.py")
    shown = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, check=False)
    assert shown.returncode == 0 and "--seeds" in shown.stdout
    bad = subprocess.run([sys.executable, script, "--seeds", "42", "42"], capture_output=True, text=True, check=False)
    assert bad.returncode == 2 and "repeated seed" in bad.stderr
