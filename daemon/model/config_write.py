"""Write a model's device order into the user's TOML config, keeping the rest of the file.

tomllib only reads TOML, so the file is edited line by line: the `devices = ...` line of the
`[models.NAME]` table is replaced, or added below its header, or the table is appended at the
end. Comments and the layout of everything else stay as they were. The result is parsed
again, and on any error the original bytes are put back.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tomllib
from pathlib import Path
from typing import Any

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")
_DEVICES_LINE = re.compile(r"^\s*devices\s*=")


class ConfigWriteError(Exception):
    """The config could not be updated; the file is unchanged."""


def table_header(name: str) -> str:
    key = name if _BARE_KEY.match(name) else json.dumps(name)
    return f"[models.{key}]"


def write_device_order(config_file: Path, name: str, devices: list[str]) -> None:
    """Set `devices` in the `[models.NAME]` table of `config_file` (created if missing)."""
    original = config_file.read_bytes() if config_file.exists() else None
    text = original.decode("utf-8") if original is not None else ""
    updated = set_devices(text, name, devices)
    try:
        _check(updated, name, devices)
        _replace(config_file, updated)
        _check(config_file.read_text(encoding="utf-8"), name, devices)
    except (ConfigWriteError, OSError) as exc:
        _restore(config_file, original)
        raise ConfigWriteError(f"could not write the device order into {config_file}: {exc}. "
                               f"The file is unchanged. Add `devices = {json.dumps(devices)}` "
                               f"to its {table_header(name)} table by hand.") from exc


def set_devices(text: str, name: str, devices: list[str]) -> str:
    """Return `text` with the devices line of `[models.NAME]` set to `devices`."""
    new_line = f"devices = {json.dumps(devices)}"
    lines = text.splitlines(keepends=True)
    start = _find_table(lines, name)
    if start is None:
        prefix = text if not text or text.endswith("\n") else text + "\n"
        separator = "\n" if prefix else ""
        return f"{prefix}{separator}{table_header(name)}\n{new_line}\n"
    end = start + 1
    while end < len(lines) and _header_path(lines[end]) is None:
        end += 1
    for index in range(start + 1, end):
        if _DEVICES_LINE.match(lines[index]):
            last = _value_end(lines, index, end)
            indent = lines[index][:len(lines[index]) - len(lines[index].lstrip())]
            lines[index:last + 1] = [f"{indent}{new_line}\n"]
            return "".join(lines)
    if not lines[start].endswith("\n"):
        lines[start] += "\n"
    lines.insert(start + 1, new_line + "\n")
    return "".join(lines)


def _find_table(lines: list[str], name: str) -> int | None:
    for index, line in enumerate(lines):
        if _header_path(line) == ("models", name):
            return index
    return None


def _header_path(line: str) -> tuple[str, ...] | None:
    """Return the key path of a `[table]` header line, or None for any other line."""
    stripped = line.strip()
    if not stripped.startswith("[") or stripped.startswith("[["):
        return None
    try:
        # A header line is a valid TOML document on its own, and tomllib resolves quoting.
        parsed: Any = tomllib.loads(stripped)
    except tomllib.TOMLDecodeError:
        return None  # for example a line inside a multi-line array
    path = []
    while isinstance(parsed, dict) and len(parsed) == 1:
        key, parsed = next(iter(parsed.items()))
        path.append(key)
    return tuple(path) if path and parsed == {} else None


def _value_end(lines: list[str], first: int, limit: int) -> int:
    """Return the index of the last line of the value that starts on line `first`."""
    for last in range(first, limit):
        try:
            tomllib.loads("".join(lines[first:last + 1]))
        except tomllib.TOMLDecodeError:
            continue
        return last
    # No range of lines parses on its own, so only the first line is replaced.
    return first


def _check(text: str, name: str, devices: list[str]) -> None:
    try:
        parsed = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigWriteError(f"the edited file is not valid TOML ({exc})") from exc
    written: Any = parsed
    for key in ("models", name, "devices"):
        written = written.get(key) if isinstance(written, dict) else None
    if written != devices:
        raise ConfigWriteError(f"the edited file has models.{name}.devices = {written!r}, "
                               f"expected {devices!r}")
    # The daemon's own parser must accept the result too, not only TOML's grammar.
    from famulus.daemon.config import ConfigError, parse_config

    try:
        parse_config(parsed)
    except ConfigError as exc:
        raise ConfigWriteError(f"the edited config is invalid: {exc}") from exc


def _replace(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    if path.exists():
        shutil.copymode(path, tmp)
    os.replace(tmp, path)


def _restore(path: Path, original: bytes | None) -> None:
    path.with_name(path.name + ".tmp").unlink(missing_ok=True)
    if original is None:
        path.unlink(missing_ok=True)
    elif not path.exists() or path.read_bytes() != original:
        path.write_bytes(original)
