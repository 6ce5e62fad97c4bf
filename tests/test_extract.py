"""Tests for famulus.daemon.extract on the real files in tests/corpus and on generated files."""

from __future__ import annotations

import io
import pathlib
import pickle
import tempfile
import time
import zipfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pypdf import PdfReader, PdfWriter

from famulus.daemon.extract import (
    REASONS,
    SUPPORTED_SUFFIXES,
    ExtractionError,
    extract_text,
)

CORPUS = pathlib.Path(__file__).parent / "corpus"
DOCUMENTS = CORPUS / "documents"
BAD = CORPUS / "bad"
MAX_BYTES = 10_000_000

# (file, format, page count, a phrase from the document's text)
DOCUMENT_CASES = [
    ("blog-post.html", "html", None, "GPT-4 is currently the state of the art LLM in the world."),
    ("crazy-ones.txt", "text", None, "The round pegs in the square holes."),
    ("lorem-ipsum.txt", "text", None, "Two-Column Document with Lorem Ipsum"),
    ("llm-agents-intro.pdf", "pdf", 1, "Large language models (LLMs) are becoming a crucial"),
    ("repair-invoice-multipage.pdf", "pdf", 3, "Claim # SF-1008"),
    ("siege-of-vicksburg.pdf", "pdf", 7, "SIEGE"),
    ("hydro-network-data-model.pdf", "pdf", 19, "National Hydro Network"),
    ("sample-report.docx", "docx", None, "AutoGen is an open-source framework"),
]


def write(directory: pathlib.Path, name: str, data: bytes) -> pathlib.Path:
    path = directory / name
    path.write_bytes(data)
    return path


def extraction_error(path: pathlib.Path, max_bytes: int = MAX_BYTES) -> ExtractionError:
    with pytest.raises(ExtractionError) as caught:
        extract_text(path, max_bytes=max_bytes)
    return caught.value


# Corpus documents


@pytest.mark.parametrize(("name", "format_name", "pages", "phrase"), DOCUMENT_CASES)
def test_document_yields_known_phrase(
    name: str, format_name: str, pages: int | None, phrase: str
) -> None:
    extracted = extract_text(DOCUMENTS / name, max_bytes=MAX_BYTES)

    assert phrase in extracted.text
    assert len(extracted.text) > 500
    assert extracted.format == format_name
    assert extracted.pages == pages
    assert extracted.notes == ()


@pytest.mark.parametrize("name", [case[0] for case in DOCUMENT_CASES])
def test_document_text_is_normalized(name: str) -> None:
    text = extract_text(DOCUMENTS / name, max_bytes=MAX_BYTES).text

    assert "\r" not in text
    assert "\n\n\n" not in text
    assert text == text.strip()
    assert all(line == line.rstrip() for line in text.split("\n"))


def test_blog_post_drops_page_furniture() -> None:
    text = extract_text(DOCUMENTS / "blog-post.html", max_bytes=MAX_BYTES).text

    assert "Notebooks" not in text  # top navigation menu
    assert "setAttribute" not in text  # inline theme script
    assert "Newer Post" not in text  # pagination <nav> after the article
    assert "Copyright" not in text  # page <footer>
    assert "Experiment Results" in text
    assert text.startswith("Does Model and Inference Parameter Matter in LLM Applications?")


def test_docx_keeps_table_in_place() -> None:
    lines = extract_text(DOCUMENTS / "sample-report.docx", max_bytes=MAX_BYTES).text.split("\n")

    table_row = "13 | 14 | 49e168b7-d2ae-407f-a055-2167576f39a1 | 15 | 16 | 17"
    assert table_row in lines
    assert lines.index("Here is a random table for .docx parsing test purposes:") < lines.index(
        table_row
    )
    assert lines.index(table_row) < lines.index("Test Image:")


def test_docx_heading_is_own_line() -> None:
    lines = extract_text(DOCUMENTS / "sample-report.docx", max_bytes=MAX_BYTES).text.split("\n")

    abstract = lines.index("Abstract")
    assert lines[abstract - 1] == ""
    assert lines[abstract + 1].startswith("AutoGen is an open-source framework")


def test_crazy_ones_keeps_ligatures() -> None:
    # NFC, unlike NFKC, leaves the ligature characters of the source text alone.
    text = extract_text(DOCUMENTS / "crazy-ones.txt", max_bytes=MAX_BYTES).text

    assert "The misﬁts." in text


# Corpus files with known problems


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("encrypted-needs-password.pdf", "encrypted"),
        ("scanned-no-text-layer.pdf", "no_text_layer"),
        ("truncated.pdf", "corrupt"),
        ("random-bytes.txt", "binary"),
        ("empty.txt", "no_text"),
    ],
)
def test_bad_file_gets_reason(name: str, reason: str) -> None:
    error = extraction_error(BAD / name)

    assert error.reason == reason
    assert error.permanent
    assert name in str(error)


