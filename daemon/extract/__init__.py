"""Text extraction from the documents famulus summarizes: plain text, Markdown, HTML, PDF, DOCX.

`extract_text` is the only entry point. It raises `ExtractionError` with a stable `reason`
code for every document it cannot turn into text, so callers can record the outcome
without knowing the formats.
"""

from __future__ import annotations

import os
import pathlib
import re
import unicodedata
from dataclasses import dataclass

REASONS = frozenset(
    {
        "encrypted",
        "no_text_layer",
        "corrupt",
        "binary",
        "unsupported",
        "too_large",
        "unreadable",
        "no_text",
        "invalid_docx",
        # Set by the extraction sandbox, which runs the parsers in a child process.
        "timeout",
        "memory",
        "crashed",
    }
)

SUPPORTED_SUFFIXES = frozenset({".txt", ".md", ".html", ".htm", ".pdf", ".docx"})

_PDF_MAGIC = b"%PDF-"
_ZIP_MAGIC = b"PK\x03\x04"

# C0 controls and DEL, minus tab and the line breaks that str.splitlines() already removed.
_CONTROL_CHARACTERS = re.compile("[\x00-\x08\x0e-\x1b\x1f\x7f]")
_BLANK_LINE_RUNS = re.compile(r"\n{3,}")


class ExtractionError(Exception):
    """Failure to take text out of a document.

    `reason` is one of REASONS and stays stable for callers to match on. `str(err)` is a
    sentence for people. `permanent` is False only when a retry may succeed, because the
    file vanished, was locked or timed out while famulus read it.
    """

    def __init__(self, reason: str, message: str, *, permanent: bool = True) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown extraction reason {reason!r}; use one of {sorted(REASONS)}")
        super().__init__(message)
        self.reason = reason
        self.permanent = permanent

    def __reduce__(self) -> tuple[type[ExtractionError], tuple[str, str], dict[str, bool]]:
        # The default pickling passes only the message to __init__, which needs the reason
        # too, so errors would fail to cross a process boundary.
        return type(self), (self.reason, str(self)), {"permanent": self.permanent}


@dataclass(frozen=True)
class Extracted:
    """Text of one document with what was learned while extracting it."""

    text: str
    """Document text in NFC, with \\n line breaks, at most one blank line in a row, stripped."""
    format: str
    """Format the content was read as: "text", "markdown", "html", "pdf" or "docx"."""
    pages: int | None
    """Page count for PDFs, None for the other formats."""
    notes: tuple[str, ...]
    """Facts worth recording, such as an encoding fallback or a misleading file name."""


def extract_text(path: pathlib.Path, *, max_bytes: int) -> Extracted:
    """Read the file at `path` once and extract its text.

    The suffix picks the format, except that content starting with `%PDF-` is read as a
    PDF under any supported suffix. Files with unsupported suffixes are rejected
    without being opened.

    Raises:
        ExtractionError: for every file that yields no text, with `reason` saying why.
    """
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        suffix_text = f"the suffix {suffix!r}" if suffix else "no suffix"
        raise ExtractionError(
            "unsupported",
            f"{path} has {suffix_text}, which famulus cannot extract text from; "
            f"supported suffixes are {', '.join(sorted(SUPPORTED_SUFFIXES))}",
        )

    data = _read_bounded(path, max_bytes)
    raw_text, format_name, pages, notes = _extract_by_content(path, suffix, data)
    text = _normalize_text(raw_text)
    if not text:
        raise ExtractionError(
            "no_text",
            f"{path} contains no text after extraction as {format_name}; "
            "nothing to summarize unless the file gains text",
        )
    return Extracted(text=text, format=format_name, pages=pages, notes=tuple(notes))


def _normalize_text(text: str) -> str:
    """Convert text to NFC with \\n line breaks, drop control characters, and strip it.

    Also removes trailing whitespace on each line and shrinks runs of blank lines to one.
    """
    text = unicodedata.normalize("NFC", text)
    # splitlines() also breaks on \r, \v, \f, \x1c-\x1e, \x85, U+2028 and U+2029.
    lines = [_CONTROL_CHARACTERS.sub("", line).rstrip() for line in text.splitlines()]
    return _BLANK_LINE_RUNS.sub("\n\n", "\n".join(lines)).strip()


def _read_bounded(path: pathlib.Path, max_bytes: int) -> bytes:
    """Read the whole file, raising ExtractionError when it is larger than `max_bytes`."""
    try:
        with path.open("rb") as file:
            size = os.fstat(file.fileno()).st_size
            if size > max_bytes:
                raise _too_large(path, size, max_bytes)
            # Read one byte past the limit because the file may have grown since fstat.
            data = file.read(max_bytes + 1)
    except (FileNotFoundError, PermissionError) as err:
        # A file that vanished or is locked by its writer may be readable on a later try.
        raise ExtractionError(
            "unreadable",
            f"failed to read {path}: {err.strerror}; check that the file exists and that "
            "famulus may read it",
            permanent=False,
        ) from err
    except OSError as err:
        # Interrupted, timed-out and would-block reads can succeed later. Others, such as
        # reading a directory, cannot.
        retryable = isinstance(err, (InterruptedError, TimeoutError, BlockingIOError))
        raise ExtractionError(
            "unreadable",
            f"failed to read {path}: {err.strerror or err}; check that it is a regular, "
            "readable file",
            permanent=not retryable,
        ) from err

    if len(data) > max_bytes:
        raise _too_large(path, len(data), max_bytes)
    return data


def _too_large(path: pathlib.Path, size: int, max_bytes: int) -> ExtractionError:
    return ExtractionError(
        "too_large",
        f"{path} is {size:,} bytes, over the limit of {max_bytes:,} bytes; "
        "raise max_file_bytes in the famulus config to extract it",
    )


def _extract_by_content(
    path: pathlib.Path, suffix: str, data: bytes
) -> tuple[str, str, int | None, list[str]]:
    """Pick the extractor from the content first and the suffix second, and run it.

    Returns the raw text, the format name, the page count and the notes.
    """
    # The extractors import pypdf and python-docx, which the idle daemon does not need in
    # memory. Importing them here also lets them import ExtractionError from this package.
    from . import docx, html, pdf, plain

    if data.startswith(_PDF_MAGIC):
        notes = [] if suffix == ".pdf" else [f"content is a PDF despite the {suffix} name"]
        text, pages, pdf_notes = pdf.extract_pdf(path, data)
        return text, "pdf", pages, notes + pdf_notes

    if suffix == ".pdf":
        # pypdf accepts some files with junk before the header, so let it decide.
        text, pages, pdf_notes = pdf.extract_pdf(path, data)
        return text, "pdf", pages, pdf_notes

    if suffix == ".docx":
        if not data.startswith(_ZIP_MAGIC):
            raise docx.not_a_zip_error(path, data)
        text, notes = docx.extract_docx(path, data)
        return text, "docx", None, notes

    if suffix in (".html", ".htm"):
        text, notes = html.extract_html(path, data)
        return text, "html", None, notes

    text, notes = plain.extract_plain(path, data)
    return text, "markdown" if suffix == ".md" else "text", None, notes
