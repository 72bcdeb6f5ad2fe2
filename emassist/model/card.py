"""The model card of a registered version: what it is for, what it was trained and tested on, how well it does.

Two halves, so the text is testable without a tracking server:

* :func:`gather_facts` reads everything from MLflow (the version, its run's params / metrics / tags, the run's
  ``evaluation/`` artifacts written by the evaluate stage, the version's shipped ``serving_config.json`` and the gate's
  tags) into a :class:`CardFacts`; every read that fails leaves its part empty, never an exception;
* :func:`build_card` turns a :class:`CardFacts` into markdown; a figure the run does not have is "not recorded".

The figures are the version's own (read from MLflow), never the working tree's. The register step writes the card of
each new version (``reports/model_card.md``, the run's ``model_card.md`` artifact and the version's description);
:func:`card_markdown` is what ``emassist models card`` and the web page show.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

import emassist
from emassist.model.provenance import DEMO_NOTICE, SYNTHETIC_SOURCES
from emassist.model.registry import Decision, RegistryError

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

log = logging.getLogger(__name__)

TITLE_PREFIX = "# Model card: "
CARD_ARTIFACT = "model_card.md"  # the card's name among the run's artifacts
EVALUATION_METRICS = "evaluation/metrics.json"  # written by emassist.model.reports.write_reports, logged by evaluate
EVALUATION_PAIRS = "evaluation/confused_pairs.csv"
SERVING_CONFIG = "serving_config.json"  # the pyfunc's config artifact (emassist.model.registry.serving_config)
#: MLflow's SQL stores declare a version description as VARCHAR(5000): longer cards go there shortened.
DESCRIPTION_LIMIT = 5000
NOT_RECORDED = "not recorded"
TOP_PAIRS = 5
GATE_TAGS = ("gate_decision", "gate_reason", "gate_basis", "gate_challenger_macro_f1", "gate_champion_macro_f1",
             "gate_champion_version", "gate_margin")  # fmt: skip
_ALIASES_LINE = re.compile(r"^- \*\*Aliases:\*\* .*$", re.MULTILINE)


@dataclass(frozen=True)
class CardFacts:
    """What a card says, as read from MLflow; empty mappings / None where the version has nothing recorded."""

    name: str
    version: str
    aliases: tuple[str, ...] = ()
    created: datetime | None = None
    run_id: str | None = None
    params: Mapping[str, str] = field(default_factory=dict)  # the run's params (flat keys: train.model, ...)
    metrics: Mapping[str, float] = field(default_factory=dict)  # the run's metrics (test_accuracy, ...)
    run_tags: Mapping[str, str] = field(default_factory=dict)
    version_tags: Mapping[str, str] = field(default_factory=dict)  # incl. the gate's gate_* tags
    serving_config: Mapping[str, Any] | None = None  # the version's shipped serving_config.json
    evaluation: Mapping[str, Any] | None = None  # the run's evaluation/metrics.json (per_class, ...)
    confused_pairs: Sequence[Mapping[str, Any]] | None = None  # evaluation/confused_pairs.csv, most confused first
    decision: Decision | None = None  # the gate's decision when the caller has it (else the gate_* tags)


# --------------------------------------------------------------------------------------------- gathering


@contextlib.contextmanager
def _quiet_downloads() -> Iterator[None]:
    """No MLflow download progress bars on stderr while the card's few small files are fetched."""
    key = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    before = os.environ.get(key)
    os.environ[key] = "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before


def resolve_version(client: MlflowClient, name: str, ref: str | int) -> ModelVersion:
    """The version ``ref`` names: a number (``3``) or an alias (``champion``); unknown → :class:`RegistryError`."""
    from mlflow.exceptions import MlflowException

    text = str(ref).strip()
    try:
        if text.isdigit():
            return client.get_model_version(name, text)
        if not text:
            raise RegistryError("no model version given (a number or an alias such as champion)")
        return client.get_model_version_by_alias(name, text)
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise  # an unreachable server, ...: not "unknown version"
        what = f"version {text}" if text.isdigit() else f"alias '{text}'"
        raise RegistryError(f"{name} has no {what} ({exc.message}); `emassist models list` shows the versions") from exc