def test_encrypted_pdf_message_says_fix() -> None:
    error = extraction_error(BAD / "encrypted-needs-password.pdf")

    assert "save an unencrypted copy" in str(error)


def test_scanned_pdf_message_says_ocr() -> None:
    error = extraction_error(BAD / "scanned-no-text-layer.pdf")

    assert "OCR it first" in str(error)


def test_random_bytes_message_says_binary() -> None:
    error = extraction_error(BAD / "random-bytes.txt")

    assert "looks like binary data, not text" in str(error)


def test_pdf_named_docx_read_as_pdf() -> None:
    extracted = extract_text(BAD / "pdf-named-as.docx", max_bytes=MAX_BYTES)

    assert extracted.format == "pdf"
    assert extracted.pages == 1
    assert "Large language models (LLMs)" in extracted.text
    assert extracted.notes == ("content is a PDF despite the .docx name",)


def test_utf16le_bom_decoded() -> None:
    extracted = extract_text(BAD / "utf16le-bom.txt", max_bytes=MAX_BYTES)

    assert extracted.text.startswith("Meeting notes: the quarterly budget review")
    assert "\ufeff" not in extracted.text
    assert extracted.notes == ()


# Plain text encodings and normalization


def test_cp1252_fallback_noted(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path, "notes.txt", "Café “quoted” – naïve".encode("cp1252"))

    extracted = extract_text(path, max_bytes=MAX_BYTES)

    assert extracted.text == "Café “quoted” – naïve"
    assert extracted.notes == ("decoded as cp1252 (not valid UTF-8)",)


def test_cp1252_undefined_byte_replaced(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path, "notes.txt", b"caf\xe9 \x81 end")

    extracted = extract_text(path, max_bytes=MAX_BYTES)

    assert extracted.text == "café \ufffd end"
    assert "cp1252" in extracted.notes[0]
    assert "U+FFFD" in extracted.notes[0]


@pytest.mark.parametrize(
    ("bom", "encoding"),
    [
        (b"\xef\xbb\xbf", "utf-8"),
        (b"\xfe\xff", "utf-16-be"),
        (b"\xff\xfe", "utf-16-le"),
        (b"\xff\xfe\x00\x00", "utf-32-le"),
        (b"\x00\x00\xfe\xff", "utf-32-be"),
    ],
)
def test_bom_selects_encoding(tmp_path: pathlib.Path, bom: bytes, encoding: str) -> None:
    path = write(tmp_path, "notes.txt", bom + "Grüße, 東京 ✓".encode(encoding))

    extracted = extract_text(path, max_bytes=MAX_BYTES)

    assert extracted.text == "Grüße, 東京 ✓"
    assert extracted.notes == ()


def test_utf8_without_bom_no_note(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path, "notes.txt", "Grüße, 東京".encode())

    extracted = extract_text(path, max_bytes=MAX_BYTES)

    assert extracted.text == "Grüße, 東京"
    assert extracted.notes == ()


def test_text_normalized_to_nfc(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path, "notes.txt", "Cafe\u0301".encode())

    assert extract_text(path, max_bytes=MAX_BYTES).text == "Caf\u00e9"


def test_blank_line_runs_collapsed(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path, "notes.txt", b"\r\n  first  \r\n\r\n\r\n\r\nsecond\rthird\t \n\n")

    assert extract_text(path, max_bytes=MAX_BYTES).text == "first\n\nsecond\nthird"


def test_markdown_format_reported(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path, "README.md", b"# Title\n\nSome *text*.\n")

    extracted = extract_text(path, max_bytes=MAX_BYTES)

    assert extracted.format == "markdown"
    assert extracted.text == "# Title\n\nSome *text*."


def test_control_bytes_mean_binary(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path, "data.txt", b"header\x01\x02\x03\x04\x05\x06\x07\x08" * 100)

    assert extraction_error(path).reason == "binary"


def test_whitespace_only_is_no_text(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path, "blank.txt", b" \r\n\t\n  \n")

    assert extraction_error(path).reason == "no_text"


# File access and dispatch


def test_file_over_limit_too_large(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path, "big.txt", b"x" * 2000)

    error = extraction_error(path, max_bytes=1000)

    assert error.reason == "too_large"
    assert error.permanent
    assert "2,000 bytes" in str(error)
    assert "1,000 bytes" in str(error)
    assert "max_file_bytes" in str(error)


def test_file_at_limit_accepted(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path, "exact.txt", b"x" * 1000)

    assert extract_text(path, max_bytes=1000).text == "x" * 1000


