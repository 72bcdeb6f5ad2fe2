from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from emassist.config import choices
from emassist.config.settings import (
    DemoParams,
    Params,
    ParamsError,
    PolicyParams,
    S3Params,
    TrainParams,
    check_class_names,
    load_params,
    params_from_dict,
)
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
        # Checked here once (they were also checked, with other bounds, in the builders, the offline augmentation,
        # the demo generator and the NFFA download): every one stops in load_params, naming its key.
        ({"train": {"model": "resnet"}}, "train.model.*simple_cnn, compact_cnn, xception"),
        ({"train": {"optimizer": "adagrad"}}, "train.optimizer.*rmsprop, adam, sgd"),
        ({"train": {"model": "simple_cnn", "weights": "imagenet"}}, "train.weights"),
        ({"train": {"model": "compact_cnn", "weights": "imagenet"}}, "train.weights"),
        ({"train": {"model": "xception", "image_size": 70}}, "train.image_size.*71"),
        ({"train": {"model": "simple_cnn", "image_size": 4}}, "train.image_size"),
        ({"train": {"model": "compact_cnn", "image_size": 31}}, "train.image_size.*32"),
        ({"train": {"dropout": 1.0}}, "train.dropout"),
        ({"train": {"dropout": -0.1}}, "train.dropout"),
        ({"train": {"learning_rate": 0}}, "train.learning_rate"),
        ({"train": {"finetune_blocks": 15}}, "train.finetune_blocks"),
        ({"train": {"finetune_blocks": -1}}, "train.finetune_blocks"),
        ({"augment": {"target_per_class": -1}}, "augment.target_per_class"),
        ({"augment": {"policy": {"rotation": -0.1}}}, "augment.policy.rotation"),
        ({"augment": {"policy": {"zoom": 1.5}}}, "augment.policy.zoom"),
        ({"augment": {"policy": {"zoom": float("nan")}}}, "augment.policy.zoom"),
        ({"augment": {"policy": {"flip": "yes"}}}, "augment.policy.flip"),
        ({"augment": {"policy": {"rot90": 1}}}, "augment.policy.rot90"),
        ({"augment": {"policy": {"brightness": True}}}, "augment.policy.brightness"),
        ({"augment": {"policy": {"rotaton": 0.1}}}, "augment.policy.rotaton"),
        ({"demo": {"n_images": 29, "min_per_class": 3}}, "demo.n_images"),
        ({"demo": {"n_images": 5, "min_per_class": 1}}, "demo.n_images"),
        ({"demo": {"n_images": 60.0}}, "demo.n_images"),
        ({"demo": {"min_per_class": 0}}, "demo.min_per_class"),
        ({"demo": {"width": 16}}, "demo.width"),
        ({"demo": {"width": True}}, "demo.width"),
        ({"demo": {"height": 100_000}}, "demo.height"),
        ({"demo": {"seed": -1}}, "demo.seed"),
        ({"demo": {"tif_fraction": 1.5}}, "demo.tif_fraction"),
        ({"demo": {"databar_fraction": -0.1}}, "demo.databar_fraction"),
        ({"nffa": {"retries": -1}}, "nffa.retries"),
        ({"nffa": {"timeout_s": 0}}, "nffa.timeout_s"),
        ({"nffa": {"base_url": "ftp://x"}}, "nffa.base_url.*http"),
        ({"data": {"classes": ["../x", "Tips"]}}, "data.classes"),
    ],
)
def test_bad_values_name_the_key(overrides: dict, key: str) -> None:
    pattern = ".*".join(re.escape(part) for part in key.split(".*"))  # "key.*text": the key, then the text
    with pytest.raises(ParamsError, match=pattern):
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
    from emassist.pipeline import split

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