def gather_facts(client: MlflowClient, name: str, version: str | int, decision: Decision | None = None) -> CardFacts:
    """Read the card's facts of ``name`` ``version`` (number or alias) from MLflow (see :class:`CardFacts`)."""
    with _quiet_downloads():
        return _gather(client, name, version, decision)


def _gather(client: MlflowClient, name: str, version: str | int, decision: Decision | None) -> CardFacts:
    from mlflow.exceptions import MlflowException

    mv = resolve_version(client, name, version)
    params: Mapping[str, str] = {}
    metrics: Mapping[str, float] = {}
    run_tags: Mapping[str, str] = {}
    evaluation: Mapping[str, Any] | None = None
    pairs: list[dict[str, Any]] | None = None
    if mv.run_id:
        try:
            run = client.get_run(mv.run_id)
            params, metrics, run_tags = dict(run.data.params), dict(run.data.metrics), dict(run.data.tags)
        except MlflowException as exc:
            log.warning("%s v%s: run %s not readable (%s)", name, mv.version, mv.run_id, exc.message)
        with tempfile.TemporaryDirectory(prefix="emassist-card-") as tmp:
            metrics_file = _run_artifact(client, mv.run_id, EVALUATION_METRICS, Path(tmp))
            evaluation = _read_json(metrics_file)
            pairs_file = _run_artifact(client, mv.run_id, EVALUATION_PAIRS, Path(tmp))
            pairs = _read_pairs(pairs_file)
    return CardFacts(
        name=name,
        version=str(mv.version),
        aliases=tuple(sorted(mv.aliases or ())),
        created=datetime.fromtimestamp(mv.creation_timestamp / 1000, UTC) if mv.creation_timestamp else None,
        run_id=mv.run_id or None,
        params=params,
        metrics=metrics,
        run_tags=run_tags,
        version_tags=dict(mv.tags or {}),
        serving_config=_serving_config(client, name, str(mv.version)),
        evaluation=evaluation,
        confused_pairs=pairs,
        decision=decision,
    )


def _run_artifact(client: MlflowClient, run_id: str, path: str, dst: Path) -> Path | None:
    """The run's artifact ``path`` downloaded under ``dst``; None when the run has no such artifact."""
    from mlflow.exceptions import MlflowException

    try:
        return Path(client.download_artifacts(run_id, path, str(dst)))
    except (MlflowException, OSError) as exc:
        log.info("run %s has no readable %s (%s)", run_id, path, exc)
        return None


def _serving_config(client: MlflowClient, name: str, version: str) -> dict[str, Any] | None:
    """The version's shipped serving config (the pyfunc's ``config`` artifact); None when unreadable."""
    import mlflow
    from mlflow.exceptions import MlflowException

    uri = f"models:/{name}/{version}/artifacts/{SERVING_CONFIG}"
    with tempfile.TemporaryDirectory(prefix="emassist-card-") as tmp:
        try:
            local = mlflow.artifacts.download_artifacts(
                artifact_uri=uri, dst_path=tmp, tracking_uri=client.tracking_uri, registry_uri=client.tracking_uri
            )
        except (MlflowException, OSError) as exc:
            log.info("%s v%s: no readable %s (%s)", name, version, SERVING_CONFIG, exc)
            return None
        return _read_json(Path(local))


def _read_json(path: Path | None) -> dict[str, Any] | None:
    if path is None:
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        log.warning("%s is not readable JSON (%s)", path, exc)
        return None
    return value if isinstance(value, dict) else None


def _read_pairs(path: Path | None) -> list[dict[str, Any]] | None:
    if path is None:
        return None
    try:
        frame = pd.read_csv(path)
    except (OSError, ValueError) as exc:
        log.warning("%s is not a readable CSV (%s)", path, exc)
        return None
    if not {"category", "confused_for", "percent", "count"} <= set(frame.columns):
        return None
    return frame.to_dict("records")


# --------------------------------------------------------------------------------------------- building


