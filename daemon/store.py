"""The SQLite store: one writer thread, per-thread readers, migrations and the event log.

All writes go through `Store.call` / `Store.submit`, which run a function on the single writer
thread inside `BEGIN IMMEDIATE ... COMMIT`. A function can append events with `Tx.emit`.
They are written in the same transaction as the change they describe and reach the bus only
after the commit. So an event that a subscriber saw is always in the log, and a change that
was rolled back was never announced.
"""

from __future__ import annotations

import logging
import queue
import shutil
import sqlite3
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

import sqlite_utils

from famulus.ipc.protocol import Event, dumps, new_id, now

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Each entry moves the schema from version N to N+1 and runs in one transaction.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE documents (
        id INTEGER PRIMARY KEY,
        path TEXT NOT NULL UNIQUE,
        size INTEGER,
        mtime REAL,
        sha256 TEXT,
        state TEXT NOT NULL,
        reason TEXT,
        reason_code TEXT,
        format TEXT,
        detected_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE INDEX documents_sha256 ON documents(sha256);
    CREATE TABLE jobs (
        id INTEGER PRIMARY KEY,
        kind TEXT NOT NULL,
        lane INTEGER NOT NULL,
        state TEXT NOT NULL,
        document_id INTEGER REFERENCES documents(id),
        payload TEXT NOT NULL DEFAULT '{}',
        result TEXT,
        attempts INTEGER NOT NULL DEFAULT 0,
        error TEXT,
        cause TEXT,
        created_at REAL NOT NULL,
        started_at REAL,
        finished_at REAL
    );
    CREATE INDEX jobs_queue ON jobs(state, lane, id);
    CREATE INDEX jobs_document ON jobs(document_id, state);
    CREATE TABLE summaries (
        id INTEGER PRIMARY KEY,
        document_id INTEGER UNIQUE REFERENCES documents(id),
        job_id INTEGER REFERENCES jobs(id),
        sha256 TEXT,
        model TEXT NOT NULL,
        device TEXT NOT NULL,
        text TEXT NOT NULL,
        chunks INTEGER NOT NULL,
        prompt_tokens INTEGER,
        generated_tokens INTEGER,
        generation_s REAL,
        created_at REAL NOT NULL
    );
    CREATE INDEX summaries_sha256 ON summaries(sha256, model);
    CREATE TABLE events (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL,
        cause TEXT,
        ts REAL NOT NULL,
        topic TEXT NOT NULL,
        body TEXT NOT NULL
    );
    """,
    # Full-text search over summaries, kept in step by sqlite-utils' triggers.
    "FTS:summaries:text",
    # How each summary was checked against its source, and the claims it could not find.
    """
    ALTER TABLE summaries ADD COLUMN grounding TEXT NOT NULL DEFAULT 'off';
    ALTER TABLE summaries ADD COLUMN grounded INTEGER;
    ALTER TABLE summaries ADD COLUMN unsupported TEXT NOT NULL DEFAULT '[]'
    """,
    # Results of clipboard actions. The clipboard text itself is not kept: only its hash and
    # length, next to the action's output.
    """
    CREATE TABLE clipboard_results (
        id INTEGER PRIMARY KEY,
        job_id INTEGER REFERENCES jobs(id),
        action TEXT NOT NULL,
        sha256 TEXT NOT NULL,
        chars INTEGER NOT NULL,
        text TEXT NOT NULL,
        model TEXT NOT NULL,
        created_at REAL NOT NULL
    );
    CREATE INDEX clipboard_results_created ON clipboard_results(created_at)
    """,
]


class StoreClosed(Exception):
    """A write was submitted after the store was closed."""


class Tx:
    """The write transaction handed to functions that run on the writer thread."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.db = sqlite_utils.Database(conn)
        self.events: list[Event] = []

    def execute(self, sql: str, params: Iterable[Any] = ()) -> sqlite3.Cursor:
        return self.conn.execute(sql, tuple(params))

    def emit(self, topic: str, body: dict[str, Any], cause: str | None = None) -> Event:
        """Append an event to the log; it is published after this transaction commits."""
        event_id, ts = new_id(), now()
        # dumps keeps a lone surrogate (a file name that is not valid UTF-8) as a \u escape.
        body_json = dumps(body).decode("utf-8")
        cur = self.conn.execute(
            "INSERT INTO events (id, cause, ts, topic, body) VALUES (?, ?, ?, ?, ?)",
            (event_id, cause, ts, topic, body_json),
        )
        event = Event(seq=int(cur.lastrowid or 0), id=event_id, cause=cause, ts=ts,
                      topic=topic, body=body)
        self.events.append(event)
        return event


def connect(path: Path) -> sqlite3.Connection:
    """Open a connection with the settings every famulus connection uses."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA journal_mode=WAL")
    # FULL: a commit is on disk before its events are published, so a power loss cannot
    # take back an event that a subscriber already saw (NORMAL could, and reuse its seq).
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute("PRAGMA busy_timeout=30000")
    return conn


def migrate(conn: sqlite3.Connection) -> int:
    """Bring the schema up to date, one transaction per step; return the new version."""
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    for target in range(version + 1, len(MIGRATIONS) + 1):
        step = MIGRATIONS[target - 1]
        conn.execute("BEGIN IMMEDIATE")
        try:
            if step.startswith("FTS:"):
                _, table, column = step.split(":")
                sqlite_utils.Database(conn).table(table).enable_fts(
                    [column], create_triggers=True, tokenize="unicode61")
            else:
                for statement in filter(str.strip, step.split(";")):
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {target}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        logger.info("store migrated to schema version %d", target)
    return len(MIGRATIONS)


_STOP = object()


class StorageFull(Exception):
    """The disk with the database is full: nothing can be recorded until space is freed."""

    def __init__(self, path: Path) -> None:
        free = _free_bytes(path.parent)
        super().__init__(
            f"the disk with {path} is full ({free} bytes free): famulus records nothing "
            "until space is freed there. Delete files on that disk, or set XDG_DATA_HOME to a "
            "folder on another disk and restart famulus.")
        self.path = path
        self.free_bytes = free


def _free_bytes(folder: Path) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def _is_full(exc: BaseException) -> bool:
    return (isinstance(exc, sqlite3.OperationalError)
            and getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL)


class Store:
    """Owns the database file: the writer thread and a read connection per thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=10_000)
        self._local = threading.local()
        self._closed = False
        self.on_commit: Callable[[list[Event]], None] | None = None
        # True from a write that failed for lack of disk space until the next commit.
        self.full = False
        conn = connect(path)
        migrate(conn)
        self._thread = threading.Thread(target=self._run, args=(conn,), name="store-writer",
                                        daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[[Tx], T]) -> Future[T]:
        """Queue `fn` to run in its own write transaction; return a future of its result."""
        if self._closed:
            raise StoreClosed("the store is closed; the daemon is shutting down")
        future: Future[T] = Future()
        self._queue.put((fn, future))
        return future

    def call(self, fn: Callable[[Tx], T], timeout: float = 30.0) -> T:
        """Run `fn` in a write transaction and wait for its result."""
        return self.submit(fn).result(timeout=timeout)

    def read(self) -> sqlite3.Connection:
        """Return this thread's read-only connection (autocommit, reads committed data)."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = connect(self.path)
            conn.execute("PRAGMA query_only=ON")
            self._local.conn = conn
        return conn

    def query(self, sql: str, params: Iterable[Any] = ()) -> list[sqlite3.Row]:
        return self.read().execute(sql, tuple(params)).fetchall()

    def close(self, timeout: float = 5.0) -> None:
        """Finish queued writes, then stop the writer thread."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(_STOP)
        self._thread.join(timeout)
        if self._thread.is_alive():
            logger.warning("store writer did not stop within %.1f s", timeout)
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()

    def _run(self, conn: sqlite3.Connection) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                break
            fn, future = item
            if not future.set_running_or_notify_cancel():
                continue
            tx = Tx(conn)
            try:
                conn.execute("BEGIN IMMEDIATE")
                result = fn(tx)
                conn.execute("COMMIT")
            except BaseException as exc:  # handed to the caller through the future
                if conn.in_transaction:
                    try:
                        conn.execute("ROLLBACK")
                    except sqlite3.Error:
                        # The writer thread must live on; SQLite rolls back by itself on
                        # the next BEGIN when the journal is still there.
                        logger.exception("rolling back a failed transaction failed")
                if _is_full(exc):
                    exc = self._storage_full(exc)
                future.set_exception(exc)
                continue
            if self.full:
                self.full = False
                logger.info("disk space is available again: database=%s", self.path)
            future.set_result(result)
            if tx.events and self.on_commit is not None:
                try:
                    self.on_commit(tx.events)
                except Exception:
                    logger.exception("publishing %d committed events failed", len(tx.events))
        conn.close()

    def _storage_full(self, cause: BaseException) -> StorageFull:
        full = StorageFull(self.path)
        full.__cause__ = cause
        if not self.full:
            # Once per episode: every write fails until space returns.
            logger.error("%s", full)
            self.full = True
        return full
