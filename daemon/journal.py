"""The job journal: jobs with a kind, a priority lane and a state, kept in the store.

Functions here take a `Tx` and run on the store's writer thread, so each state change and the
events that announce it commit together.
"""

from __future__ import annotations

import enum
import json
import sqlite3
from dataclasses import dataclass
from typing import Any

from famulus.daemon.store import Tx
from famulus.ipc.protocol import Topic, now


class Lane(enum.IntEnum):
    """Priority lanes, most urgent first."""

    INTERACTIVE = 0
    CLIPBOARD = 1
    DOCUMENTS = 2
    VIDEO = 3


class JobState(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


class JobKind(enum.StrEnum):
    SUMMARIZE_DOCUMENT = "summarize.document"
    SUMMARIZE_TEXT = "summarize.text"
    ASK = "ask"
    CLIPBOARD_ACTION = "clipboard.action"
    DIGEST = "digest"
    VIDEO = "video"


@dataclass(frozen=True)
class Job:
    id: int
    kind: str
    lane: int
    state: str
    document_id: int | None
    payload: dict[str, Any]
    attempts: int
    cause: str | None

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Job:
        return cls(id=row["id"], kind=row["kind"], lane=row["lane"], state=row["state"],
                   document_id=row["document_id"], payload=json.loads(row["payload"]),
                   attempts=row["attempts"], cause=row["cause"])


def job_body(job_id: int, **extra: Any) -> dict[str, Any]:
    return {"job": job_id, **extra}


def enqueue(tx: Tx, kind: JobKind, lane: Lane, *, document_id: int | None = None,
            payload: dict[str, Any] | None = None, cause: str | None = None) -> int:
    """Add a queued job and announce it with `job.queued`; return its id."""
    cur = tx.execute(
        "INSERT INTO jobs (kind, lane, state, document_id, payload, cause, created_at) "
        "VALUES (?, ?, ?, ?, ?, ?, ?)",
        (kind, int(lane), JobState.QUEUED, document_id, json.dumps(payload or {}), cause, now()),
    )
    job_id = int(cur.lastrowid or 0)
    tx.emit(Topic.JOB_QUEUED, job_body(job_id, kind=str(kind), lane=Lane(lane).name.lower(),
                                       document=document_id), cause)
    return job_id


def queued_job_for(tx: Tx, document_id: int) -> int | None:
    """Return the id of the document's job that has not started yet, if any."""
    row = tx.execute("SELECT id FROM jobs WHERE document_id = ? AND state = ? LIMIT 1",
                     (document_id, JobState.QUEUED)).fetchone()
    return None if row is None else int(row["id"])


# The lanes the model dispatcher serves; video jobs go to the video workers instead.
MODEL_LANES = (Lane.INTERACTIVE, Lane.CLIPBOARD, Lane.DOCUMENTS)


def claim_next(tx: Tx, lanes: tuple[Lane, ...] = MODEL_LANES,
               skip_lanes: frozenset[Lane] = frozenset()) -> Job | None:
    """Mark the most urgent queued job of `lanes` running, count the attempt and return it.

    Jobs in `skip_lanes` stay queued (the folder backlog while on battery).
    """
    wanted = [int(lane) for lane in lanes if lane not in skip_lanes]
    if not wanted:
        return None
    marks = ", ".join("?" for _ in wanted)
    row = tx.execute(f"SELECT * FROM jobs WHERE state = ? AND lane IN ({marks}) "
                     "ORDER BY lane, id LIMIT 1", (JobState.QUEUED, *wanted)).fetchone()
    if row is None:
        return None
    tx.execute("UPDATE jobs SET state = ?, attempts = attempts + 1, started_at = ? WHERE id = ?",
               (JobState.RUNNING, now(), row["id"]))
    job = Job.from_row(row)
    job = Job(**{**job.__dict__, "state": JobState.RUNNING, "attempts": job.attempts + 1})
    tx.emit(Topic.JOB_STARTED, job_body(job.id, kind=job.kind, document=job.document_id,
                                        attempt=job.attempts), job.cause)
    return job


def finish(tx: Tx, job: Job, result: dict[str, Any]) -> None:
    tx.execute("UPDATE jobs SET state = ?, result = ?, error = NULL, finished_at = ? "
               "WHERE id = ?", (JobState.DONE, json.dumps(result), now(), job.id))
    tx.emit(Topic.JOB_DONE, job_body(job.id, kind=job.kind, document=job.document_id,
                                     result=result), job.cause)


def fail(tx: Tx, job: Job, error: str) -> None:
    tx.execute("UPDATE jobs SET state = ?, error = ?, finished_at = ? WHERE id = ?",
               (JobState.FAILED, error, now(), job.id))
    tx.emit(Topic.JOB_FAILED, job_body(job.id, kind=job.kind, document=job.document_id,
                                       error=error, attempts=job.attempts), job.cause)


def cancel(tx: Tx, job_id: int, reason: str) -> str | None:
    """Cancel a job that has not finished; return its state before, None if not found.

    Only a queued job changes here. A running job is stopped by the dispatcher, which then
    calls `mark_cancelled`.
    """
    row = tx.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
    if row is None:
        return None
    if row["state"] == JobState.QUEUED:
        mark_cancelled(tx, Job.from_row(row), reason)
    return str(row["state"])


def mark_cancelled(tx: Tx, job: Job, reason: str) -> None:
    tx.execute("UPDATE jobs SET state = ?, error = ?, finished_at = ? WHERE id = ?",
               (JobState.CANCELLED, reason, now(), job.id))
    tx.emit(Topic.JOB_CANCELLED, job_body(job.id, kind=job.kind, document=job.document_id,
                                          reason=reason), job.cause)


def requeue(tx: Tx, job: Job, error: str | None, *, count_attempt: bool = True) -> None:
    """Put a running job back in the queue (after a temporary failure or at shutdown)."""
    tx.execute("UPDATE jobs SET state = ?, error = ?, started_at = NULL, "
               "attempts = attempts - ? WHERE id = ?",
               (JobState.QUEUED, error, 0 if count_attempt else 1, job.id))
    tx.emit(Topic.JOB_QUEUED, job_body(job.id, kind=job.kind, lane=Lane(job.lane).name.lower(),
                                       document=job.document_id, retry=error), job.cause)


def recover_interrupted(tx: Tx) -> int:
    """Queue again the jobs a crash left running; return how many there were."""
    cur = tx.execute("UPDATE jobs SET state = ?, started_at = NULL WHERE state = ?",
                     (JobState.QUEUED, JobState.RUNNING))
    return cur.rowcount


def counts(conn: sqlite3.Connection) -> dict[str, int]:
    """Count jobs per state."""
    rows = conn.execute("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state").fetchall()
    return {row["state"]: row["n"] for row in rows}


def get(conn: sqlite3.Connection, job_id: int) -> dict[str, Any] | None:
    row = conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
    return None if row is None else to_dict(row)


def listing(conn: sqlite3.Connection, *, states: list[str] | None, kind: str | None,
            lane: Lane | None, document_id: int | None, before_id: int | None,
            limit: int) -> list[dict[str, Any]]:
    """List jobs newest first, filtered; `before_id` pages backwards."""
    clauses: list[str] = []
    params: list[Any] = []
    if states:
        clauses.append(f"state IN ({', '.join('?' for _ in states)})")
        params.extend(states)
    for column, value in (("kind", kind), ("lane", None if lane is None else int(lane)),
                          ("document_id", document_id)):
        if value is not None:
            clauses.append(f"{column} = ?")
            params.append(value)
    if before_id is not None:
        clauses.append("id < ?")
        params.append(before_id)
    where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
    rows = conn.execute(f"SELECT * FROM jobs {where} ORDER BY id DESC LIMIT ?",
                        (*params, limit)).fetchall()
    return [to_dict(row) for row in rows]


def to_dict(row: sqlite3.Row) -> dict[str, Any]:
    out = dict(row)
    out["payload"] = json.loads(out["payload"])
    out["result"] = json.loads(out["result"]) if out["result"] else None
    out["lane"] = Lane(out["lane"]).name.lower()
    return out
