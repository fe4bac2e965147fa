"""Each method owns its settings: a dataclass in its own file, from which YAML, flags, validation, `--help` and the
resume comparison follow. Adding a method is its file and one registry line: shown here with a dummy method."""
import dataclasses
import json

import pytest

from dcfast.cli.main import build_parser
from dcfast.cli.train import config_from_args
from dcfast.training import methods
from dcfast.training.config import TrainConfig
from dcfast.training.methods import Method
from dcfast.training.settings import MethodSettings, setting


@dataclasses.dataclass
class DummySettings(MethodSettings):
    """The dummy method's one setting."""

    dummy_weight: float = setting(0.5, nonnegative=True)  # how much the dummy term weighs (a reason, as every default)


class Dummy(Method):
    """Sequential LoRA under another name, reading one setting."""

    name = "dummy"
    Settings = DummySettings


@pytest.fixture
def dummy_registered(monkeypatch):
    """The one line that adds a method: its registry entry."""
    monkeypatch.setattr(methods, "REGISTRY", methods.REGISTRY + (("dummy", Dummy),))
    monkeypatch.setattr(methods, "METHODS", dict(methods.REGISTRY))


def test_a_new_method_gets_yaml_flags_help_and_checks_from_its_settings(dummy_registered, make_config, capsys):
    config = TrainConfig.from_dict({"method": "dummy", "dummy_weight": "2e-1"})  # YAML text coerced to the type
    assert isinstance(config.method_settings, DummySettings) and config.method_settings.dummy_weight == 0.2
    assert config.to_dict()["method_settings"] == {"dummy_weight": 0.2}  # run.json nests the method's own settings
    assert TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config

    args = build_parser().parse_args(["train", "--method", "dummy", "--dummy_weight", "3"])
    assert config_from_args(args).method_settings.dummy_weight == 3.0
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "settings of method dummy: --dummy_weight DUMMY_WEIGHT how much the dummy term weighs" in help_text

    with pytest.raises(ValueError, match=r"dummy_weight: must be a number >= 0, got -1.0"):
        make_config("dummy", dummy_weight=-1.0).validate()
    make_config("dummy", dummy_weight=1.0).validate()
    with pytest.raises(ValueError, match=r"dummy_weight: setting\(s\) of method\(s\) dummy, not of method 'lora'"):
        TrainConfig.from_dict({"method": "lora", "dummy_weight": 1.0})


def test_settings_only_another_method_reads_are_refused_naming_that_method():
    with pytest.raises(ValueError, match=r"delta: setting\(s\) of method\(s\) dsc\+ewc-dc, ewc-dc, not of method "
                                         r"'lora', which would ignore them"):
        TrainConfig.from_dict({"method": "lora", "delta": 1e-3})
    with pytest.raises(ValueError, match=r"unknown config field\(s\) \['deltaa'\]"):
        TrainConfig.from_dict({"method": "ewc-dc", "deltaa": 1e-3})


def test_settings_may_be_flat_or_nested_and_a_new_method_keeps_the_shared_ones():
    flat = TrainConfig.from_dict({"method": "ewc-dc", "delta": 2e-3, "num_dc_timesteps": 2})
    nested = TrainConfig.from_dict({"method": "ewc-dc", "method_settings": {"delta": 2e-3, "num_dc_timesteps": 2}})
    assert flat == nested and flat.method_settings.delta == 2e-3
    dsc = flat.override(method="dsc", dsc_alpha=0.5)  # DSC reads the DC-score settings too, not delta
    assert (dsc.method_settings.num_dc_timesteps, dsc.method_settings.dsc_alpha) == (2, 0.5)
    assert not hasattr(dsc.method_settings, "delta")


def test_a_run_recorded_before_settings_were_per_method_still_reads():
    """run.json of older runs holds every method's settings flat; only the run's method's are kept."""
    old = {"method": "ewc", "ewc_lambda": 3.0, "delta": 0.1, "dsc_alpha": 1.0, "clora_lambda": 5.0, "rank": 8}
    config = TrainConfig.from_dict(old, ignore_other_methods=True)
    assert config.method_settings.ewc_lambda == 3.0 and config.rank == 8
    assert set(dataclasses.asdict(config.method_settings)) == {f.name for f in dataclasses.fields(methods.EWC.Settings)}


def test_a_resume_compares_the_methods_settings_too(make_config):
    from dcfast.training.trainer import _check_resumable
    from dcfast.io.atomic import write_json_atomic

    config = make_config("ewc", ewc_lambda=1.0)
    write_json_atomic(f"{config.output_dir}/run.json", {"config": config.to_dict(), "tasks": []})
    _check_resumable(config.override(checkpointing_steps=7), None)  # a resumable shared field may change
    with pytest.raises(ValueError, match=r"was trained with different ewc_lambda"):
        _check_resumable(config.override(ewc_lambda=2.0), None)


@pytest.mark.parametrize("name", [name for name, cls in methods.REGISTRY if cls.token_init_setting])
def test_a_methods_token_start_reads_its_own_setting(name):
    """A method that lets its tokens start random names a setting of its own with both starts; the shared
    `random_token_init` follows that setting (the trainer reads only the property)."""
    cls = methods.METHODS[name]
    field_ = {f.name: f for f in dataclasses.fields(cls.Settings)}[cls.token_init_setting]
    assert set(field_.metadata["choices"]) == {"random", "class_word"}
    for start in ("random", "class_word"):
        method = cls.__new__(cls)  # the property reads only the settings: no models needed
        method.settings = cls.Settings(**{cls.token_init_setting: start})
        assert method.random_token_init is (start == "random")


def test_methods_without_a_token_start_setting_start_at_the_class_word():
    for name, cls in methods.REGISTRY:
        if not cls.token_init_setting:
            method = cls.__new__(cls)
            method.settings = cls.Settings()
            assert method.random_token_init is False, name
