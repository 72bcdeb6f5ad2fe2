"""Model cards (emassist.model.card): built from a version's real MLflow figures, written by the register step,
printed by ``emassist models card``; and the training-data notice of ``emassist predict``.

A real MLflow tracking store on a sqlite file (no server): versions of a tiny Keras model are registered from runs
whose metrics and evaluation artifacts are known, so the card's numbers can be checked against them.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers import BRIGHTNESS_CLASSES as CLASSES
from tests.helpers import brightness_model, image_bytes, models_cli

pytest.importorskip("keras")
pytest.importorskip("mlflow")

NAME = "card-model"
# What the evaluate stage logs (test_<key>), with figures distinct enough to be found in the text.
METRICS = {
    "test_accuracy": 0.8125,
    "test_macro_f1": 0.7734,
    "test_balanced_accuracy": 0.7951,
    "test_top3_accuracy": 1.0,
    "test_n": 48.0,
    "test_temperature": 1.734,
    "test_ece_before": 0.1234,
    "test_ece_after": 0.0456,
    "test_nll_before": 0.6789,
    "test_nll_after": 0.5432,
    "test_review_threshold": 0.8765,
    "test_coverage": 0.9312,
    "test_selective_accuracy": 0.9904,
    "test_target_accuracy": 0.99,
    "test_unfamiliar_threshold": 3.2109,
    "test_unfamiliar_share": 0.0417,
}
PER_CLASS = {
    "Fibres": {"precision": 0.9123, "recall": 0.8456, "f1": 0.8777, "support": 16},
    "Particles": {"precision": 0.7012, "recall": 0.6543, "f1": 0.6769, "support": 16},
    "Tips": {"precision": 0.8, "recall": 0.9375, "f1": 0.8633, "support": 16},
}
PAIRS = "category,confused_for,percent,count\nParticles,Tips,31.2500,5\nFibres,Particles,12.5000,2\n"


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A sqlite store with: v1, a demo-trained version registered and gated as the register stage does, whose run
    has every figure and the evaluation artifacts; v2, a version as registered before this issue (a run with only
    test_macro_f1, a serving config with no training data and no temperature)."""
    import mlflow

    from emassist.config.settings import params_from_dict
    from emassist.model import registry
    from emassist.model.tracking import flat_params, setup_mlflow

    tmp = tmp_path_factory.mktemp("card")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    raw = {
        "data": {"classes": CLASSES, "splits_dir": str(tmp / "splits")},
        "ingest": {"cache_size": 64, "min_side": 16},
        "train": {"image_size": 32, "model": "compact_cnn"},
        "mlflow": {"tracking_uri": uri, "experiment": "cards", "registered_model": NAME},
    }
    params = params_from_dict(raw)
    previous_uri = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)  # artifacts in the temporary folder, not ./mlartifacts of the checkout
    mlflow.create_experiment("cards", artifact_location=(tmp / "artifacts").as_uri())
    setup_mlflow(params)
    model_file = brightness_model(tmp / "model.keras")
    evaluation = tmp / "evaluation"
    evaluation.mkdir()
    (evaluation / "metrics.json").write_text(json.dumps({"accuracy": METRICS["test_accuracy"], "per_class": PER_CLASS}))
    (evaluation / "confused_pairs.csv").write_text(PAIRS)
    with mlflow.start_run() as run:
        mlflow.log_params(flat_params(params))
        mlflow.log_params({"n_train": 210, "n_val": 60})
        mlflow.log_metrics(METRICS)
        mlflow.set_tags({"git_commit": "0123abc", "data_version": "dv-card-1", "data_source": "demo",
                         "model": "compact_cnn"})  # fmt: skip
        mlflow.log_artifacts(str(evaluation), artifact_path="evaluation")
    v1 = registry.log_and_register(params, run.info.run_id, model_file=model_file).version
    client = mlflow.MlflowClient()
    registry.gate(client, NAME, v1, 0.0)  # no champion yet: promoted; the decision goes into the version's tags

    old_config = {k: v for k, v in registry.serving_config(params).items() if k != "training_data"}
    with mlflow.start_run() as old_run:
        mlflow.log_metric("test_macro_f1", 0.5)
        mlflow.set_tags({"git_commit": "fedcba9", "data_version": "dv-old", "model": "simple_cnn"})
    original = registry.serving_config
    registry.serving_config = lambda *_a, **_k: old_config  # what a registration before provenance shipped
    try:
        v2 = registry.log_and_register(params, old_run.info.run_id, model_file=model_file).version
    finally:
        registry.serving_config = original
    params_file = tmp / "params.yaml"
    params_file.write_text(yaml.safe_dump(raw))
    yield {"tmp": tmp, "uri": uri, "params": params, "raw": raw, "client": client, "v1": str(v1), "v2": str(v2),
           "params_file": params_file, "model_file": model_file, "run_id": run.info.run_id}  # fmt: skip
    mlflow.set_tracking_uri(previous_uri)


