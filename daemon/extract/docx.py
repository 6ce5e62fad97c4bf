"""Text of Word .docx files with python-docx: paragraphs and tables in document order.

Inside this package `import docx` still loads python-docx, because Python 3 imports are
absolute: this module is `famulus.daemon.extract.docx`, never a top-level `docx`.
"""

from __future__ import annotations

import io
import pathlib
import zipfile
import zlib
from collections.abc import Iterator

import docx as python_docx
from docx.document import Document
from docx.exceptions import PythonDocxError
from docx.opc.exceptions import OpcError
from docx.table import Table
from docx.text.paragraph import Paragraph

from . import ExtractionError

# Exceptions that python-docx 1.2.0 and the zipfile and lxml modules under it raise on a
# damaged or foreign file. lxml's XMLSyntaxError subclasses SyntaxError. zipfile raises RuntimeError
# for an encrypted zip entry, and python-docx recurses through vertically merged cells,
# so a long merge can raise RecursionError, which is a RuntimeError too. Byte-flipped
# copies of the test corpus document raised BadZipFile, XMLSyntaxError, KeyError,
# zlib.error, EOFError and AttributeError.
_INVALID_DOCX_ERRORS: tuple[type[Exception], ...] = (
    zipfile.BadZipFile,
    zlib.error,
    PythonDocxError,
    OpcError,
    LookupError,
    ValueError,
    SyntaxError,
    TypeError,
    AttributeError,
    EOFError,
    NotImplementedError,
    RuntimeError,
)

_OLE2_MAGIC = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"
# Word stores a password-protected .docx as an OLE2 file with this stream name in UTF-16.
_ENCRYPTED_PACKAGE_NAME = "EncryptedPackage".encode("utf-16-le")
_HEADING_STYLE_PREFIXES = ("Heading", "Title", "Subtitle")


def extract_docx(path: pathlib.Path, data: bytes) -> tuple[str, list[str]]:
    """Extract paragraphs and table rows of a .docx file, one per line, with its notes.

    Headings get a blank line before them, and the cells of a table row are joined with
    " | ". Headers, footers, footnotes, comments and text boxes are not included.

    Raises:
        ExtractionError: "invalid_docx" when python-docx cannot read the file.
    """
    try:
        document = python_docx.Document(io.BytesIO(data))
        lines = _document_lines(document)
    except _INVALID_DOCX_ERRORS as err:
        detail = f"{type(err).__name__}: {err}"[:200]
        raise ExtractionError(
            "invalid_docx",
            f"{path} is not a valid Word document ({detail}); "
            "open it in Word or LibreOffice and save it again as .docx",
        ) from err
    return "\n".join(lines), []


def not_a_zip_error(path: pathlib.Path, data: bytes) -> ExtractionError:
    """Build the error for a .docx file that is not a zip archive, naming what it is instead."""
    if data.startswith(_OLE2_MAGIC) and _ENCRYPTED_PACKAGE_NAME in data:
        return ExtractionError(
            "encrypted",
            f"{path} is a password-protected Word document; famulus cannot open it, "
            "save an unencrypted copy",
        )
    if data.startswith(_OLE2_MAGIC):
        found = "an OLE2 file, probably a legacy Word .doc renamed to .docx"
    elif data.startswith(b"{\\rtf"):
        found = "an RTF document renamed to .docx"
    else:
        found = "not a zip archive, which every .docx file is"
    return ExtractionError(
        "invalid_docx",
        f"{path} is {found}; open it in Word or LibreOffice and save it as .docx",
    )


def _document_lines(document: Document) -> list[str]:
    """Return the lines of the body, with tables nested in cells after their outer table.

    A stack of iterators replaces recursion, so deeply nested tables cannot exhaust the
    Python stack.
    """
    lines: list[str] = []
    pending: list[Iterator[Paragraph | Table]] = [document.iter_inner_content()]
    while pending:
        block = next(pending[-1], None)
        if block is None:
            pending.pop()
        elif isinstance(block, Paragraph):
            lines.extend(_paragraph_lines(block))
        else:
            nested_tables = _add_table_lines(block, lines)
            pending.append(iter(nested_tables))
    return lines


def _paragraph_lines(paragraph: Paragraph) -> list[str]:
    style_name = paragraph.style.name if paragraph.style is not None else None
    if style_name and style_name.startswith(_HEADING_STYLE_PREFIXES):
        return ["", paragraph.text]
    return [paragraph.text]


def _add_table_lines(table: Table, lines: list[str]) -> list[Table]:
    """Append one line per table row to `lines` and return the tables nested in its cells."""
    lines.append("")
    nested_tables: list[Table] = []
    # row.cells repeats a merged cell for every grid column and row it spans. The
    # underlying <w:tc> element is the same each time, so it identifies repeats.
    seen_cells: set[object] = set()
    for row in table.rows:
        cell_texts: list[str] = []
        for cell in row.cells:
            if cell._tc in seen_cells:
                continue
            seen_cells.add(cell._tc)
            cell_texts.append(" ".join(paragraph.text for paragraph in cell.paragraphs))
            nested_tables.extend(cell.tables)
        lines.append(" | ".join(cell_texts))
    lines.append("")
    return nested_tables
