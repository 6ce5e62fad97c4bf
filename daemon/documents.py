"""Document records: detection, change tracking, outcomes and their events.

A document is identified by its path, and its content by the SHA-256 of its bytes. These
functions run on the store's writer thread (they take a `Tx`), so a record, its job and the
events announcing them always commit together.
"""

from __future__ import annotations

import enum
import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from famulus.daemon import journal
from famulus.daemon.journal import JobKind, Lane
from famulus.daemon.store import Tx
from famulus.ipc.protocol import Topic, now


class DocState(enum.StrEnum):
    PENDING = "pending"
    SUMMARIZED = "summarized"
    FAILED = "failed"
    SKIPPED = "skipped"
    REMOVED = "removed"


# States after which an unchanged file needs no more work.
SETTLED = (DocState.SUMMARIZED, DocState.FAILED, DocState.SKIPPED)


@dataclass(frozen=True)
class FileInfo:
    path: str
    size: int
    mtime: float

    @classmethod
    def of(cls, path: Path) -> FileInfo:
        st = path.stat()
        return cls(str(path), st.st_size, st.st_mtime)


def get_by_path(conn: sqlite3.Connection | Tx, path: str) -> sqlite3.Row | None:
    return conn.execute("SELECT * FROM documents WHERE path = ?", (path,)).fetchone()


def is_settled(row: sqlite3.Row | None, info: FileInfo) -> bool:
    """Tell whether the record already covers this exact file version."""
    return (row is not None and row["state"] in SETTLED and row["size"] == info.size
            and row["mtime"] == info.mtime)


def submit_file(tx: Tx, info: FileInfo, *, lane: Lane = Lane.DOCUMENTS,
                cause: str | None = None, force: bool = False,
                payload: dict[str, Any] | None = None) -> int | None:
    """Record a new or changed file and queue its job; return the job id.

    Returns None when nothing needs doing: the file is unchanged since its last outcome, or
    a job for it is already waiting (that job reads the file's content when it runs).
    """
    row = get_by_path(tx, info.path)
    if not force and is_settled(row, info):
        return None
    if row is None:
        cur = tx.execute(
            "INSERT INTO documents (path, size, mtime, state, detected_at, updated_at) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (info.path, info.size, info.mtime, DocState.PENDING, now(), now()))
        doc_id = int(cur.lastrowid or 0)
    else:
        doc_id = int(row["id"])
        waiting = journal.queued_job_for(tx, doc_id)
        if waiting is not None:
            return waiting
        tx.execute("UPDATE documents SET size = ?, mtime = ?, state = ?, updated_at = ? "
                   "WHERE id = ?", (info.size, info.mtime, DocState.PENDING, now(), doc_id))
    event = tx.emit(Topic.DOCUMENT_DETECTED, {"document": doc_id, "path": info.path,
                                              "size": info.size, "known": row is not None},
                    cause)
    return journal.enqueue(tx, JobKind.SUMMARIZE_DOCUMENT, lane, document_id=doc_id,
                           payload=payload, cause=event.id)


def mark_removed(tx: Tx, path: str, cause: str | None = None) -> bool:
    """Mark a document (or every document below a removed folder) as removed."""
    rows = tx.execute("SELECT id, path FROM documents WHERE (path = ? OR path LIKE ? ESCAPE '\\')"
                      " AND state != ?", (path, _like_prefix(path), DocState.REMOVED)).fetchall()
    for row in rows:
        tx.execute("UPDATE documents SET state = ?, updated_at = ? WHERE id = ?",
                   (DocState.REMOVED, now(), row["id"]))
        tx.emit(Topic.DOCUMENT_REMOVED, {"document": row["id"], "path": row["path"]}, cause)
    return bool(rows)


def _like_prefix(folder: str) -> str:
    escaped = folder.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped.rstrip("/") + "/%"


def settle(tx: Tx, job: journal.Job, state: DocState, *, info: FileInfo | None,
           sha256: str | None, reason: str | None = None, reason_code: str | None = None,
           fmt: str | None = None) -> None:
    """Store a document's outcome (without its summary) on the document row."""
    fields: dict[str, Any] = {"state": state, "reason": reason, "reason_code": reason_code,
                              "updated_at": now()}
    if info is not None:
        fields.update(size=info.size, mtime=info.mtime)
    if sha256 is not None:
        fields["sha256"] = sha256
    if fmt is not None:
        fields["format"] = fmt
    assignments = ", ".join(f"{k} = ?" for k in fields)
    tx.execute(f"UPDATE documents SET {assignments} WHERE id = ?",
               [*fields.values(), job.document_id])


def summary_for_content(conn: sqlite3.Connection | Tx, sha256: str, model: str
                        ) -> sqlite3.Row | None:
    """Return a stored summary of the same bytes by the same model, if there is one."""
    return conn.execute("SELECT * FROM summaries WHERE sha256 = ? AND model = ? "
                        "ORDER BY id DESC LIMIT 1", (sha256, model)).fetchone()


@dataclass(frozen=True)
class Outcome:
    """The finished summary of a job, with its provenance, ready to be stored."""

    text: str
    device: str
    chunks: int
    generated_tokens: int | None
    generation_s: float | None
    grounding: str
    grounded: bool | None
    unsupported: list[dict[str, str]]

    def grounding_fields(self) -> dict[str, Any]:
        return {"grounded": self.grounded, "grounding": self.grounding,
                "unsupported": self.unsupported}

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Outcome:
        """Rebuild a stored summary's outcome for reuse; no tokens were generated for it."""
        grounded = row["grounded"]
        return cls(text=row["text"], device=row["device"], chunks=row["chunks"],
                   generated_tokens=None, generation_s=None, grounding=row["grounding"],
                   grounded=None if grounded is None else bool(grounded),
                   unsupported=json.loads(row["unsupported"]))


def save_summary(tx: Tx, job: journal.Job, *, sha256: str | None, model: str,
                 outcome: Outcome) -> int:
    """Insert the summary, or replace the document's previous one (one row per document)."""
    values = {"job_id": job.id, "sha256": sha256, "model": model, "device": outcome.device,
              "text": outcome.text, "chunks": outcome.chunks, "prompt_tokens": None,
              "generated_tokens": outcome.generated_tokens,
              "generation_s": outcome.generation_s, "grounding": outcome.grounding,
              "grounded": outcome.grounded,
              "unsupported": json.dumps(outcome.unsupported, ensure_ascii=False),
              "created_at": now()}
    existing = None
    if job.document_id is not None:
        existing = tx.execute("SELECT id FROM summaries WHERE document_id = ?",
                              (job.document_id,)).fetchone()
    if existing is not None:
        assignments = ", ".join(f"{k} = ?" for k in values)
        tx.execute(f"UPDATE summaries SET {assignments} WHERE id = ?",
                   [*values.values(), existing["id"]])
        return int(existing["id"])
    cur = tx.execute(
        f"INSERT INTO summaries (document_id, {', '.join(values)}) "
        f"VALUES (?, {', '.join('?' for _ in values)})", [job.document_id, *values.values()])
    return int(cur.lastrowid or 0)


def counts(conn: sqlite3.Connection) -> dict[str, int]:
    rows = conn.execute("SELECT state, COUNT(*) AS n FROM documents GROUP BY state").fetchall()
    return {row["state"]: row["n"] for row in rows}
