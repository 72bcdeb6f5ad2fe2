from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import yaml

from emassist.cli.main import build_parser, main
from tests.conftest import REPO_ROOT

PARAMS = REPO_ROOT / "params.yaml"


def test_every_command_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    assert {"demo", "fetch", "ingest", "repro", "predict", "promote", "rollback", "models"} <= set(commands)
    for name in commands:
        with pytest.raises(SystemExit) as exc:
            main([name, "--help"])
        assert exc.value.code == 0
        assert "usage: emassist" in capsys.readouterr().out


def test_demo_then_ingest(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    raw, interim = tmp_path / "raw", tmp_path / "interim"
    assert (
        main(["--params", str(PARAMS), "demo", "--out", str(raw), "--n", "400", "--width", "48", "--height", "48"]) == 0
    )
    assert sum(1 for p in raw.rglob("*") if p.is_file()) == 400
    (raw / "Tips" / "broken.png").write_bytes(b"not an image at all")
    assert main(["--params", str(PARAMS), "ingest", "--raw", str(raw), "--out", str(interim)]) == 0
    manifest = pd.read_parquet(interim / "manifest.parquet")
    rejected = pd.read_csv(interim / "rejected.csv")
    assert len(manifest) == 400 and rejected["source_path"].tolist() == ["Tips/broken.png"]
    out = capsys.readouterr().out
    assert "wrote 400 images" in out
    assert "using a floor of 40 per class" in out  # params' floor (330) × 10 classes does not fit 400


def test_demo_floor_option_and_a_floor_that_does_not_fit(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    raw = tmp_path / "raw"
    args = ["--params", str(PARAMS), "demo", "--out", str(raw), "--width", "32", "--height", "32"]
    assert main([*args, "--n", "60", "--min-per-class", "5"]) == 0
    counts = {d.name: sum(1 for _ in d.iterdir()) for d in raw.iterdir()}
    assert sum(counts.values()) == 60 and min(counts.values()) == 5
    assert main([*args, "--n", "60", "--min-per-class", "7"]) == 1  # 7 × 10 classes > 60: said, not lowered
    assert "min_per_class" in capsys.readouterr().err


def test_bad_params_exit_2_naming_the_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    raw = yaml.safe_load(PARAMS.read_text())
    raw["demo"]["tif_fraction"] = 3
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump(raw))
    assert main(["--params", str(bad), "demo", "--out", str(tmp_path / "raw")]) == 2
    assert "demo.tif_fraction" in capsys.readouterr().err
    assert not (tmp_path / "raw").exists()


def test_ingest_of_missing_folder_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--params", str(PARAMS), "ingest", "--raw", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 1
    assert "does not exist" in capsys.readouterr().err
