"""Article text from HTML pages, without navigation, scripts and other page furniture.

html.parser is a tokenizer that reports tags as events without building a tree, and this
module keeps only flat counters and stacks, so deeply nested markup cannot exhaust the
Python stack.
"""

from __future__ import annotations

import codecs
import collections
import pathlib
import re
from html.parser import HTMLParser

from .plain import check_not_binary, decode_with_bom

# Elements whose content is not part of the article. `title` usually repeats the main heading.
_SKIPPED_TAGS = frozenset(
    {
        "script",
        "style",
        "noscript",
        "nav",
        "header",
        "footer",
        "aside",
        "form",
        "svg",
        "template",
        "title",
    }
)
_CONTAINER_TAGS = frozenset({"article", "main"})

# Tags that start or end a paragraph (blank line) or a line in the output.
_PARAGRAPH_TAGS = frozenset(
    {"p", "h1", "h2", "h3", "h4", "h5", "h6", "ul", "ol", "dl", "table", "blockquote", "pre"}
    | {"section", "article", "main", "figure", "hr", "address", "details"}
)
_LINE_TAGS = frozenset({"br", "li", "tr", "div", "dt", "dd", "figcaption", "caption", "summary"})
_CELL_TAGS = frozenset({"td", "th"})

# Break levels, where a stronger break replaces a weaker one between two pieces of text.
_NO_BREAK, _CELL_BREAK, _LINE_BREAK, _PARAGRAPH_BREAK = range(4)
_BREAK_TEXT = ("", "\t", "\n", "\n\n")

# The HTML standard's prescan reads 1024 bytes, but some pages put long comments or
# scripts before the meta tag, so this reads further.
_CHARSET_SCAN_BYTES = 4096
_META_CHARSET = re.compile(rb"<meta[^>]*?charset\s*=\s*[\"']?\s*([A-Za-z0-9._:-]+)", re.IGNORECASE)
_WHITESPACE = re.compile(r"\s+")


def extract_html(path: pathlib.Path, data: bytes) -> tuple[str, list[str]]:
    """Decode an HTML page and return its article text and notes.

    When the page has `<article>` or `<main>` elements, the text comes from the one with
    the most text, and otherwise from the whole page.

    Raises:
        ExtractionError: "binary" for content without a BOM that looks like binary data.
    """
    bom_decoded = decode_with_bom(data)
    if bom_decoded is not None:
        markup, notes = bom_decoded
    else:
        check_not_binary(path, data)
        markup, notes = _decode_by_meta_charset(data)

    # NOTE: html.parser in CPython 3.11.7 takes time quadratic in the input length on some
    # malformed markup, such as thousands of unclosed "<a " start tags. The extraction
    # sandbox's time limit (extract.timeout_s) stops such a file.
    parser = _ArticleTextParser()
    try:
        parser.feed(markup)
        parser.close()
    except AssertionError:
        # Python 3.11's _markupbase raises AssertionError on malformed declarations such as
        # "<![ x", where browsers would keep going. The text before that point is kept.
        notes.append("HTML parsing stopped early at malformed markup; later text is missing")
    return parser.article_text(), notes


def _decode_by_meta_charset(data: bytes) -> tuple[str, list[str]]:
    """Decode with the charset a <meta> tag declares, else UTF-8, replacing invalid bytes."""
    notes: list[str] = []
    encoding = "utf-8"
    match = _META_CHARSET.search(data[:_CHARSET_SCAN_BYTES])
    if match:
        label = match.group(1).decode("ascii")
        declared = _codec_for_label(label)
        if declared is None:
            notes.append(f"unknown charset {label!r} in <meta>; decoded as UTF-8")
        else:
            encoding = declared

    try:
        return data.decode(encoding), notes
    except UnicodeDecodeError:
        notes.append(f"not valid {encoding}; invalid bytes replaced with U+FFFD")
        return data.decode(encoding, errors="replace"), notes


