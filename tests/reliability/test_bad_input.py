"""Bad input: every hostile file ends with text or a recorded reason, in bounded time and memory.

Extraction runs in the sandbox's child process, as in the daemon. Generated variants cover
random bytes under every supported suffix, corpus PDFs with flipped bytes, deep and broken
HTML, an oversize file and PDFs whose streams inflate far past their size.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from famulus.daemon.extract import REASONS, SUPPORTED_SUFFIXES, ExtractionError
from famulus.daemon.extract.sandbox import ExtractionSandbox
from famulus.ipc.protocol import Topic
from tests.conftest import CORPUS, DaemonHome, wait_for
from tests.reliability.badfiles import nested_html, oversize, pdf_bomb
from tests.reliability.harness import FAST_CONFIG, FAST_MAX_NEW_TOKENS, rss_kib

TIMEOUT_S = 20.0
MEMORY_BYTES = 256 * 1024 * 1024
MAX_BYTES = 50 * 1024 * 1024
BAD_FILES = sorted((CORPUS / "bad").iterdir())
PDFS = sorted((CORPUS / "documents").glob("*.pdf"))
FUZZ = hypothesis_settings(max_examples=40, deadline=None,
                           suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def sandbox() -> Iterator[ExtractionSandbox]:
    box = ExtractionSandbox(timeout_s=TIMEOUT_S, memory_bytes=MEMORY_BYTES)
    yield box
    box.close()


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bad-input")


def outcome(sandbox: ExtractionSandbox, path: Path, max_bytes: int = MAX_BYTES) -> str:
    """Return "text" or the reason code, checking the time bound on the way."""
    started = time.monotonic()
    try:
        extracted = sandbox.extract(path, max_bytes=max_bytes)
    except ExtractionError as exc:
        result = exc.reason
        assert str(exc), "a reason needs a message for people"
    else:
        assert extracted.text.strip()
        result = "text"
    # The sandbox's own limit plus the start of a new child.
    assert time.monotonic() - started < TIMEOUT_S + 15
    return result


@pytest.mark.parametrize("path", BAD_FILES, ids=[p.name for p in BAD_FILES])
def test_corpus_bad_file_outcome(sandbox: ExtractionSandbox, path: Path) -> None:
    expected = {"empty.txt": "no_text", "encrypted-needs-password.pdf": "encrypted",
                "pdf-named-as.docx": "text", "random-bytes.txt": "binary",
                "scanned-no-text-layer.pdf": "no_text_layer", "truncated.pdf": "corrupt",
                "utf16le-bom.txt": "text"}
    assert outcome(sandbox, path) == expected[path.name]


@FUZZ
@given(data=st.binary(max_size=4096), suffix=st.sampled_from(sorted(SUPPORTED_SUFFIXES)))
def test_random_bytes_get_a_reason(sandbox: ExtractionSandbox, scratch: Path, data: bytes,
                                   suffix: str) -> None:
    path = scratch / f"random{suffix}"
    path.write_bytes(data)
    result = outcome(sandbox, path)
    assert result == "text" or result in REASONS


@FUZZ
@given(source=st.sampled_from(PDFS), cut=st.floats(0.0, 1.0),
       flips=st.lists(st.tuples(st.floats(0.0, 1.0), st.integers(0, 255)), max_size=20))
def test_damaged_pdf_gets_a_reason(sandbox: ExtractionSandbox, scratch: Path, source: Path,
                                   cut: float, flips: list[tuple[float, int]]) -> None:
    data = bytearray(source.read_bytes())
    for where, value in flips:
        data[int(where * (len(data) - 1))] = value
    path = scratch / "damaged.pdf"
    path.write_bytes(bytes(data[: max(1, int(cut * len(data)))]))
    result = outcome(sandbox, path)
    assert result == "text" or result in REASONS


@pytest.mark.parametrize("depth", [1_000, 100_000])
def test_deep_html_keeps_its_text(sandbox: ExtractionSandbox, scratch: Path,
                                  depth: int) -> None:
    path = nested_html(scratch / f"deep-{depth}.html", depth)
    assert sandbox.extract(path, max_bytes=MAX_BYTES).text == "The deepest text."


def test_unclosed_tags_stop_at_timeout(scratch: Path) -> None:
    # html.parser takes quadratic time on thousands of unclosed start tags.
    path = scratch / "unclosed.html"
    path.write_text("<a " * 30_000, encoding="utf-8")
    box = ExtractionSandbox(timeout_s=2.0, memory_bytes=MEMORY_BYTES)
    try:
        assert outcome(box, path) == "timeout"
        fine = scratch / "fine.txt"
        fine.write_text("A plain note.", encoding="utf-8")
        assert box.extract(fine, max_bytes=MAX_BYTES).text == "A plain note."
    finally:
        box.close()


def test_oversize_file_is_too_large(sandbox: ExtractionSandbox, scratch: Path) -> None:
    path = oversize(scratch / "huge.txt", MAX_BYTES + 1)
    assert outcome(sandbox, path) == "too_large"


def test_pdf_bomb_past_pypdf_limit(sandbox: ExtractionSandbox, scratch: Path) -> None:
    path = pdf_bomb(scratch / "bomb-400m.pdf", 400 * 1024 * 1024)
    assert path.stat().st_size < 2 * 1024 * 1024
    assert outcome(sandbox, path) == "too_large"


def test_pdf_bomb_over_memory_limit(sandbox: ExtractionSandbox, scratch: Path) -> None:
    # Under pypdf's 75 MB limit, but parsing 60 MB of operators takes more than 256 MiB.
    path = pdf_bomb(scratch / "bomb-60m.pdf", 60 * 1024 * 1024)
    assert outcome(sandbox, path) == "memory"
    fine = scratch / "after.txt"
    fine.write_text("The next file still works.", encoding="utf-8")
    assert sandbox.extract(fine, max_bytes=MAX_BYTES).text == "The next file still works."


def test_hostile_files_in_watched_folder(daemon_home: DaemonHome) -> None:
    daemon_home.write_config(max_new_tokens=FAST_MAX_NEW_TOKENS, extra=FAST_CONFIG)
    config = daemon_home.config_file.read_text(encoding="utf-8")
    daemon_home.config_file.write_text(config.replace(
        "[model]", "max_file_bytes = 1048576\n\n[extract]\ntimeout_s = 20.0\n"
        f"max_memory_bytes = {MEMORY_BYTES}\n\n[model]"), encoding="utf-8")
    proc = daemon_home.start()
    inbox = daemon_home.inbox
    hostile = [pdf_bomb(inbox / "bomb-400m.pdf", 400 * 1024 * 1024),
               pdf_bomb(inbox / "bomb-60m.pdf", 60 * 1024 * 1024),
               nested_html(inbox / "deep.html", 50_000),
               oversize(inbox / "huge.txt", 2 * 1024 * 1024)]
    (inbox / "unclosed.html").write_text("<a " * 30_000, encoding="utf-8")
    hostile.append(inbox / "unclosed.html")
    for path in BAD_FILES:
        hostile.append(Path(shutil.copy(path, inbox / f"bad-{path.name}")))
    good = inbox / "good.txt"
    good.write_text("The lift in block B was inspected by Frank on 3 May.", encoding="utf-8")

    def settled() -> bool:
        rows = daemon_home.rows("SELECT path, state FROM documents")
        done = {r["path"] for r in rows if r["state"] != "pending"}
        return all(str(p) in done for p in [*hostile, good])
    wait_for(settled, 300, "every hostile file to be recorded")

    rows = {r["path"]: r for r in daemon_home.rows(
        "SELECT path, state, reason_code FROM documents")}
    assert rows[str(good)]["state"] == "summarized"
    assert rows[str(inbox / "bomb-400m.pdf")]["reason_code"] == "too_large"
    assert rows[str(inbox / "bomb-60m.pdf")]["reason_code"] == "memory"
    assert rows[str(inbox / "huge.txt")]["reason_code"] == "too_large"
    assert rows[str(inbox / "unclosed.html")]["reason_code"] == "timeout"
    assert rows[str(inbox / "deep.html")]["state"] == "summarized"
    for path in hostile:
        row = rows[str(path)]
        assert row["state"] in ("summarized", "failed", "skipped"), path.name
        if row["state"] != "summarized":
            assert row["reason_code"], f"{path.name} has no recorded reason"
    assert daemon_home.log is not None
    assert daemon_home.log.matching(Topic.DOCUMENT_SUMMARIZED, path=str(good))
    # The parsers' memory stayed in the child: the daemon itself is still small.
    assert (rss_kib(proc.pid) or 0) < 200 * 1024
    assert daemon_home.status()["state"] == "running"
