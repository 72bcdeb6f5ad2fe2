"""Great Expectations 1.x suites on the ingest outputs (manifest, per-class counts, ingest summary).

Critical expectations stop the pipeline; warnings are reported only. Results are written as JSON and
as HTML data docs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from emassist.core.atomic import atomic_open, atomic_path
from emassist.data.ingest import MANIFEST_COLUMNS  # the schema ingest writes is the schema checked here
from emassist.data.pixelsize import DISAGREEMENT_FACTOR, disagreement

REQUIRED_COLUMNS: tuple[str, ...] = (
    "sha256", "source_path", "label", "image_path", "width", "height", "mode", "bit_depth",
    "file_size", "format", "dhash",
)  # fmt: skip
INT_TYPES = ["int64", "int32", "Int64", "Int32"]
# GX 1.24 does not recognise pandas 3's default ``str`` dtype in ExpectColumnValuesToBeInTypeList, so
# build_tables hands text columns over as ``object`` and the suite checks them with a regex as well.
STR_TYPES = ["str"]
TEXT_COLUMNS: tuple[str, ...] = ("sha256", "source_path", "label", "image_path", "mode", "format", "dhash")


#: Derived column (not in the manifest file): where tags and data bar disagree on the pixel size, what they say.
CONFLICT_COLUMN = "pixel_size_conflict"


def pixel_size_conflicts(manifest: pd.DataFrame) -> list[str | None]:
    """Per row: None, or 'path: tags X nm/px, data bar Y nm/px (Z x): tags used' where the pixel size came from
    the tags and the data bar's reading differs by more than DISAGREEMENT_FACTOR."""
    needed = ("source_path", "pixel_size_nm", "pixel_size_source", "databar_pixel_size_nm")
    if not all(c in manifest.columns for c in needed):
        return [None] * len(manifest)
    out: list[str | None] = []
    for path, tags, source, bar in zip(*(manifest[c] for c in needed), strict=True):
        factor = disagreement(tags, bar) if source == "tags" else None
        if factor is not None and factor > DISAGREEMENT_FACTOR:
            out.append(f"{path}: tags {tags:.4g} nm/px, data bar {bar:.4g} nm/px ({factor:.1f}x): tags used")
        else:
            out.append(None)
    return out


class ValidationFailed(RuntimeError):
    """One or more critical expectations failed."""


@dataclass
class ExpectationOutcome:
    suite: str
    expectation: str
    column: str | None
    severity: str
    success: bool
    observed: Any = None
    unexpected: list[Any] = field(default_factory=list)

    def describe(self) -> str:
        where = f" on column '{self.column}'" if self.column else ""
        detail = ""
        if self.unexpected:
            detail = f"; unexpected values e.g. {self.unexpected[:5]}"
        elif self.observed is not None:
            detail = f"; observed {self.observed}"
        return f"[{self.severity}] {self.suite}: {self.expectation}{where} failed{detail}"


@dataclass
class ValidationReport:
    outcomes: list[ExpectationOutcome]

    @property
    def critical_failures(self) -> list[ExpectationOutcome]:
        return [o for o in self.outcomes if not o.success and o.severity == "critical"]

    @property
    def warnings(self) -> list[ExpectationOutcome]:
        return [o for o in self.outcomes if not o.success and o.severity != "critical"]

    @property
    def success(self) -> bool:
        return not self.critical_failures

    def summary(self) -> str:
        n_ok = sum(o.success for o in self.outcomes)
        lines = [f"{n_ok}/{len(self.outcomes)} expectations met"]
        lines += [o.describe() for o in self.critical_failures + self.warnings]
        return "\n".join(lines)


def build_tables(manifest: pd.DataFrame, rejected: pd.DataFrame, classes: Sequence[str]) -> dict[str, pd.DataFrame]:
    """The three tables the suites check: the manifest itself, counts per class, and the ingest summary."""
    counts = manifest["label"].value_counts() if "label" in manifest else pd.Series(dtype="int64")
    class_counts = pd.DataFrame({"label": list(classes), "count": [int(counts.get(c, 0)) for c in classes]})
    n_total = len(manifest) + len(rejected)
    summary = pd.DataFrame(
        {
            "n_accepted": [len(manifest)],
            "n_rejected": [len(rejected)],
            "rejected_fraction": [len(rejected) / n_total if n_total else 0.0],
        }
    )
    text = [c for c in TEXT_COLUMNS if c in manifest.columns]
    manifest = manifest.astype(dict.fromkeys(text, object))
    manifest[CONFLICT_COLUMN] = pixel_size_conflicts(manifest)
    return {"manifest": manifest, "class_counts": class_counts, "ingest_summary": summary}