@pytest.mark.parametrize("name", ["photo.jpg", "sheet.xlsx", "Makefile"])
def test_unknown_suffix_unsupported(tmp_path: pathlib.Path, name: str) -> None:
    path = write(tmp_path, name, b"some text")

    error = extraction_error(path)

    assert error.reason == "unsupported"
    assert error.permanent
    assert (pathlib.Path(name).suffix or "no suffix") in str(error)


def test_suffix_case_ignored(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path, "PAPER.PDF", (DOCUMENTS / "llm-agents-intro.pdf").read_bytes())

    assert extract_text(path, max_bytes=MAX_BYTES).format == "pdf"


def test_missing_file_unreadable_retryable(tmp_path: pathlib.Path) -> None:
    error = extraction_error(tmp_path / "gone.txt")

    assert error.reason == "unreadable"
    assert not error.permanent


def test_directory_unreadable_permanent(tmp_path: pathlib.Path) -> None:
    (tmp_path / "folder.txt").mkdir()

    error = extraction_error(tmp_path / "folder.txt")

    assert error.reason == "unreadable"
    assert error.permanent


def test_error_rejects_unknown_reason() -> None:
    with pytest.raises(ValueError, match="unknown extraction reason"):
        ExtractionError("broken", "message")


def test_error_survives_pickling() -> None:
    error = ExtractionError("unreadable", "cannot read x.txt", permanent=False)

    copy = pickle.loads(pickle.dumps(error))

    assert copy.reason == "unreadable"
    assert str(copy) == "cannot read x.txt"
    assert copy.permanent is False


def test_public_constants() -> None:
    assert SUPPORTED_SUFFIXES == {".txt", ".md", ".html", ".htm", ".pdf", ".docx"}
    assert "invalid_docx" in REASONS


# PDF


def test_pdf_empty_password_opens(tmp_path: pathlib.Path) -> None:
    writer = PdfWriter()
    writer.add_page(PdfReader(DOCUMENTS / "llm-agents-intro.pdf").pages[0])
    writer.encrypt(user_password="", owner_password="owner secret", algorithm="RC4-128")
    buffer = io.BytesIO()
    writer.write(buffer)
    path = write(tmp_path, "restricted.pdf", buffer.getvalue())

    extracted = extract_text(path, max_bytes=MAX_BYTES)

    assert "Large language models (LLMs)" in extracted.text


def test_pdf_suffix_without_header_corrupt(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path, "report.pdf", b"this is not a PDF at all\n")

    assert extraction_error(path).reason == "corrupt"


# DOCX


def test_docx_module_imports_library() -> None:
    # The extractor module is itself named docx, so check that `import docx` inside it
    # loaded python-docx and not the module itself.
    from famulus.daemon.extract import docx as docx_extractor

    assert docx_extractor.python_docx.__name__ == "docx"
    assert hasattr(docx_extractor.python_docx, "Document")


def test_text_named_docx_invalid(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path, "letter.docx", b"Dear reader, this is plain text.\n")

    error = extraction_error(path)

    assert error.reason == "invalid_docx"
    assert "zip" in str(error)


def test_zip_without_document_invalid(tmp_path: pathlib.Path) -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("notes.txt", "not a Word document")
    path = write(tmp_path, "archive.docx", buffer.getvalue())

    assert extraction_error(path).reason == "invalid_docx"


def test_legacy_doc_named_docx_invalid(tmp_path: pathlib.Path) -> None:
    ole2_header = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(504)
    path = write(tmp_path, "old.docx", ole2_header)

    error = extraction_error(path)

    assert error.reason == "invalid_docx"
    assert "legacy Word .doc" in str(error)


# HTML


def test_html_meta_charset_used(tmp_path: pathlib.Path) -> None:
    page = '<html><head><meta charset="windows-1252"></head><body><p>Café “ok”</p></body></html>'
    path = write(tmp_path, "page.html", page.encode("cp1252"))

    extracted = extract_text(path, max_bytes=MAX_BYTES)

    assert extracted.text == "Café “ok”"
    assert extracted.notes == ()


def test_html_latin1_label_read_as_cp1252(tmp_path: pathlib.Path) -> None:
    # Browsers decode pages labelled ISO-8859-1 as windows-1252, where 0x93 is a quote.
    content = (
        '<meta http-equiv="Content-Type" content="text/html; charset=ISO-8859-1"><p>\x93hi\x94'
    )
    path = write(tmp_path, "page.htm", content.encode("latin-1"))

    assert extract_text(path, max_bytes=MAX_BYTES).text == "“hi”"


