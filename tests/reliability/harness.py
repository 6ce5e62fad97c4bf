"""Helpers shared by the reliability tests and bench/load.py: notes, probes, ledgers.

The checks read the daemon's own SQLite file and event log, so "exactly once" means what a
subscriber would see: one summary row and one `document.summarized` event per file.
"""

from __future__ import annotations

import os
import sqlite3
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from famulus.ipc.client import BusError, Client, DaemonUnavailable

# Short generations keep a run of thousands of files within minutes on two cores. The
# grounding check still runs on every summary; the stricter second attempt is off.
FAST_CONFIG = "\n[grounding]\nretry = false\n"
FAST_MAX_NEW_TOKENS = 16


def note_text(index: int) -> str:
    """Return a short, distinct maintenance note: the same content would be summarized once."""
    return (f"Maintenance note {index}. The pump in room {index % 97} was checked by Alice "
            f"on day {index % 28 + 1}. The pressure was {index % 50 + 10} bar and the filter "
            f"number {index} was replaced.\n")


def drop_notes(folder: Path, count: int, start: int = 0) -> list[Path]:
    """Write `count` notes beside `folder`, then move them all in at once (a bulk copy)."""
    staging = folder.parent / f".staging-{start}"
    staging.mkdir()
    names = [f"note-{index:05d}.txt" for index in range(start, start + count)]
    for index, name in zip(range(start, start + count), names, strict=True):
        (staging / name).write_text(note_text(index), encoding="utf-8")
    for name in names:
        os.rename(staging / name, folder / name)
    staging.rmdir()
    return [folder / name for name in names]


def connect(database: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(database, timeout=30)
    conn.row_factory = sqlite3.Row
    return conn


def summarized_count(database: Path) -> int:
    conn = connect(database)
    try:
        return int(conn.execute("SELECT count(*) FROM documents WHERE state = 'summarized'")
                   .fetchone()[0])
    finally:
        conn.close()


@dataclass
class Ledger:
    """What the store recorded for a set of files."""

    files: int
    summarized: int
    summaries: int
    states: dict[str, int]
    duplicate_summaries: list[str]
    duplicate_events: list[str]
    missing: list[str]
    jobs_unfinished: int
    jobs_failed: int
    integrity: str

    @property
    def exactly_once(self) -> bool:
        return (self.summarized == self.files and self.summaries == self.files
                and not self.duplicate_summaries and not self.duplicate_events
                and not self.missing and self.jobs_unfinished == 0 and self.integrity == "ok")


def ledger(database: Path, paths: list[Path]) -> Ledger:
    """Count summaries and `document.summarized` events per path for `paths`."""
    conn = connect(database)
    try:
        wanted = {str(p) for p in paths}
        rows = conn.execute("SELECT d.path, d.state, count(s.id) AS n FROM documents d "
                            "LEFT JOIN summaries s ON s.document_id = d.id GROUP BY d.id"
                            ).fetchall()
        per_path = {r["path"]: r for r in rows if r["path"] in wanted}
        states: dict[str, int] = {}
        for row in per_path.values():
            states[row["state"]] = states.get(row["state"], 0) + 1
        events: dict[str, int] = {}
        for (path,) in conn.execute("SELECT json_extract(body, '$.path') FROM events "
                                    "WHERE topic = 'document.summarized'"):
            if path in wanted:
                events[path] = events.get(path, 0) + 1
        jobs = dict(conn.execute("SELECT state, count(*) FROM jobs GROUP BY state").fetchall())
        integrity = conn.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        conn.close()
    return Ledger(
        files=len(wanted),
        summarized=states.get("summarized", 0),
        summaries=sum(r["n"] for r in per_path.values()),
        states=states,
        duplicate_summaries=sorted(p for p, r in per_path.items() if r["n"] > 1),
        duplicate_events=sorted(p for p, n in events.items() if n > 1),
        missing=sorted(wanted - set(per_path)),
        jobs_unfinished=jobs.get("queued", 0) + jobs.get("running", 0),
        jobs_failed=jobs.get("failed", 0),
        integrity=str(integrity),
    )


def rss_kib(pid: int) -> int | None:
    """Return the resident set size of `pid` in KiB, or None when it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


@dataclass
class Probe:
    """Calls `status` at an interval and samples RSS of the daemon and its model host."""

    requests_endpoint: str
    daemon_pid: int
    interval_s: float = 0.1
    rss_every_s: float = 2.0
    latencies_ms: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    # (seconds since start, daemon RSS KiB, model host RSS KiB or None, summarized so far)
    rss: list[tuple[float, int | None, int | None, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="probe", daemon=True)

    def start(self) -> Probe:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        started = time.monotonic()
        next_rss = started
        with Client(self.requests_endpoint, timeout_s=10) as client:
            while not self._stop.is_set():
                before = time.perf_counter()
                try:
                    status = client.call("status")
                except (BusError, DaemonUnavailable, TimeoutError) as exc:
                    self.failures.append(f"{type(exc).__name__}: {exc}")
                    status = None
                else:
                    self.latencies_ms.append((time.perf_counter() - before) * 1000)
                now = time.monotonic()
                if status is not None and now >= next_rss:
                    model_pid = status["model"].get("pid")
                    done = int(status.get("documents", {}).get("summarized", 0))
                    self.rss.append((round(now - started, 1), rss_kib(self.daemon_pid),
                                     rss_kib(model_pid) if model_pid else None, done))
                    next_rss = now + self.rss_every_s
                self._stop.wait(self.interval_s)

    def summary(self) -> dict[str, Any]:
        ms = sorted(self.latencies_ms)

        def pct(fraction: float) -> float:
            return round(ms[min(len(ms) - 1, max(0, round(fraction * len(ms)) - 1))], 3)
        return {"calls": len(ms), "failures": len(self.failures),
                "p50_ms": pct(0.5) if ms else None, "p99_ms": pct(0.99) if ms else None,
                "max_ms": round(ms[-1], 3) if ms else None,
                "mean_ms": round(statistics.fmean(ms), 3) if ms else None}
