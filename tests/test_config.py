"""Config loading and validation."""

from __future__ import annotations

from pathlib import Path

import pytest

from famulus.daemon.config import Config, ConfigError, load_config, parse_config
from famulus.daemon.paths import UserPaths


def paths_in(root: Path) -> UserPaths:
    return UserPaths(config_dir=root / "config", data_dir=root / "data",
                     cache_dir=root / "cache", runtime_dir=root / "run")


def test_no_file_gives_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FAMULUS_CONFIG", raising=False)
    config = load_config(paths_in(tmp_path))
    assert config == Config()
    assert config.watch.folders == ("~/famulus-inbox",)
    assert config.model.devices == ("NPU", "GPU", "CPU")


def test_env_variable_names_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    file = tmp_path / "custom.toml"
    file.write_text("[watch]\nquiet_period_s = 0.5\n")
    monkeypatch.setenv("FAMULUS_CONFIG", str(file))
    assert load_config(paths_in(tmp_path)).watch.quiet_period_s == 0.5


def test_explicit_missing_file_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(paths_in(tmp_path), str(tmp_path / "nope.toml"))


def test_default_location_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FAMULUS_CONFIG", raising=False)
    paths = paths_in(tmp_path)
    paths.config_dir.mkdir(parents=True)
    paths.config_file.write_text('[model]\ndevices = ["CPU"]\n')
    assert load_config(paths).model.devices == ("CPU",)


@pytest.mark.parametrize(("raw", "message"), [
    ({"watch": {"quiet_period": 1}}, "unknown key watch.quiet_period"),
    ({"wach": {}}, r"unknown section \[wach\]"),
    ({"watch": {"quiet_period_s": "soon"}}, "invalid value 'soon' for watch.quiet_period_s"),
    ({"watch": {"quiet_period_s": 0}}, "must be at least 0.05"),
    ({"watch": {"folders": "~/inbox"}}, "expected a list of strings"),
    ({"watch": {"recursive": 1}}, "expected true or false"),
    ({"model": {"devices": ["TPU"]}}, "use one of NPU, GPU, CPU"),
    ({"model": {"max_new_tokens": 2.5}}, "expected a whole number"),
    ({"daemon": {"log_level": "loud"}}, "use one of debug"),
    ({"model": 3}, "must be a table"),
])
def test_invalid_values_name_key_and_fix(raw: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(raw, source="test.toml")


def test_invalid_toml_names_file(tmp_path: Path) -> None:
    file = tmp_path / "bad.toml"
    file.write_text("[watch\n")
    with pytest.raises(ConfigError, match="bad.toml is not valid TOML"):
        load_config(paths_in(tmp_path), str(file))


def test_watch_folders_expand_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    assert Config().watch_folders() == [tmp_path / "famulus-inbox"]


def test_ints_accepted_for_floats() -> None:
    assert parse_config({"watch": {"quiet_period_s": 3}}).watch.quiet_period_s == 3.0


def test_key_outside_section_names_section() -> None:
    with pytest.raises(ConfigError, match="outside any section; put it under its section as "
                       "watch.quiet_period_s"):
        parse_config({"quiet_period_s": 1.0})
