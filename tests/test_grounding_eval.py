"""Grounded summaries end to end: the real daemon and model over the evaluation set."""

from __future__ import annotations

import json
import shutil
import tomllib
from pathlib import Path

import pytest

from famulus.daemon.extract import extract_text
from famulus.daemon.grounding.claims import check
from famulus.ipc.protocol import Topic
from tests.conftest import DaemonHome

EVAL_DIR = Path(__file__).parent / "eval"


def eval_files() -> list[Path]:
    data = tomllib.loads((EVAL_DIR / "facts.toml").read_text(encoding="utf-8"))
    return [(EVAL_DIR / d["file"]).resolve() for d in data["document"]]


# Ten real generations with retries: about 200 s on two idle cores, more on a busy machine.
@pytest.mark.timeout(900)
def test_stored_summaries_grounded_or_marked(daemon_home: DaemonHome) -> None:
    daemon_home.write_config(max_new_tokens=120)
    daemon_home.start()
    files = eval_files()
    for path in files:
        shutil.copy(path, daemon_home.inbox / path.name)
    events = {}
    for path in files:
        target = str(daemon_home.inbox / path.name)
        events[path.name] = daemon_home.log.wait(
            lambda e, t=target: e.topic == Topic.DOCUMENT_SUMMARIZED and e.body["path"] == t,
            600, f"summary of {path.name}")
    for path in files:
        row = daemon_home.rows(
            "SELECT s.text, s.grounding, s.grounded, s.unsupported FROM summaries s "
            "JOIN documents d ON d.id = s.document_id WHERE d.path = ?",
            (str(daemon_home.inbox / path.name),))[0]
        source = extract_text(path, max_bytes=10**8).text
        report = check(row["text"], source)
        marked = row["grounded"] == 0 and json.loads(row["unsupported"])
        assert report.grounded or marked, (path.name, row["text"],
                                           [c.text for c in report.unsupported])
        event = events[path.name]
        assert event.body["grounded"] == bool(row["grounded"])
        assert event.body["grounding"] == row["grounding"]
        assert event.body["unsupported"] == json.loads(row["unsupported"])
        if row["grounding"] != "grounded":
            assert event.body["unsupported"], path.name
