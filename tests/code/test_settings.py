from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from emassist.config.settings import ParamsError, load_params, params_from_dict
from tests.conftest import REPO_ROOT


def _params_with(**overrides: dict) -> dict:
    raw = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    for section, values in overrides.items():
        raw[section] = {**raw[section], **values}
    return raw


def test_repo_params_load() -> None:
    params = load_params(REPO_ROOT / "params.yaml")
    assert params.data.source == "demo"
    assert abs(sum(params.split.ratios.values()) - 1) < 1e-9
    assert len(params.data.classes) == 10


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"split": {"train": -0.1}}, "split.train"),
        ({"split": {"train": 0.6}}, "sum to 1"),
        ({"data": {"classes": ["Particles", "Unicorns"]}}, "data.classes"),
        ({"data": {"source": "ftp"}}, "data.source"),
        ({"ingest": {"cache_size": "big"}}, "ingest.cache_size"),
        ({"ingest": {"crop_databar": "yes"}}, "ingest.crop_databar"),
        ({"validate": {"max_rejected_fraction": 2}}, "validate.max_rejected_fraction"),
        ({"demo": {"min_per_class": 500}}, "demo.n_images"),
        ({"split": {"typo_key": 1}}, "split.typo_key"),
        ({"train": {"lr_schedule": "step"}}, "train.lr_schedule"),
        ({"train": {"model": "compact_cnn", "image_size": 24}}, "train.image_size"),
        ({"augment": {"online_policy": {"zoom": 1.5}}}, "augment.online_policy.zoom"),
        ({"augment": {"online_policy": {"mixup": 0.2}}}, "augment.online_policy.mixup"),
        ({"augment": {"online_policy": {"rot90": "yes"}}}, "augment.online_policy.rot90"),
        ({"train": {"label_smoothing": 1.0}}, "train.label_smoothing"),
    ],
)
def test_bad_values_name_the_key(overrides: dict, key: str) -> None:
    with pytest.raises(ParamsError, match=key.replace(".", r"\.")):
        params_from_dict(_params_with(**overrides))


def test_unknown_section_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ParamsError, match="unknown section"):
        params_from_dict({"trainn": {}})
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("split: [unclosed")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(bad)


def test_stage_fails_before_work_with_bad_params(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from stages import split

    raw = _params_with(split={"train": 0.8})
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(tmp_path)
    called = []
    monkeypatch.setattr(split, "split_manifest", lambda *a, **k: called.append(1))
    from emassist.pipeline.stagerun import run_stage

    assert run_stage("split", "", split.main, ["--params", str(path)]) == 2
    assert not called
    assert not (tmp_path / "data").exists()


def test_gpu_profile_is_valid_and_uses_xception_with_imagenet() -> None:
    params = load_params(REPO_ROOT / "profiles" / "gpu.yaml")
    assert params.data.source == "nffa"
    assert (params.train.model, params.train.image_size, params.train.weights) == ("xception", 299, "imagenet")
    assert params.train.finetune_epochs > 0 and params.train.finetune_learning_rate < params.train.learning_rate