def test_card_names_the_versions_real_figures(store: dict[str, Any]) -> None:
    from emassist.model.card import model_card
    from emassist.model.provenance import DEMO_NOTICE

    card = model_card(store["client"], NAME, store["v1"])
    assert card.startswith(f"# Model card: {NAME} v{store['v1']}\n")
    assert DEMO_NOTICE in card.split("## Intended use")[0]  # the notice sits at the top
    for key in ("accuracy", "macro_f1", "balanced_accuracy", "ece_before", "ece_after", "nll_before", "nll_after",
                "review_threshold", "unfamiliar_threshold"):  # fmt: skip
        assert f"{METRICS[f'test_{key}']:.4f}" in card, key
    assert "93.1 %" in card and "99.0 %" in card and "4.2 %" in card  # coverage, selective accuracy, unfamiliar
    for name, row in PER_CLASS.items():
        assert f"| {name} | {row['precision']:.3f} | {row['recall']:.3f} | {row['f1']:.3f} | {row['support']} |" in card
    assert "| Particles | Tips | 31.2 | 5 |" in card  # the most confused pair, first
    assert "promoted: no champion yet" in card
    assert "0123abc" in card and "dv-card-1" in card and "`compact_cnn`" in card
    assert "Hamming distance <= 4" in card and "flips and quarter turns" in card and "0.7/0.2/0.1" in card
    assert "shipped with the model: none" in card  # registered without a calibration file
    assert "not recorded" not in card.split("## Training")[0]  # every figure above the params was found