def test_finetune_blocks_zero_stops_in_load_params_before_any_work(tmp_path: Path) -> None:
    """The drift bug: finetune_blocks 0 passed load_params, then an xception run died after its head phase."""
    weights = tmp_path / "base.weights.h5"
    weights.write_bytes(b"")  # only its existence and suffix are checked at load
    raw = _params_with(train={"model": "xception", "image_size": 71, "weights": str(weights), "finetune_epochs": 1,
                              "finetune_blocks": 0})  # fmt: skip
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ParamsError, match=r"train\.finetune_blocks: must be between 1 and 14"):
        load_params(path)
    raw["train"]["finetune_blocks"] = choices.XCEPTION_BLOCKS  # the largest allowed value loads
    path.write_text(yaml.safe_dump(raw))
    assert load_params(path).train.finetune_blocks == 14


def test_weights_file_must_be_h5(tmp_path: Path) -> None:
    (tmp_path / "w.txt").write_text("not weights")
    with pytest.raises(ParamsError, match=r"train\.weights.*\.h5"):
        params_from_dict(
            _params_with(train={"model": "xception", "image_size": 71, "weights": str(tmp_path / "w.txt")})
        )
    missing = tmp_path / "nowhere.h5"
    with pytest.raises(ParamsError, match=r"train\.weights") as err:
        params_from_dict(_params_with(train={"model": "xception", "image_size": 71, "weights": str(missing)}))
    assert str(missing) in str(err.value)


def test_dataclass_defaults_are_params_yaml() -> None:
    """One set of defaults: building the settings with no params file gives exactly the repository's params.yaml."""
    import dataclasses

    loaded = load_params(REPO_ROOT / "params.yaml")
    defaults = Params()
    differ = [
        f"{section.name}.{key}: dataclass {value!r} != params.yaml {yaml_value!r}"
        for section in dataclasses.fields(Params)
        for key, value in dataclasses.asdict(getattr(defaults, section.name)).items()
        if value != (yaml_value := dataclasses.asdict(getattr(loaded, section.name))[key])
    ]
    assert not differ, "\n".join(differ)
    assert defaults == loaded
    # Every key of params.yaml is a field (and vice versa), so no default hides behind a missing key.
    raw = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    for section in dataclasses.fields(Params):
        assert set(raw[section.name]) == {f.name for f in dataclasses.fields(getattr(defaults, section.name))}, section
    defaults.check()  # and they are valid


def test_a_policy_lists_what_it_turns_on() -> None:
    """PolicyParams' own defaults are the identity (a key a policy leaves out is off); the sections' defaults are
    params.yaml's policies."""
    assert not any(PolicyParams().as_dict().values())
    raw = _params_with(augment={"online_policy": {"zoom": 0.5}})
    online = params_from_dict(raw).augment.online_policy
    assert online == PolicyParams(zoom=0.5)
    assert tuple(PolicyParams().as_dict()) == choices.POLICY_KEYS
    assert set(choices.POLICY_KEYS) == set(choices.POLICY_FRACTIONS) | set(choices.POLICY_SWITCHES)


def test_every_model_has_a_minimum_size() -> None:
    assert set(choices.MIN_IMAGE_SIZE) == set(choices.MODEL_NAMES)
    for name, smallest in choices.MIN_IMAGE_SIZE.items():
        weights = {"weights": None}
        TrainParams(model=name, image_size=smallest, **weights).check()
        with pytest.raises(ParamsError, match=r"train\.image_size"):
            TrainParams(model=name, image_size=smallest - 1, **weights).check()


def test_demo_overrides_are_checked_by_the_same_validator() -> None:
    import dataclasses

    with pytest.raises(ParamsError, match=r"demo\.n_images"):
        dataclasses.replace(DemoParams(), n_images=5).check()
    DemoParams().check()


def test_class_names_and_bucket() -> None:
    with pytest.raises(ParamsError, match=re.escape("unknown class name '../x'")):
        check_class_names("--classes", ["../x"])
    check_class_names("--classes", ["Tips"])
    with pytest.raises(ParamsError, match=r"s3\.bucket: not set"):
        S3Params().require_bucket()
    assert S3Params(bucket="sem-data").require_bucket() == "sem-data"