def test_html_invalid_utf8_replaced(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path, "page.html", b"<p>caf\xe9</p>")

    extracted = extract_text(path, max_bytes=MAX_BYTES)

    assert extracted.text == "caf\ufffd"
    assert extracted.notes == ("not valid utf-8; invalid bytes replaced with U+FFFD",)


def test_html_unknown_charset_noted(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path, "page.html", b'<meta charset="klingon"><p>plain words</p>')

    extracted = extract_text(path, max_bytes=MAX_BYTES)

    assert extracted.text == "plain words"
    assert "klingon" in extracted.notes[0]


def test_html_largest_article_wins(tmp_path: pathlib.Path) -> None:
    page = (
        "<body><p>Site intro outside any article.</p>"
        "<article><p>Short teaser.</p></article>"
        "<main><h1>Main story</h1><p>" + "Long article sentence. " * 20 + "</p></main>"
        "</body>"
    )
    path = write(tmp_path, "page.html", page.encode())

    text = extract_text(path, max_bytes=MAX_BYTES).text

    assert text.startswith("Main story\n\nLong article sentence.")
    assert "Short teaser" not in text
    assert "Site intro" not in text


def test_html_without_article_uses_body(tmp_path: pathlib.Path) -> None:
    page = (
        "<html><head><title>Tab title</title><style>p {color: red}</style></head>"
        "<body><nav><a href='/'>Home</a></nav><h1>Heading</h1>"
        "<ul><li>first item</li><li>second&nbsp;item</li></ul>"
        "<p>Para   with\n  spaces &amp; entities.</p><script>alert('x')</script></body></html>"
    )
    path = write(tmp_path, "page.html", page.encode())

    text = extract_text(path, max_bytes=MAX_BYTES).text

    assert text == "Heading\n\nfirst item\nsecond item\n\nPara with spaces & entities."


def test_html_pre_keeps_line_breaks(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path, "page.html", b"<p>Code:</p><pre>line one\n    line two</pre>")

    assert extract_text(path, max_bytes=MAX_BYTES).text == "Code:\n\nline one\n    line two"


def test_html_malformed_declaration_keeps_text(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path, "page.html", b"<p>Kept paragraph.</p><![ broken")

    extracted = extract_text(path, max_bytes=MAX_BYTES)

    assert extracted.text == "Kept paragraph."
    assert "malformed markup" in extracted.notes[0]


def test_html_binary_content_rejected(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path, "page.html", (BAD / "random-bytes.txt").read_bytes())

    assert extraction_error(path).reason == "binary"


@pytest.mark.parametrize(
    ("tag", "expected"),
    [
        ("div", "deep text\n\nafter the nesting"),
        ("span", "deep text\n\nafter the nesting"),
        ("nav", "after the nesting"),
        ("article", "deep text"),  # the text after the outermost article is not in one
    ],
)
def test_deeply_nested_html_fast(tmp_path: pathlib.Path, tag: str, expected: str) -> None:
    depth = 100_000
    page = f"<{tag}>" * depth + "deep text" + f"</{tag}>" * depth + "<p>after the nesting</p>"
    path = write(tmp_path, "nested.html", page.encode())

    started = time.monotonic()
    text = extract_text(path, max_bytes=MAX_BYTES).text
    elapsed = time.monotonic() - started

    assert elapsed < 10, f"{depth:,} nested <{tag}> elements took {elapsed:.1f} s"
    assert text == expected


# Arbitrary input

_MAGIC_PREFIXES = [b"", b"%PDF-1.7\n", b"PK\x03\x04", b"\xff\xfe", b"\xef\xbb\xbf", b"<html>"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    suffix=st.sampled_from([".txt", ".md", ".html", ".pdf", ".docx"]),
    prefix=st.sampled_from(_MAGIC_PREFIXES),
    body=st.binary(max_size=4096),
)
def test_arbitrary_bytes_never_crash(suffix: str, prefix: bytes, body: bytes) -> None:
    with tempfile.TemporaryDirectory() as directory:
        path = write(pathlib.Path(directory), "input" + suffix, prefix + body)
        try:
            extracted = extract_text(path, max_bytes=MAX_BYTES)
        except ExtractionError as error:
            assert error.reason in REASONS
            assert str(error)
        else:
            assert extracted.text.strip()
            assert extracted.text == extracted.text.strip()


@settings(max_examples=200, deadline=None)
@given(text=st.text(min_size=1))
def test_utf8_text_extracts_or_rejects(text: str) -> None:
    with tempfile.TemporaryDirectory() as directory:
        path = write(pathlib.Path(directory), "notes.txt", text.encode())
        try:
            extracted = extract_text(path, max_bytes=MAX_BYTES)
        except ExtractionError as error:
            assert error.reason in ("binary", "no_text")
        else:
            assert extracted.format == "text"
