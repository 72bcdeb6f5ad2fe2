"""Registry: registration tags, the promotion gate, promote/rollback and the CLI, against a real `mlflow server`.

Two real models are logged and registered (a tiny brightness classifier that is right on the test split, and one
that always answers "Fibres"); further versions are registered from the same logged models with the figures and
data versions each scenario needs, each scenario under its own registered-model name.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from tests.helpers import BRIGHTNESS_CLASSES as CLASSES
from tests.helpers import brightness_model, models_cli
from tests.servers import mlflow_tracking_server, tracking_uri_env
from tests.system.test_serving import MODEL_NAME, make_params, make_run

pytestmark = pytest.mark.slow

LEVELS = {"Fibres": 30, "Particles": 128, "Tips": 220}


def write_test_split(splits: Path, per_class: int = 3) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    rows = []
    for label, level in LEVELS.items():
        for i in range(per_class):
            path = splits.parent / "interim" / label / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            pixels = np.clip(level + rng.integers(-8, 8, (64, 64)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(path)
            rows.append({"image_path": str(path), "label": label})
    splits.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(splits / "test.csv", index=False)
    return splits / "test.csv"


@pytest.fixture(scope="module")
def reg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from emassist.model import registry
    from emassist.model.tracking import data_version

    tmp = tmp_path_factory.mktemp("registry")
    with mlflow_tracking_server(tmp) as uri, tracking_uri_env(uri):
        params = make_params(tmp, uri)
        test_csv = write_test_split(tmp / "splits")
        dv = data_version(tmp / "splits")["data_version"]
        good_file = brightness_model(tmp / "good.keras", good=True)
        bad_file = brightness_model(tmp / "bad.keras", good=False)
        good = registry.log_and_register(params, make_run(params, f1=0.9, data_version=dv), model_file=good_file)
        bad = registry.log_and_register(params, make_run(params, f1=0.5, data_version=dv), model_file=bad_file)
        yield {
            "uri": uri,
            "params": params,
            "client": registry._client(),
            "good": good,
            "bad": bad,
            "test_csv": test_csv,
            "dv": dv,
            "tmp": tmp,
            "good_file": good_file,
        }


def add_version(reg: dict[str, Any], name: str, source: str, *, f1: float | None, dv: str | None = None) -> str:
    """Register another version of an already logged model with the given figures."""
    client = reg["client"]
    if not client.search_registered_models(f"name = '{name}'"):
        client.create_registered_model(name)
    mv = reg[source]
    tags = {"data_version": dv or reg["dv"]}
    if f1 is not None:
        tags["test_macro_f1"] = repr(f1)
    model_id = mv.model_id or mv.source.removeprefix("models:/")  # source is models:/<logged model id>
    created = client.create_model_version(name, source=mv.source, run_id=mv.run_id, tags=tags, model_id=model_id)
    return str(created.version)


def _b64_level(level: int) -> str:
    import base64
    import io

    from PIL import Image

    buf = io.BytesIO()
    noise = np.random.default_rng(level).integers(-10, 10, (64, 64))  # not featureless (flat frames are refused)
    Image.fromarray(np.clip(level + noise, 0, 255).astype(np.uint8)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def champion(reg: dict[str, Any], name: str) -> str | None:
    from emassist.model.registry import champion_version

    return champion_version(reg["client"], name)


# --------------------------------------------------------------------------------------------- tests


def test_log_and_register_copies_run_figures(reg: dict[str, Any]) -> None:
    client = reg["client"]
    good = client.get_model_version(MODEL_NAME, reg["good"].version)
    bad = client.get_model_version(MODEL_NAME, reg["bad"].version)
    assert float(good.tags["test_macro_f1"]) == pytest.approx(0.9)
    assert good.tags["data_version"] == reg["dv"] and good.tags["git_commit"] == "abc123"
    assert "challenger" in bad.aliases and "challenger" not in good.aliases  # the newest is the challenger
    assert good.run_id != bad.run_id


def test_gate_promotes_first_version(reg: dict[str, Any]) -> None:
    from emassist.model.registry import gate

    v1 = add_version(reg, "gate-first", "good", f1=0.7)
    decision = gate(reg["client"], "gate-first", v1, 0.0)
    assert decision.promoted and decision.reason == "no champion yet"
    assert champion(reg, "gate-first") == v1
    tags = reg["client"].get_model_version("gate-first", v1).tags
    assert tags["gate_decision"] == "promoted"
    assert float(tags["gate_challenger_macro_f1"]) == pytest.approx(0.7)
    assert tags["gate_champion_macro_f1"] == "none"


def test_worse_challenger_never_becomes_champion(reg: dict[str, Any]) -> None:
    from emassist.model.registry import gate, promote

    name = "gate-worse"
    v1 = add_version(reg, name, "good", f1=0.9)
    promote(name, v1, client=reg["client"])
    v2 = add_version(reg, name, "bad", f1=0.5)
    decision = gate(reg["client"], name, v2, 0.0, test_csv=reg["test_csv"], classes=CLASSES)
    assert not decision.promoted
    assert champion(reg, name) == v1
    tags = reg["client"].get_model_version(name, v2).tags
    assert tags["gate_decision"] == "rejected"
    assert float(tags["gate_challenger_macro_f1"]) == pytest.approx(0.5)
    assert float(tags["gate_champion_macro_f1"]) == pytest.approx(0.9)
    assert "both on data_version" in tags["gate_basis"]
    # An equal figure does not replace the champion either.
    v3 = add_version(reg, name, "good", f1=0.9)
    assert not gate(reg["client"], name, v3, 0.0).promoted
    assert champion(reg, name) == v1


def test_better_challenger_is_promoted_only_beyond_the_margin(reg: dict[str, Any]) -> None:
    from emassist.model.registry import PREVIOUS_CHAMPION_TAG, gate, promote

    name = "gate-better"
    client = reg["client"]
    v1 = add_version(reg, name, "good", f1=0.80)
    promote(name, v1, client=client)
    v2 = add_version(reg, name, "good", f1=0.85)
    held = gate(client, name, v2, 0.1)
    assert not held.promoted and champion(reg, name) == v1
    assert client.get_model_version(name, v2).tags["gate_margin"] == "0.1"
    decision = gate(client, name, v2, 0.0)
    assert decision.promoted and decision.champion_version == v1
    assert champion(reg, name) == v2
    assert client.get_registered_model(name).tags[PREVIOUS_CHAMPION_TAG] == v1
    assert client.get_model_version(name, v2).tags["gate_decision"] == "promoted"


def test_gate_reevaluates_across_data_versions(reg: dict[str, Any]) -> None:
    from emassist.model.registry import gate, promote

    name = "gate-dv"
    client = reg["client"]
    # The champion looked great on an older split; on the current one it always says "Fibres".
    v1 = add_version(reg, name, "bad", f1=0.95, dv="old-split")
    promote(name, v1, client=client)
    v2 = add_version(reg, name, "good", f1=0.7)
    refused = gate(client, name, v2, 0.0, apply=False)  # no test split: no comparison across data versions
    assert not refused.promoted and "not comparable" in refused.reason
    decision = gate(client, name, v2, 0.0, test_csv=reg["test_csv"], classes=CLASSES, current_data_version=reg["dv"])
    assert decision.promoted, decision
    assert "re-evaluated" in decision.basis
    assert decision.champion_macro_f1 == pytest.approx(1 / 6)  # F1 0.5 for Fibres, 0 for the others
    assert decision.challenger_macro_f1 == pytest.approx(0.7)  # recorded on the current split: kept
    assert champion(reg, name) == v2


def test_evaluate_version_matches_models(reg: dict[str, Any]) -> None:
    from emassist.model.registry import evaluate_version

    good = evaluate_version(MODEL_NAME, reg["good"].version, reg["test_csv"], CLASSES, client=reg["client"])
    assert good == pytest.approx(1.0)


def test_promote_rollback_round_trip(reg: dict[str, Any]) -> None:
    from emassist.model.registry import RegistryError, list_versions, promote, rollback

    name = "roundtrip"
    client = reg["client"]
    v1, v2, v3 = (add_version(reg, name, "good", f1=f) for f in (0.5, 0.6, 0.7))
    with pytest.raises(RegistryError, match="nothing to roll back"):
        rollback(name, client=client)
    assert promote(name, v1, client=client) is None
    assert promote(name, v2, client=client) == v1
    assert champion(reg, name) == v2
    assert rollback(name, client=client) == (v2, v1)
    assert champion(reg, name) == v1
    assert rollback(name, client=client) == (v1, v2)  # a second rollback undoes the first
    assert champion(reg, name) == v2
    frame = list_versions(name, client=client)
    assert frame["version"].tolist() == [int(v3), int(v2), int(v1)]
    assert frame.set_index("version").loc[int(v2), "aliases"] == "champion"
    assert frame.set_index("version").loc[int(v3), "test_macro_f1"] == pytest.approx(0.7)
    assert {"version", "aliases", "test_macro_f1", "created", "run_id"} <= set(frame.columns)


def test_cli_promote_rollback_list(reg: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import yaml

    name = "cli-model"
    v1, v2 = (add_version(reg, name, "good", f1=f) for f in (0.5, 0.6))
    params_file = tmp_path / "params.yaml"
    params_file.write_text(
        yaml.safe_dump({"data": {"classes": CLASSES}, "mlflow": {"tracking_uri": reg["uri"], "registered_model": name}})
    )
    assert models_cli(params_file, "rollback") == 1
    assert "nothing to roll back" in capsys.readouterr().err
    assert models_cli(params_file, "promote", "--version", v1) == 0
    assert models_cli(params_file, "promote", "--version", v2) == 0
    assert f"champion is now version {v2} (was {v1})" in capsys.readouterr().out
    assert models_cli(params_file, "rollback") == 0
    assert f"rolled back from version {v2} to {v1}" in capsys.readouterr().out
    assert champion(reg, name) == v1
    assert models_cli(params_file, "models", "list", "--format", "json") == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["version"], r["aliases"]) for r in rows] == [(int(v2), ""), (int(v1), "champion")]
    assert models_cli(params_file, "models", "list") == 0
    assert "champion" in capsys.readouterr().out


def test_register_stage_writes_report(
    reg: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from emassist.config.settings import params_from_dict
    from stages.register import main

    name = "stage-model"
    (tmp_path / "models").mkdir()
    shutil.copy(reg["good_file"], tmp_path / "models" / "model.keras")
    run_id = make_run(reg["params"], f1=0.75, data_version=reg["dv"])
    (tmp_path / "models" / "run.json").write_text(json.dumps({"run_id": run_id, "tracking_uri": reg["uri"]}))
    # what the evaluate stage writes: the temperature fitted on val goes into the registered serving config
    (tmp_path / "models" / "calibration.json").write_text(json.dumps({"temperature": 1.5, "ece_before": 0.1}))
    monkeypatch.chdir(tmp_path)
    params = params_from_dict(
        {
            "data": {"classes": CLASSES, "splits_dir": str(reg["tmp"] / "splits")},
            "ingest": {"cache_size": 64},
            "train": {"image_size": 32},
            "mlflow": {"tracking_uri": reg["uri"], "experiment": "tests", "registered_model": name},
        }
    )
    main(params)
    report = json.loads((tmp_path / "reports" / "registry.json").read_text())
    assert report["decision"] == "promoted" and report["version"] == "1"
    assert sorted(report["aliases"]) == ["challenger", "champion"]
    assert report["run_id"] == run_id
    assert "promoted" in capsys.readouterr().out

    import mlflow

    config_uri = f"models:/{name}/1/artifacts/serving_config.json"
    config = json.loads(Path(mlflow.artifacts.download_artifacts(artifact_uri=config_uri)).read_text())
    assert config["temperature"] == 1.5
    served = mlflow.pyfunc.load_model(f"models:/{name}/1").unwrap_python_model()
    assert (served.temperature, served.calibrated) == (1.5, True)


def test_version_registered_without_calibration_is_served_uncalibrated(reg: dict[str, Any]) -> None:
    """A model registered before calibration (no calibration.json, no temperature in its config): T = 1."""
    import mlflow

    config_uri = f"models:/{MODEL_NAME}/{reg['good'].version}/artifacts/serving_config.json"
    config = json.loads(Path(mlflow.artifacts.download_artifacts(artifact_uri=config_uri)).read_text())
    assert "temperature" not in config
    served = mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}/{reg['good'].version}").unwrap_python_model()
    assert (served.temperature, served.calibrated) == (1.0, False)
    frame = served.predict(None, pd.DataFrame({"image": [_b64_level(220)]}))
    assert frame.loc[0, "label"] == "Tips" and frame.loc[0, "error"] == ""
