"""Decoding of plain text and Markdown files, and the byte-level checks HTML shares."""

from __future__ import annotations

import codecs
import pathlib

from . import ExtractionError

# UTF-32 comes first because its little-endian BOM starts with the UTF-16 LE one.
_BOMS: tuple[tuple[bytes, str], ...] = (
    (codecs.BOM_UTF8, "utf-8"),
    (codecs.BOM_UTF32_LE, "utf-32-le"),
    (codecs.BOM_UTF32_BE, "utf-32-be"),
    (codecs.BOM_UTF16_LE, "utf-16-le"),
    (codecs.BOM_UTF16_BE, "utf-16-be"),
)

# C0 controls that text files do not contain: everything below 0x20 except tab, line feed,
# vertical tab, form feed, carriage return and ESC (which colored logs use), plus DEL.
# NUL is checked on its own.
_CONTROL_BYTES = bytes([*range(0x01, 0x09), *range(0x0E, 0x1B), *range(0x1C, 0x20), 0x7F])

# Share of control bytes above which a file counts as binary. NOTE: 5% is an estimate, not
# measured on a corpus. Uniformly random bytes have about 10% (26 of 256 values), and text
# files almost none.
_MAX_CONTROL_SHARE = 0.05

_FALLBACK_ENCODING = "cp1252"


def extract_plain(path: pathlib.Path, data: bytes) -> tuple[str, list[str]]:
    """Decode a text or Markdown file and return its text and notes.

    The encoding comes from a byte-order mark, else strict UTF-8, else cp1252, with
    U+FFFD for the five byte values that cp1252 leaves undefined.

    Raises:
        ExtractionError: "binary" for content without a BOM that looks like binary data.
    """
    bom_decoded = decode_with_bom(data)
    if bom_decoded is not None:
        return bom_decoded

    check_not_binary(path, data)
    try:
        return data.decode("utf-8"), []
    except UnicodeDecodeError:
        pass

    try:
        text = data.decode(_FALLBACK_ENCODING)
        return text, [f"decoded as {_FALLBACK_ENCODING} (not valid UTF-8)"]
    except UnicodeDecodeError:
        # cp1252 leaves 0x81, 0x8D, 0x8F, 0x90 and 0x9D undefined.
        text = data.decode(_FALLBACK_ENCODING, errors="replace")
        note = (
            f"decoded as {_FALLBACK_ENCODING} (not valid UTF-8); "
            f"bytes undefined in {_FALLBACK_ENCODING} were replaced with U+FFFD"
        )
        return text, [note]


def decode_with_bom(data: bytes) -> tuple[str, list[str]] | None:
    """Decode `data` by its byte-order mark, or return None when it has none.

    Invalid sequences after the mark are replaced with U+FFFD and noted, because a
    BOM is strong evidence of text even when a few bytes are damaged.
    """
    for bom, encoding in _BOMS:
        if not data.startswith(bom):
            continue
        body = data[len(bom) :]
        try:
            return body.decode(encoding), []
        except UnicodeDecodeError:
            text = body.decode(encoding, errors="replace")
            return text, [f"not valid {encoding} after its byte-order mark; invalid bytes replaced"]
    return None


def check_not_binary(path: pathlib.Path, data: bytes) -> None:
    """Raise ExtractionError("binary") when `data` contains NUL or many control bytes.

    Text in UTF-16 or UTF-32 without a byte-order mark contains NUL bytes, so it is
    reported as binary too.
    """
    if b"\x00" in data:
        found = "NUL bytes"
    else:
        control_count = len(data) - len(data.translate(None, _CONTROL_BYTES))
        if not data or control_count <= _MAX_CONTROL_SHARE * len(data):
            return
        found = f"{control_count:,} control bytes in {len(data):,}"
    raise ExtractionError(
        "binary",
        f"{path} looks like binary data, not text ({found}); "
        "convert it to a text format or remove it from the watched folder",
    )
