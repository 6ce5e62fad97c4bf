"""Text layer extraction from PDF files with pypdf."""

from __future__ import annotations

import io
import pathlib
import struct
import zlib

from pypdf import PasswordType, PdfReader
from pypdf.errors import DependencyError, LimitReachedError, PyPdfError

from . import ExtractionError

# pypdf raises built-in exceptions on damaged files as well as its own PyPdfError. Its
# issue tracker has reports of KeyError, IndexError and TypeError from text extraction,
# and truncated or byte-flipped copies of the test corpus made pypdf 7.1.1 raise
# NotImplementedError. The remaining types are what parsing code raises on bad input.
# MemoryError and OSError stay uncaught because they describe the machine, not the file.
_MALFORMED_PDF_ERRORS: tuple[type[Exception], ...] = (
    PyPdfError,
    ValueError,
    TypeError,
    LookupError,
    AttributeError,
    AssertionError,
    ArithmeticError,
    NotImplementedError,
    RecursionError,
    struct.error,
    zlib.error,
)


def extract_pdf(path: pathlib.Path, data: bytes) -> tuple[str, int, list[str]]:
    """Extract the text layer of every page, and return it with the page count and notes.

    Pages are separated by a blank line. A page that fails to parse is left out and
    noted, unless every page fails.

    Raises:
        ExtractionError: "encrypted", "corrupt" or "no_text_layer", or "unsupported" when
            pypdf needs an optional package that is not installed.
    """
    try:
        return _extract_pages(path, data)
    except DependencyError as err:
        # NOTE: in pypdf 7.1.1 this comes from AES decryption without the cryptography
        # package, or from Brotli and JBIG2 filters. A byte search for /Encrypt separates
        # the two, and a string inside the file could fool it.
        reason = "encrypted" if b"/Encrypt" in data else "unsupported"
        raise ExtractionError(
            reason,
            f"{path} needs an optional pypdf dependency that is not installed ({err}); "
            "save an unencrypted copy or ask for that package to be installed",
        ) from err
    except LimitReachedError as err:
        # pypdf stops inflating a stream at its own output limits (75 MB for zlib in
        # pypdf 7): a small file that inflates past them is a decompression bomb or a
        # drawing too large to read.
        raise ExtractionError(
            "too_large",
            f"{path} has a stream that inflates past pypdf's limit ({err}); famulus does "
            "not extract it",
        ) from err
    except _MALFORMED_PDF_ERRORS as err:
        raise _corrupt(path, err) from err


def _extract_pages(path: pathlib.Path, data: bytes) -> tuple[str, int, list[str]]:
    reader = PdfReader(io.BytesIO(data))
    # PdfReader already tried the empty password, which many "protected" PDFs use to
    # restrict printing or copying while still opening without a prompt.
    if reader.is_encrypted and reader.decrypt("") == PasswordType.NOT_DECRYPTED:
        raise ExtractionError(
            "encrypted",
            f"{path} is encrypted with a password; famulus cannot open it, "
            "save an unencrypted copy",
        )

    page_count = len(reader.pages)
    if page_count == 0:
        raise ExtractionError("no_text", f"{path} is a PDF with no pages; nothing to summarize")
    texts: list[str] = []
    notes: list[str] = []
    first_error: Exception | None = None
    for index, page in enumerate(reader.pages):
        try:
            texts.append(page.extract_text())
        except LimitReachedError:
            raise  # the whole file is refused, not one page
        except _MALFORMED_PDF_ERRORS as err:
            first_error = first_error or err
            notes.append(
                f"page {index + 1} of {page_count} could not be read "
                f"({type(err).__name__}); its text is missing"
            )

    if any(text.strip() for text in texts):
        return "\n\n".join(texts), page_count, notes
    if first_error is not None:
        raise _corrupt(path, first_error) from first_error
    raise ExtractionError(
        "no_text_layer",
        f"{path} has no text layer (scanned images?); OCR it first",
    )


def _corrupt(path: pathlib.Path, err: Exception) -> ExtractionError:
    # pypdf messages name offsets and object numbers, not document text, but they can
    # quote a few raw bytes, so they are cut short.
    detail = f"{type(err).__name__}: {err}"[:200]
    return ExtractionError(
        "corrupt",
        f"{path} is not a readable PDF ({detail}); re-download or re-export it",
    )
