"""Checks that config.example.toml and docs/protocol.md match the code they document."""

from __future__ import annotations

import dataclasses
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from famulus.daemon.config import Config, parse_config, parse_plugin_section, settings
from famulus.ipc.protocol import ErrorCode, Method, Topic, catalogue
from famulus.plugins.clipboard import ClipboardPlugin
from famulus.plugins.digest import DigestPlugin

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_CONFIG = ROOT / "config.example.toml"
PROTOCOL_DOC = ROOT / "docs" / "protocol.md"

SETTING_KEYS = [key for key, _field, _kind in settings()]
CATALOGUE_VALUES = [(cls.__name__, value) for cls in (Method, Topic, ErrorCode)
                    for value in catalogue(cls)]

SECTION_LINE = re.compile(r"^\[(?P<section>[A-Za-z0-9_.]+)\]\s*$")
# Built-in plugins with a config schema, documented as [plugins.NAME] tables.
PLUGIN_SCHEMAS = {cls.name: cls.config_schema for cls in (ClipboardPlugin, DigestPlugin)}
PLUGIN_KEYS = [f"plugins.{name}.{f.name}" for name, schema in PLUGIN_SCHEMAS.items()
               for f in dataclasses.fields(schema)]
KEY_LINE = re.compile(r"^(?P<key>[A-Za-z0-9_]+)\s*=")


def load_example_config() -> dict[str, Any]:
    return tomllib.loads(EXAMPLE_CONFIG.read_text(encoding="utf-8"))


def list_example_keys() -> list[str]:
    """List the dotted keys that the example config sets, in file order."""
    return [f"{section}.{key}" for section, values in load_example_config().items()
            if section != "plugins" for key in values]


def find_key_lines(lines: list[str]) -> dict[str, int]:
    """Map each dotted key set in the example config to the index of its line."""
    found: dict[str, int] = {}
    section = ""
    for index, line in enumerate(lines):
        if match := SECTION_LINE.match(line):
            section = match["section"]
        elif match := KEY_LINE.match(line):
            found[f"{section}.{match['key']}"] = index
    return found


def test_example_config_parses_to_defaults() -> None:
    parsed = parse_config(load_example_config(), source=str(EXAMPLE_CONFIG))
    defaults = Config()
    for key in SETTING_KEYS:
        section, name = key.split(".")
        assert getattr(getattr(parsed, section), name) == getattr(
            getattr(defaults, section), name), key
    assert dataclasses.replace(parsed, plugins=defaults.plugins) == defaults


@pytest.mark.parametrize("name", PLUGIN_SCHEMAS)
def test_example_plugin_table_parses_to_defaults(name: str) -> None:
    parsed = parse_config(load_example_config(), source=str(EXAMPLE_CONFIG))
    schema = PLUGIN_SCHEMAS[name]
    assert parse_plugin_section(parsed, name, schema) == schema()


@pytest.mark.parametrize("name", PLUGIN_SCHEMAS)
def test_example_plugin_table_follows_schema(name: str) -> None:
    table = load_example_config()["plugins"][name]
    assert list(table) == [f.name for f in dataclasses.fields(PLUGIN_SCHEMAS[name])]


@pytest.mark.parametrize("key", PLUGIN_KEYS)
def test_example_config_comments_plugin_key(key: str) -> None:
    lines = EXAMPLE_CONFIG.read_text(encoding="utf-8").splitlines()
    key_lines = find_key_lines(lines)
    assert key in key_lines, f"no line sets {key}"
    index = key_lines[key]
    assert lines[index - 1].lstrip().startswith("#"), \
        f"line {index + 1} sets {key} without a comment line right above it"


def test_example_config_sets_every_key() -> None:
    present = set(list_example_keys())
    for key in SETTING_KEYS:
        assert key in present, f"{key} is missing from {EXAMPLE_CONFIG.name}"


def test_example_config_has_no_unknown_key() -> None:
    known = set(SETTING_KEYS)
    for key in list_example_keys():
        assert key in known, f"{EXAMPLE_CONFIG.name} sets {key}, which the config table lacks"


def test_example_config_follows_table_order() -> None:
    assert list_example_keys() == SETTING_KEYS


@pytest.mark.parametrize("key", SETTING_KEYS)
def test_example_config_comments_each_key(key: str) -> None:
    lines = EXAMPLE_CONFIG.read_text(encoding="utf-8").splitlines()
    key_lines = find_key_lines(lines)
    section, name = key.split(".")
    assert key in key_lines, f"no `{name} =` line under [{section}]"

    index = key_lines[key]
    assert index > 0, f"{key} is on the first line, with no comment above it"
    assert lines[index - 1].lstrip().startswith("#"), \
        f"line {index + 1} sets {key} without a comment line right above it"


@pytest.mark.parametrize(("kind", "value"), CATALOGUE_VALUES)
def test_protocol_doc_names_catalogue_value(kind: str, value: str) -> None:
    text = PROTOCOL_DOC.read_text(encoding="utf-8")
    heading = re.search(rf"^#+ +`?{re.escape(value)}`?\s*$", text, re.MULTILINE)
    quoted = f"`{value}`" in text
    assert heading or quoted, f"{kind} {value!r} is neither a heading nor in backticks " \
                              f"in {PROTOCOL_DOC.name}"


@pytest.mark.parametrize("value", catalogue(Method) + catalogue(Topic))
def test_protocol_doc_has_section(value: str) -> None:
    text = PROTOCOL_DOC.read_text(encoding="utf-8")
    assert re.search(rf"^### `{re.escape(value)}`\s*$", text, re.MULTILINE), \
        f"{PROTOCOL_DOC.name} has no section heading '### `{value}`'"