def _number(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def _fmt(value: Any, digits: int = 4) -> str:
    number = _number(value)
    return NOT_RECORDED if number is None else f"{number:.{digits}f}"


def _pct(value: Any) -> str:
    number = _number(value)
    return NOT_RECORDED if number is None else f"{100 * number:.1f} %"


def _text(value: Any) -> str:
    return NOT_RECORDED if value is None or str(value) in ("", "None") else str(value)


def _metric(facts: CardFacts, key: str) -> float | None:
    return _number(facts.metrics.get(f"test_{key}"))


def training_data_facts(facts: CardFacts) -> tuple[str, str, bool]:
    """(source, data version, synthetic) of the version: its shipped ``training_data``, else its run's tags/params."""
    info = (facts.serving_config or {}).get("training_data")
    if isinstance(info, Mapping):
        source = _text(info.get("source"))
        version = _text(info.get("version"))
        return source, version, bool(info.get("synthetic"))
    source = facts.run_tags.get("data_source") or facts.params.get("data.source")
    version = facts.version_tags.get("data_version") or facts.run_tags.get("data_version")
    return _text(source), _text(version), source in SYNTHETIC_SOURCES


def _classes(facts: CardFacts) -> list[str]:
    config = facts.serving_config or {}
    if isinstance(config.get("classes"), list):
        return [str(c) for c in config["classes"]]
    if facts.params.get("data.classes"):
        return [c for c in str(facts.params["data.classes"]).split(",") if c]
    per_class = (facts.evaluation or {}).get("per_class")
    return list(per_class) if isinstance(per_class, Mapping) else []


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _section_use(facts: CardFacts, classes: Sequence[str]) -> list[str]:
    size = facts.params.get("train.image_size") or (facts.serving_config or {}).get("image_size")
    names = ", ".join(classes) if classes else NOT_RECORDED
    return [
        "## Intended use and limits",
        "",
        f"- **For:** sorting grayscale scanning-electron micrographs into {len(classes) or 'the'} morphology "
        f"classes of the NFFA-EUROPE SEM dataset: {names}.",
        f"- **Input:** one SEM image per prediction (PNG, TIFF 8/16-bit, JPEG, BMP); an instrument data bar at the "
        f"bottom is cropped, the image is reduced to gray and resized to {_text(size)} px.",
        "- **Not for:** other imaging modalities (optical, TEM, AFM), classes outside the list above (it always "
        "answers one of them), measurements (sizes, counts, composition) or any decision without a person "
        "checking the image.",
        "- **Abstention:** every prediction carries `needs_review`: true when its calibrated confidence is below the "
        "review threshold (the lowest confidence at which the accepted val images reach the target accuracy) or "
        "when the image is `unfamiliar` (its feature-space score lies beyond a threshold set on val: it looks "
        "unlike the training images, and its label should not be trusted). Featureless frames (near-constant "
        "after the data-bar crop) are refused.",
        "",
    ]


def _section_data(facts: CardFacts, source: str, version: str) -> list[str]:
    p = facts.params
    dhash = p.get("split.near_dup_distance")
    # split.embedding was added with the dihedral grouping: a run that has the key was split with it.
    new_protocol = "split.embedding" in p
    embedding = p.get("split.embedding")
    steps = ["exact copies (same file bytes, sha256)"]
    steps.append(f"near duplicates by 64-bit difference hash (dHash, Hamming distance <= {_text(dhash)})")
    if new_protocol:
        steps[-1] += ", including each image's flips and quarter turns"
        if embedding in (None, "", "None"):
            steps.append("(no embedding grouping: split.embedding is null)")
        else:
            steps.append(
                f"embedding neighbours: cosine >= {_text(p.get('split.embedding_threshold'))} between global-pooled "
                f"features of a frozen {_text(p.get('split.embedding_backbone'))} "
                f"({_text(embedding)}, {_text(p.get('split.embedding_image_size'))} px)"
            )
    recorded = dhash is not None or new_protocol
    shares = [p.get(f"split.{k}") for k in ("train", "val", "test")]
    ratios = "/".join(map(_text, shares)) if any(shares) else NOT_RECORDED
    seed = f", seed {p['split.seed']}" if p.get("split.seed") else ""
    test_n = _fmt(facts.metrics.get("test_n"), 0)
    counts = f"train {_text(p.get('n_train'))} (after augmentation), val {_text(p.get('n_val'))}, test {test_n}"
    splits_md5 = facts.version_tags.get("splits_md5") or facts.run_tags.get("splits_md5")
    tagged = facts.version_tags.get("data_version") or facts.run_tags.get("data_version")
    lines = [
        "## Data",
        "",
        f"- **Source:** {source}",
        f"- **Data version:** `{version}`"
        + (f" (split files' md5 `{splits_md5}`)" if splits_md5 and splits_md5 != version else "")
        + (f"; the training run is tagged `{tagged}`" if tagged and tagged != version else ""),
        "- **Split protocol:** these images always land in the same split:" if recorded else
        f"- **Split protocol:** {NOT_RECORDED}",
    ]  # fmt: skip
    if recorded:
        lines += [f"  - {step}" for step in steps]
    lines += [
        f"- **Split ratios (train/val/test):** {ratios}{seed}",
        f"- **Images:** {counts}",
        "",
    ]
    return lines


def _section_metrics(facts: CardFacts, classes: Sequence[str]) -> list[str]:
    lines = [
        "## Test metrics",
        "",
        *_table(
            ["metric", "value"],
            [
                ["accuracy", _fmt(_metric(facts, "accuracy"))],
                ["macro-F1", _fmt(_metric(facts, "macro_f1"))],
                ["balanced accuracy", _fmt(_metric(facts, "balanced_accuracy"))],
                ["top-3 accuracy", _fmt(_metric(facts, "top3_accuracy"))],
                ["test images", _fmt(_metric(facts, "n"), 0)],
            ],
        ),
        "",
        "### Per class",
        "",
    ]
    per_class = (facts.evaluation or {}).get("per_class")
    if isinstance(per_class, Mapping) and per_class:
        rows = []
        for name in [c for c in classes if c in per_class] + [c for c in per_class if c not in classes]:
            row = per_class[name] if isinstance(per_class[name], Mapping) else {}
            rows.append([name] + [_fmt(row.get(k), 3) for k in ("precision", "recall", "f1")]
                        + [_fmt(row.get("support"), 0)])  # fmt: skip
        lines += _table(["class", "precision", "recall", "F1", "support"], rows)
    else:
        f1 = {c: _number(facts.metrics.get(f"test_f1_{c}")) for c in classes}
        if any(v is not None for v in f1.values()):
            lines.append("Precision and recall not recorded (no evaluation report logged); F1 per class:")
            lines.append("")
            lines += _table(["class", "F1"], [[c, _fmt(v, 3)] for c, v in f1.items()])
        else:
            lines.append(NOT_RECORDED)
    lines += ["", "### Most confused pairs", ""]
    if facts.confused_pairs is None:
        lines.append(NOT_RECORDED)
    elif not facts.confused_pairs:
        lines.append("none: no test image was confused")
    else:
        lines += _table(
            ["true class", "predicted as", "% of true class", "images"],
            [[str(r["category"]), str(r["confused_for"]), _fmt(r["percent"], 1), _fmt(r["count"], 0)]
             for r in facts.confused_pairs[:TOP_PAIRS]],
        )  # fmt: skip
    lines.append("")
    return lines


def _section_calibration(facts: CardFacts) -> list[str]:
    shipped = (facts.serving_config or {}).get("temperature")
    if facts.serving_config is None:
        served = NOT_RECORDED
    elif shipped is None:
        served = "none: served uncalibrated (T = 1)"
    else:
        served = _fmt(shipped, 3)
    return [
        "## Calibration (temperature scaling fitted on val; ECE with 15 bins, on test)",
        "",
        *_table(
            ["figure", "before", "after"],
            [
                ["ECE", _fmt(_metric(facts, "ece_before")), _fmt(_metric(facts, "ece_after"))],
                ["NLL", _fmt(_metric(facts, "nll_before")), _fmt(_metric(facts, "nll_after"))],
            ],
        ),
        "",
        f"- **Temperature fitted:** {_fmt(_metric(facts, 'temperature'), 3)}; shipped with the model: {served}",
        "",
    ]


def _shipped_review(config: Mapping[str, Any] | None) -> str:
    """What the serving config ships for abstention (keys of emassist.model.registry.serving_config)."""
    if config is None:
        return NOT_RECORDED
    if "review_threshold" not in config and "target_reached" not in config:
        return "none: served with the legacy fixed threshold"
    if config.get("target_reached") is False or config.get("review_threshold") is None:
        return "no threshold reached the target on val: every answer is flagged for review"
    return f"review threshold {_fmt(config.get('review_threshold'))}"


def _review_threshold(facts: CardFacts) -> str:
    value = _metric(facts, "review_threshold")
    if value is None and (facts.serving_config or {}).get("target_reached") is False:
        return "none: no threshold reaches the target on val, every answer is flagged for review"
    return _fmt(value)


def _selective(facts: CardFacts) -> str:
    value = _metric(facts, "selective_accuracy")
    if value is None and _metric(facts, "coverage") == 0.0:
        return "none: no test image was answered without review"
    return _pct(value)


def _section_abstention(facts: CardFacts) -> list[str]:
    return [
        "## Abstention",
        "",
        f"- **Target selective accuracy:** {_pct(_metric(facts, 'target_accuracy'))}",
        f"- **Review threshold (confidence, set on val):** {_review_threshold(facts)}",
        f"- **Coverage on test at that threshold (share answered):** {_pct(_metric(facts, 'coverage'))}",
        f"- **Selective accuracy on test (answered images):** {_selective(facts)}",
        f"- **Unfamiliar threshold (set on val):** {_fmt(_metric(facts, 'unfamiliar_threshold'))}; test images "
        f"flagged unfamiliar: {_pct(_metric(facts, 'unfamiliar_share'))}",
        f"- **Shipped with the model:** {_shipped_review(facts.serving_config)}",
        "",
    ]


def _section_gate(facts: CardFacts) -> list[str]:
    d = facts.decision
    tags = facts.version_tags
    if d is not None:
        label, reason, basis = d.label, d.reason, d.basis
        challenger, champion, champ_v, margin = d.challenger_macro_f1, d.champion_macro_f1, d.champion_version, d.margin
    elif "gate_decision" in tags:
        label, reason, basis = tags["gate_decision"], tags.get("gate_reason"), tags.get("gate_basis")
        challenger, champion = tags.get("gate_challenger_macro_f1"), tags.get("gate_champion_macro_f1")
        champ_v, margin = tags.get("gate_champion_version"), tags.get("gate_margin")
    else:
        return ["## Gate decision", "", f"{NOT_RECORDED} (this version was not gated)", ""]
    champ_v = None if champ_v in (None, "none") else champ_v
    return [
        "## Gate decision",
        "",
        f"- **Decision:** {label}: {_text(reason)}",
        f"- **Macro-F1:** this version {_fmt(challenger)}, champion"
        + (f" v{champ_v}" if champ_v else " (none)")
        + f" {_fmt(champion) if champ_v else '-'}; margin {_text(margin)}",
        f"- **Basis:** {_text(basis)}",
        "",
    ]


def _section_training(facts: CardFacts) -> list[str]:
    p = facts.params
    keys = sorted(k for k in p if k.startswith("train.") and k != "train.work_pool")
    keys += [k for k in ("augment.target_per_class", "augment.online", "head.trainable_params",
                         "finetune.trainable_params") if k in p]  # fmt: skip
    lines = ["## Training", ""]
    if keys:
        lines += _table(["param", "value"], [[k, f"`{p[k]}`"] for k in keys])
    else:
        lines.append(f"params {NOT_RECORDED}")
    lines.append("")
    return lines


def _section_code(facts: CardFacts) -> list[str]:
    commit = facts.version_tags.get("git_commit") or facts.run_tags.get("git_commit")
    note = " (the working tree had uncommitted changes)" if commit and commit.endswith("-dirty") else ""
    return [
        "## Code",
        "",
        f"- **Code commit:** `{_text(commit)}`{note}",
        f"- **MLflow run:** `{_text(facts.run_id)}`",
        "",
    ]


def build_card(facts: CardFacts, *, short: bool = False) -> str:
    """The markdown card of ``facts``; ``short`` leaves out the intended-use text and the training params (for
    places with a size limit: the version's description)."""
    classes = _classes(facts)
    source, version, synthetic = training_data_facts(facts)
    model = facts.run_tags.get("model") or facts.version_tags.get("model") or facts.params.get("train.model")
    created = facts.created.strftime("%Y-%m-%d %H:%M UTC") if facts.created else NOT_RECORDED
    lines = [f"{TITLE_PREFIX}{facts.name} v{facts.version}", ""]
    if synthetic:
        lines += [f"> **NOTICE: {DEMO_NOTICE}**", ""]
    lines += [
        f"- **Aliases:** {', '.join(facts.aliases) or 'none'}",
        f"- **Architecture:** {_text(model)}; registered {created}",
        f"- **Trained on:** {source} data, version `{version[:12]}`"
        if source != NOT_RECORDED
        else f"- **Trained on:** {NOT_RECORDED} (registered before the training data was shipped with the model)",
        "",
    ]
    if not short:
        lines += _section_use(facts, classes)
    lines += _section_data(facts, source, version)
    lines += _section_metrics(facts, classes)
    lines += _section_calibration(facts)
    lines += _section_abstention(facts)
    lines += _section_gate(facts)
    if not short:
        lines += _section_training(facts)
    lines += _section_code(facts)
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    shortened = f" (shortened: the full card is the run's artifact {CARD_ARTIFACT})" if short else ""
    lines.append(f"_Figures read from MLflow for this version; card written {stamp} by emassist "
                 f"{emassist.__version__}{shortened}._")  # fmt: skip
    return "\n".join(lines) + "\n"


def description_text(facts: CardFacts) -> str:
    """The card as it fits a version's description: whole when short enough, else the short form (then cut)."""
    card = build_card(facts)
    if len(card) <= DESCRIPTION_LIMIT:
        return card
    short = build_card(facts, short=True)
    return short if len(short) <= DESCRIPTION_LIMIT else short[: DESCRIPTION_LIMIT - 2] + "…\n"


# --------------------------------------------------------------------------------------------- entry points


def model_card(client: MlflowClient, name: str, version: str | int, decision: Decision | None = None) -> str:
    """The markdown card of ``name`` ``version`` (number or alias), generated now from MLflow."""
    return build_card(gather_facts(client, name, version, decision))


def is_card(text: str | None) -> bool:
    """Whether ``text`` (a version's description) holds a card written by :func:`build_card`."""
    return bool(text) and str(text).lstrip().startswith(TITLE_PREFIX)


def card_markdown(client: MlflowClient, name: str, version: str | int) -> str:
    """The card to show for ``name`` ``version`` (number or alias): the run's full ``model_card.md`` or the
    description when they hold a card (the aliases line brought up to date), else a card generated now (a version
    registered before cards existed)."""
    mv = resolve_version(client, name, version)
    text: str | None = None
    if mv.run_id:
        with tempfile.TemporaryDirectory(prefix="emassist-card-") as tmp, _quiet_downloads():
            local = _run_artifact(client, mv.run_id, CARD_ARTIFACT, Path(tmp))
            with contextlib.suppress(OSError, UnicodeDecodeError):
                text = local.read_text(encoding="utf-8") if local is not None else None
    # a run can hold cards of several versions registered from it: only this version's own counts
    if not (is_card(text) and _titled(text or "", name, str(mv.version))):
        text = mv.description if is_card(mv.description) and _titled(mv.description, name, str(mv.version)) else None
    if text is None:
        return model_card(client, name, str(mv.version))
    aliases = ", ".join(sorted(mv.aliases or ())) or "none"
    return _ALIASES_LINE.sub(lambda _: f"- **Aliases:** {aliases}", text, count=1)


def _titled(text: str, name: str, version: str) -> bool:
    return text.lstrip().startswith(f"{TITLE_PREFIX}{name} v{version}\n")