def _codec_for_label(label: str) -> str | None:
    """Return the Python codec for a charset label, or None when Python has no such text codec.

    Follows the WHATWG Encoding Standard where it differs from the label's literal meaning.
    Browsers read latin-1 and ASCII pages as windows-1252. They read a page whose meta
    tag declares UTF-16 as UTF-8, because an ASCII-readable meta tag rules out UTF-16.
    """
    try:
        name = codecs.lookup(label).name
        # Non-text codecs such as base64 and rot13 fail here with LookupError, and codecs
        # such as idna reject the "replace" error handler with UnicodeError.
        b"a".decode(name, errors="replace")
    except (LookupError, UnicodeError):
        return None
    if name in ("iso8859-1", "ascii"):
        return "cp1252"
    if name.startswith(("utf-16", "utf-32")):
        return "utf-8"
    return name


class _ArticleTextParser(HTMLParser):
    """Collect text outside skipped elements, with the spans of every <article> and <main>.

    Only skipped and container elements go on the open-element stack. HTML closes the other
    elements implicitly (p, li, td), so tracking them would need the full tree-building
    algorithm, and they only add line breaks.
    """

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self._chunks: list[str] = []
        # Running count of non-whitespace characters, which ranks containers by text size.
        self._visible_chars = 0
        # (tag, index into _spans), with -1 for skipped elements, which are the others.
        self._open: list[tuple[str, int]] = []
        self._open_counts: collections.Counter[str] = collections.Counter()
        self._skip_depth = 0
        self._pre_depth = 0
        self._at_line_start = True
        self._pending_break = _NO_BREAK
        # [first chunk, end chunk, visible characters at start, at end] per container.
        self._spans: list[list[int]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        inside_container = self._open_counts["article"] + self._open_counts["main"] > 0
        # A <header> inside an article contains its title and byline, not site navigation.
        if tag in _SKIPPED_TAGS and not (tag == "header" and inside_container):
            self._push(tag, span_index=-1)
            self._skip_depth += 1
            return
        if tag in _CONTAINER_TAGS:
            self._spans.append([len(self._chunks), -1, self._visible_chars, -1])
            self._push(tag, span_index=len(self._spans) - 1)
        if tag == "pre":
            self._pre_depth += 1
        self._add_break(tag)

    def handle_endtag(self, tag: str) -> None:
        if self._open_counts[tag] > 0:
            self._pop_through(tag)
        if tag == "pre" and self._pre_depth > 0:
            self._pre_depth -= 1
        if tag not in ("br", "hr"):
            self._add_break(tag)

    def handle_data(self, data: str) -> None:
        if self._skip_depth:
            return
        if not self._pre_depth:
            data = _WHITESPACE.sub(" ", data)
            if self._at_line_start or self._pending_break >= _LINE_BREAK:
                data = data.lstrip(" ")
        if not data:
            return
        if self._pending_break and self._chunks:
            self._chunks.append(_BREAK_TEXT[self._pending_break])
        self._pending_break = _NO_BREAK
        self._chunks.append(data)
        self._visible_chars += len(data) - sum(data.count(space) for space in " \n\t\r\f")
        self._at_line_start = data.endswith("\n")

    def article_text(self) -> str:
        """Return the text of the container with the most text, or else of the whole page."""
        while self._open:
            self._pop_through(self._open[-1][0])
        best = max(self._spans, key=lambda span: span[3] - span[2], default=None)
        if best is None or best[3] == best[2]:
            return "".join(self._chunks)
        return "".join(self._chunks[best[0] : best[1]])

    def _push(self, tag: str, span_index: int) -> None:
        self._open.append((tag, span_index))
        self._open_counts[tag] += 1

    def _pop_through(self, tag: str) -> None:
        """Close every tracked element up to and including the innermost open `tag`."""
        while self._open:
            open_tag, span_index = self._open.pop()
            self._open_counts[open_tag] -= 1
            if span_index >= 0:
                self._spans[span_index][1] = len(self._chunks)
                self._spans[span_index][3] = self._visible_chars
            else:
                self._skip_depth -= 1
            if open_tag == tag:
                return

    def _add_break(self, tag: str) -> None:
        """Record the break a tag causes, which is written before the next text.

        Deferring breaks lets adjacent tags such as </li><li> share one line break
        instead of leaving a blank line, and keeps breaks out of skipped elements.
        """
        if self._skip_depth:
            return
        if tag in _PARAGRAPH_TAGS:
            level = _PARAGRAPH_BREAK
        elif tag in _LINE_TAGS:
            level = _LINE_BREAK
        elif tag in _CELL_TAGS:
            level = _CELL_BREAK
        else:
            return
        self._pending_break = max(self._pending_break, level)
