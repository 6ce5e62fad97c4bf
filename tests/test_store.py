"""The SQLite store: migrations, the single writer and the event log."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from famulus.daemon import journal
from famulus.daemon.journal import JobKind, Lane
from famulus.daemon.store import MIGRATIONS, Store, Tx, connect, migrate
from famulus.ipc.protocol import Event


def test_migrations_reach_latest_once(tmp_path: Path) -> None:
    conn = connect(tmp_path / "db.sqlite")
    assert migrate(conn) == len(MIGRATIONS)
    assert migrate(conn) == len(MIGRATIONS)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


def test_rolled_back_write_publishes_nothing(tmp_path: Path) -> None:
    store = Store(tmp_path / "db.sqlite")
    published: list[Event] = []
    store.on_commit = published.extend

    def failing(tx: Tx) -> None:
        tx.emit("job.queued", {"job": 1})
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        store.call(failing)
    assert published == []
    assert store.query("SELECT COUNT(*) FROM events")[0][0] == 0
    store.call(lambda tx: tx.emit("job.queued", {"job": 2}))
    assert [e.body for e in published] == [{"job": 2}]
    store.close()


def test_sequence_survives_reopen(tmp_path: Path) -> None:
    store = Store(tmp_path / "db.sqlite")
    first = store.call(lambda tx: tx.emit("a.b", {}))
    store.call(lambda tx: tx.execute("DELETE FROM events"))
    store.close()
    store = Store(tmp_path / "db.sqlite")
    second = store.call(lambda tx: tx.emit("a.b", {}))
    store.close()
    assert second.seq == first.seq + 1


def test_lanes_order_claims(tmp_path: Path) -> None:
    store = Store(tmp_path / "db.sqlite")
    doc_job = store.call(lambda tx: journal.enqueue(tx, JobKind.SUMMARIZE_TEXT, Lane.DOCUMENTS))
    urgent = store.call(lambda tx: journal.enqueue(tx, JobKind.SUMMARIZE_TEXT, Lane.INTERACTIVE))
    first = store.call(journal.claim_next)
    second = store.call(journal.claim_next)
    assert (first.id, second.id) == (urgent, doc_job)
    assert first.attempts == 1
    assert store.call(journal.claim_next) is None
    assert store.call(journal.recover_interrupted) == 2
    assert journal.counts(store.read()) == {"queued": 2}
    store.close()


def test_summaries_are_searchable(tmp_path: Path) -> None:
    store = Store(tmp_path / "db.sqlite")
    store.call(lambda tx: tx.execute(
        "INSERT INTO summaries (model, device, text, chunks, created_at) "
        "VALUES ('m', 'CPU', 'The harbour crane lifts thirty tonnes.', 1, 0)"))
    rows = store.query("SELECT rowid FROM summaries_fts WHERE summaries_fts MATCH 'crane'")
    assert len(rows) == 1
    store.close()


def test_reader_cannot_write(tmp_path: Path) -> None:
    store = Store(tmp_path / "db.sqlite")
    with pytest.raises(sqlite3.OperationalError):
        store.read().execute("DELETE FROM events")
    store.close()


def test_event_frames_match_plain_encoding(tmp_path: Path) -> None:
    store = Store(tmp_path / "db.sqlite")
    body = {"path": "/tmp/Zürich \udc80.txt", "n": 1.5, "nested": {"a": [1, None, True]}}
    event = store.call(lambda tx: tx.emit("document.detected", body, cause="c1"))
    store.close()
    topic, payload = event.frames()
    plain = Event(event.seq, event.id, event.cause, event.ts, event.topic, event.body)
    assert topic == b"document.detected"
    assert json.loads(payload) == json.loads(plain.frames()[1])
