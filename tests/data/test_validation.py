from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from emassist.config.classes import CLASSES
from emassist.data.validation import MANIFEST_COLUMNS, build_tables, validate_tables

LIMITS = {"min_per_class": 3, "max_rejected_fraction": 0.1, "min_side": 16, "max_side": 20000}


def _manifest(n_per_class: int = 4) -> pd.DataFrame:
    rows = []
    for c_i, label in enumerate(CLASSES):
        for i in range(n_per_class):
            sha = f"{c_i:02x}{i:062x}"
            rows.append(
                {
                    "sha256": sha, "source_path": f"{label}/{i}.png", "label": label,
                    "image_path": f"images/{sha}.png", "width": 256, "height": 200, "mode": "L",
                    "bit_depth": 8, "file_size": 1234, "format": "PNG", "n_frames": 1, "databar_rows": 0,
                    "notes": "", "dhash": f"{c_i * 100 + i:016x}", "instrument": None,
                    "pixel_size_nm": None, "magnification": None, "hv_kv": None, "wd_mm": None,
                    "pixel_size_source": "unknown", "pixel_size_reason": "", "databar_text": "",
                    "databar_pixel_size_nm": None,
                }
            )  # fmt: skip
    frame = pd.DataFrame(rows)
    assert list(frame.columns) == list(MANIFEST_COLUMNS)
    return frame


def _rejected(n: int = 0) -> pd.DataFrame:
    return pd.DataFrame({"source_path": [f"x/{i}" for i in range(n)], "label": "x", "reason": "zero-byte file"})


def _run(manifest: pd.DataFrame, rejected: pd.DataFrame, report_dir: Path | None = None, **limits: float):
    return validate_tables(
        build_tables(manifest, rejected, CLASSES), CLASSES, **{**LIMITS, **limits}, report_dir=report_dir
    )


def test_good_manifest_passes_and_writes_json_and_data_docs(tmp_path: Path) -> None:
    report = _run(_manifest(), _rejected(1), tmp_path / "validation")
    assert report.success, report.summary()
    payload = json.loads((tmp_path / "validation" / "validation.json").read_text())
    assert payload["success"] is True
    assert set(payload["suites"]) == {"manifest", "class_counts", "ingest_summary"}
    html = list((tmp_path / "validation" / "docs").rglob("*.html"))
    assert any(p.name == "index.html" for p in html) and len(html) >= 3


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (
            lambda m, r: (m.assign(label=m["label"].where(m.index != 0, "Unicorns")), r),
            "expect_column_values_to_be_in_set",
        ),
        (
            lambda m, r: (m.assign(sha256=m["sha256"].where(m.index != 0, None)), r),
            "expect_column_values_to_not_be_null",
        ),
        (lambda m, r: (m.assign(width=m["width"].where(m.index != 0, 4)), r), "expect_column_values_to_be_between"),
        (lambda m, r: (m[m["label"] != "Fibres"], r), "count"),
        (lambda m, r: (m, _rejected(20)), "rejected_fraction"),
        (lambda m, r: (m.drop(columns=["dhash"]), r), "expect_table_columns_to_match_set"),
        (lambda m, r: (m.assign(width=m["width"].astype(float)), r), "expect_column_values_to_be_in_type_list"),
    ],
    ids=[
        "unknown-label",
        "null-sha",
        "tiny-width",
        "missing-class",
        "too-many-rejected",
        "missing-column",
        "float-width",
    ],
)
def test_critical_failures_are_named(mutate, expected: str) -> None:
    manifest, rejected = mutate(_manifest(), _rejected(1))
    report = _run(manifest, rejected)
    assert not report.success
    text = "\n".join(o.describe() for o in report.critical_failures)
    assert expected in text, text


def test_duplicate_sha_is_only_a_warning() -> None:
    manifest = _manifest()
    manifest.loc[1, "sha256"] = manifest.loc[0, "sha256"]
    report = _run(manifest, _rejected())
    assert report.success
    assert any(o.expectation == "expect_column_values_to_be_unique" and o.column == "sha256" for o in report.warnings)


def test_validate_stage_stops_with_readable_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from emassist.pipeline.stagerun import run_stage
    from stages import validate
    from tests.conftest import REPO_ROOT

    monkeypatch.chdir(tmp_path)
    interim = tmp_path / "data" / "interim"
    interim.mkdir(parents=True)
    bad = _manifest()
    bad.loc[0, "label"] = "Unicorns"
    bad.to_parquet(interim / "manifest.parquet")
    _rejected().to_csv(interim / "rejected.csv", index=False)
    assert run_stage("validate", "", validate.main, ["--params", str(REPO_ROOT / "params.yaml")]) == 1
    err = capsys.readouterr().err
    assert "critical expectation" in err and "label" in err and "Unicorns" in err
    assert json.loads((tmp_path / "reports" / "validation" / "validation.json").read_text())["success"] is False