def test_register_step_writes_the_card_everywhere(
    store: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import mlflow

    from emassist.model.card import CARD_ARTIFACT, is_card
    from emassist.pipeline.register import CARD, main

    (tmp_path / "models").mkdir()
    shutil.copy(store["model_file"], tmp_path / "models" / "model.keras")
    (tmp_path / "models" / "run.json").write_text(json.dumps({"run_id": store["run_id"]}))
    monkeypatch.chdir(tmp_path)
    report = main(store["params"])
    version = report["version"]
    card = (tmp_path / CARD).read_text()
    assert card.startswith(f"# Model card: {NAME} v{version}\n") and f"{METRICS['test_macro_f1']:.4f}" in card
    assert report["model_card"] == str(CARD)
    mv = store["client"].get_model_version(NAME, version)
    assert is_card(mv.description) and f"{METRICS['test_ece_after']:.4f}" in mv.description
    logged = mlflow.artifacts.download_artifacts(run_id=store["run_id"], artifact_path=CARD_ARTIFACT)
    assert Path(logged).read_text() == card
    assert "rejected" in card or "promoted" in card  # its own gate decision
    assert f"emassist models card {version}" in capsys.readouterr().out


def test_cli_prints_the_card_of_a_version_or_alias(store: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    assert models_cli(store["params_file"], "models", "card", "champion") == 0
    out = capsys.readouterr().out
    assert out.startswith(f"# Model card: {NAME} v{store['v1']}\n")
    assert f"{METRICS['test_accuracy']:.4f}" in out


def test_older_version_gets_a_generated_card_saying_not_recorded(
    store: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    assert models_cli(store["params_file"], "models", "card", store["v2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"# Model card: {NAME} v{store['v2']}\n")
    calibration = out.split("## Calibration")[1].split("## Abstention")[0]
    assert "| ECE | not recorded | not recorded |" in calibration
    assert "Review threshold (confidence, set on val):** not recorded" in out
    assert "| accuracy | not recorded |" in out and "| macro-F1 | 0.5000 |" in out
    assert "fedcba9" in out and "dv-old" in out
    assert "NOTICE" not in out  # neither its config nor its run says what it was trained on: no claim either way


@pytest.mark.parametrize("ref", ["999", "nosuchalias"])
def test_unknown_version_is_one_line_and_exit_1(
    store: dict[str, Any], ref: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert models_cli(store["params_file"], "models", "card", ref) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and captured.err.startswith("error: ")
    assert f"{NAME} has no" in captured.err and ref in captured.err and "emassist models list" in captured.err


def test_card_help_is_helpful(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        models_cli(Path("params.yaml"), "models", "card", "--help")
    out = capsys.readouterr().out
    for word in ("VERSION", "champion", "not recorded", "Exit codes"):
        assert word in out


def test_demo_notice_only_for_synthetic_training_data() -> None:
    from emassist.model.card import CardFacts, build_card
    from emassist.model.provenance import DEMO_NOTICE

    def card(source: str, synthetic: bool) -> str:
        data = {"source": source, "version": "abc", "synthetic": synthetic, "notice": ""}
        return build_card(CardFacts(name="m", version="1", serving_config={"classes": CLASSES, "training_data": data}))

    assert DEMO_NOTICE in card("demo", True)
    nffa = card("nffa", False)
    assert DEMO_NOTICE not in nffa and "NOTICE" not in nffa and "**Source:** nffa" in nffa
    # nothing recorded at all: still a card, every figure "not recorded"
    bare = build_card(CardFacts(name="m", version="7"))
    assert bare.startswith("# Model card: m v7\n") and bare.count("not recorded") > 10


def test_long_cards_fit_the_description_limit() -> None:
    from emassist.model.card import DESCRIPTION_LIMIT, CardFacts, build_card, description_text, is_card

    classes = [f"Class_with_a_long_name_{i:02d}" for i in range(40)]
    per_class = {c: {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 10} for c in classes}
    params = {f"train.knob_{i:02d}": "x" * 40 for i in range(40)}
    facts = CardFacts(name="m", version="2", params=params, serving_config={"classes": classes},
                      evaluation={"per_class": per_class})  # fmt: skip
    assert len(build_card(facts)) > DESCRIPTION_LIMIT
    text = description_text(facts)
    assert len(text) <= DESCRIPTION_LIMIT and is_card(text)


def test_predict_prints_what_the_model_was_trained_on(
    store: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from emassist.model.provenance import DEMO_NOTICE

    image = tmp_path / "a.png"
    image.write_bytes(image_bytes("png", seed=1, level=220))
    out = tmp_path / "p.csv"
    args = ("predict", str(image), "--out", str(out), "--no-progress")
    assert models_cli(store["params_file"], *args, "--model", f"models:/{NAME}/{store['v1']}") == 0
    err = capsys.readouterr().err
    assert "training data: demo" in err and DEMO_NOTICE in err
    assert err.index(DEMO_NOTICE) < err.index("1 predicted")
    # a model registered before provenance was shipped: said so, and it still predicts
    assert models_cli(store["params_file"], *args, "--model", f"models:/{NAME}/{store['v2']}") == 0
    err = capsys.readouterr().err
    assert "training data: not recorded" in err and "NOTICE" not in err


def test_target_not_reached_is_said_plainly() -> None:
    from emassist.model.card import CardFacts, build_card

    config = {"classes": CLASSES, "temperature": 1.2, "review_threshold": None, "target_reached": False}
    metrics = {"test_target_accuracy": 0.99, "test_coverage": 0.0}
    card = build_card(CardFacts(name="m", version="3", serving_config=config, metrics=metrics))
    assert "no threshold reaches the target on val, every answer is flagged for review" in card
    assert "(answered images):** none: no test image was answered without review" in card
    assert "shipped with the model: 1.200" in card
