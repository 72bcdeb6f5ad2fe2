"""The validate step: Great Expectations suites on the ingest outputs; critical failures stop the pipeline."""

from __future__ import annotations

from pathlib import Path

from emassist.config.settings import Params
from emassist.data.validation import build_tables, load_ingest_outputs, validate_tables
from emassist.pipeline.stagerun import StageError

REPORT_DIR = Path("reports/validation")


def main(params: Params) -> None:
    manifest, rejected = load_ingest_outputs(Path(params.data.interim_dir))
    v = params.validate
    report = validate_tables(
        build_tables(manifest, rejected, params.data.classes),
        params.data.classes,
        min_per_class=v.min_per_class,
        max_rejected_fraction=v.max_rejected_fraction,
        min_side=v.min_side,
        max_side=v.max_side,
        report_dir=REPORT_DIR,
    )
    print(report.summary())
    print(f"full results: {REPORT_DIR / 'validation.json'}; data docs: {REPORT_DIR / 'docs' / 'index.html'}")
    if not report.success:
        raise StageError(
            f"{len(report.critical_failures)} critical expectation(s) failed:\n  "
            + "\n  ".join(o.describe() for o in report.critical_failures)
        )
