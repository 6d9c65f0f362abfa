"""Configuration: precedence, --set routing to common keys or method params, clear errors for typos."""

from __future__ import annotations

from pathlib import Path

import pytest

from semiseg.config import build_config, parse_set
from semiseg.errors import ConfigError


def test_defaults_are_the_la_recipe() -> None:
    cfg = build_config("supervised")
    assert cfg.patch_size == (112, 112, 80) and cfg.stride == (18, 18, 4)
    assert (cfg.optimizer, cfg.lr, cfg.momentum, cfg.weight_decay, cfg.iterations) == ("sgd", 0.01, 0.9, 1e-4, 15000)
    assert cfg.batch_labeled == 2 and cfg.batch_unlabeled == 0  # the supervised recipe drops the unlabelled stream


def test_set_overrides_common_keys_and_method_params() -> None:
    cfg = build_config("supervised", overrides=parse_set(["patch_size=64,64,48", "lr=0.02", "loss=dice"]))
    assert cfg.patch_size == (64, 64, 48) and cfg.lr == 0.02 and cfg.method_params().loss == "dice"


def test_yaml_file_then_cli_overrides(tmp_path: Path) -> None:
    file = tmp_path / "run.yaml"
    file.write_text("method: supervised\nlabeled: 4\nlr: 0.05\nparams:\n  loss: dice\n")
    cfg = build_config(None, file, {"lr": 0.1})
    assert cfg.labeled == 4 and cfg.lr == 0.1 and cfg.params == {"loss": "dice"}


@pytest.mark.parametrize(("overrides", "message"), [
    ({"learning_rate": 0.1}, "unknown config key 'learning_rate'"),
    ({"lr": "fast"}, "config key 'lr'"),
    ({"loss": "focal"}, "parameter 'loss'"),
    ({"patchsize": "1,2,3"}, "did you mean 'patch_size'"),
    ({"patch_size": "100,100,80"}, "multiple of 16"),
    ({"patch_size": "32,32,16", "stride": "8,8,32"}, "between 1 and the patch size"),
])
def test_bad_keys_and_values_are_named(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_config("supervised", overrides=overrides)


def test_unknown_method_suggests_a_close_name() -> None:
    with pytest.raises(ConfigError, match="did you mean 'supervised'"):
        build_config("supervized")


def test_malformed_set_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_set(["lr"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        build_config(None, bad)
    with pytest.raises(ConfigError, match="not found"):
        build_config(None, tmp_path / "missing.yaml")