def _suites(
    classes: Sequence[str], *, min_per_class: int, max_rejected_fraction: float, min_side: int, max_side: int
) -> dict[str, list[Any]]:
    import great_expectations as gx

    e = gx.expectations
    manifest = [
        e.ExpectTableColumnsToMatchSet(column_set=list(MANIFEST_COLUMNS), exact_match=False),
        e.ExpectTableRowCountToBeBetween(min_value=1),
        *[e.ExpectColumnValuesToNotBeNull(column=c) for c in REQUIRED_COLUMNS],
        e.ExpectColumnValuesToBeInSet(column="label", value_set=list(classes)),
        e.ExpectColumnValuesToMatchRegex(column="sha256", regex=r"^[0-9a-f]{64}$"),
        e.ExpectColumnValuesToMatchRegex(column="dhash", regex=r"^[0-9a-f]{16}$"),
        e.ExpectColumnValuesToBeUnique(column="source_path"),
        *[e.ExpectColumnValuesToBeInTypeList(column=c, type_list=INT_TYPES)
          for c in ("width", "height", "bit_depth", "file_size", "n_frames", "databar_rows")],
        *[e.ExpectColumnValuesToBeInTypeList(column=c, type_list=STR_TYPES) for c in TEXT_COLUMNS],
        *[e.ExpectColumnValuesToMatchRegex(column=c, regex=r"\S") for c in ("source_path", "mode", "format")],
        e.ExpectColumnValuesToMatchRegex(column="image_path", regex=r"^images/[0-9a-f]{64}\.png$"),
        e.ExpectColumnValuesToBeBetween(column="width", min_value=min_side, max_value=max_side),
        e.ExpectColumnValuesToBeBetween(column="height", min_value=min_side, max_value=max_side),
        e.ExpectColumnValuesToBeBetween(column="file_size", min_value=1),
        e.ExpectColumnValuesToBeInSet(column="bit_depth", value_set=[1, 8, 16, 32], severity="warning"),
        # Exact duplicates exist in the real dataset; the split keeps them together, so only warn.
        e.ExpectColumnValuesToBeUnique(column="sha256", severity="warning"),
        e.ExpectColumnValuesToBeBetween(column="pixel_size_nm", min_value=0, strict_min=True,
                                        severity="warning"),
        # Tags and data bar more than DISAGREEMENT_FACTOR apart: the tags are used; reported, never fatal.
        e.ExpectColumnValuesToBeNull(column=CONFLICT_COLUMN, severity="warning"),
    ]  # fmt: skip
    class_counts = [
        e.ExpectColumnValuesToBeBetween(column="count", min_value=min_per_class),
        e.ExpectTableRowCountToEqual(value=len(classes)),
    ]
    summary = [
        e.ExpectColumnValuesToBeBetween(column="rejected_fraction", min_value=0, max_value=max_rejected_fraction),
        e.ExpectColumnValuesToBeBetween(column="n_accepted", min_value=1),
    ]
    return {"manifest": manifest, "class_counts": class_counts, "ingest_summary": summary}


def validate_tables(
    tables: dict[str, pd.DataFrame],
    classes: Sequence[str],
    *,
    min_per_class: int,
    max_rejected_fraction: float,
    min_side: int,
    max_side: int,
    report_dir: Path | None = None,
) -> ValidationReport:
    """Run the suites; write ``report_dir/validation.json`` and ``report_dir/docs/`` (HTML data docs)."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    logging.getLogger("great_expectations").setLevel(logging.ERROR)
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    with atomic_path(report_dir) if report_dir else contextlib.nullcontext() as out:
        docs_dir = Path(out) / "docs" if out else None
        if docs_dir is not None:
            docs_dir.mkdir(parents=True)
            context.add_data_docs_site(
                site_name="validation",
                site_config={
                    "class_name": "SiteBuilder",
                    "store_backend": {
                        "class_name": "TupleFilesystemStoreBackend",
                        "base_directory": str(docs_dir.resolve()),
                    },
                    "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
                },
            )
        source = context.data_sources.add_pandas("ingest")
        suites = _suites(
            classes,
            min_per_class=min_per_class,
            max_rejected_fraction=max_rejected_fraction,
            min_side=min_side,
            max_side=max_side,
        )
        outcomes: list[ExpectationOutcome] = []
        raw_results: dict[str, Any] = {}
        for name, expectations in suites.items():
            batch = source.add_dataframe_asset(name).add_batch_definition_whole_dataframe("all")
            suite = context.suites.add(gx.ExpectationSuite(name=name, expectations=expectations))
            definition = context.validation_definitions.add(
                gx.ValidationDefinition(name=f"{name}_validation", data=batch, suite=suite)
            )
            actions = [gx.checkpoint.UpdateDataDocsAction(name="docs")] if docs_dir else []
            checkpoint = context.checkpoints.add(
                gx.Checkpoint(
                    name=f"{name}_checkpoint",
                    validation_definitions=[definition],
                    actions=actions,
                    result_format="SUMMARY",
                )
            )
            result = checkpoint.run(batch_parameters={"dataframe": tables[name]})
            for run_result in result.run_results.values():
                raw_results[name] = run_result.to_json_dict()
                for r in run_result.results:
                    cfg = r.expectation_config
                    outcomes.append(
                        ExpectationOutcome(
                            suite=name,
                            expectation=cfg.type,
                            column=cfg.kwargs.get("column"),
                            severity=str(getattr(cfg.severity, "value", cfg.severity) or "critical"),
                            success=bool(r.success),
                            observed=r.result.get("observed_value"),
                            unexpected=list(r.result.get("partial_unexpected_list") or []),
                        )
                    )
        report = ValidationReport(outcomes)
        if out:
            payload = {
                "success": report.success,
                "critical_failures": [o.describe() for o in report.critical_failures],
                "warnings": [o.describe() for o in report.warnings],
                "suites": raw_results,
            }
            with atomic_open(Path(out) / "validation.json") as fh:
                json.dump(payload, fh, indent=2, default=str)
    return report


def load_ingest_outputs(interim_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    manifest_path = interim_dir / "manifest.parquet"
    rejected_path = interim_dir / "rejected.csv"
    for p in (manifest_path, rejected_path):
        if not p.exists():
            raise FileNotFoundError(f"{p} not found: run the ingest stage first (dvc repro ingest)")
    return pd.read_parquet(manifest_path), pd.read_csv(rejected_path, keep_default_na=False)
