"""The scheduler: catch-up after SIGSTOP, the digest, and the retention purge."""

from __future__ import annotations

import signal
import textwrap
import threading
import time
from pathlib import Path

from famulus.daemon.config import parse_config
from famulus.daemon.journal import JobKind, Lane, enqueue
from famulus.daemon.retention import purge_expired
from famulus.daemon.scheduler import Scheduler
from famulus.daemon.store import Store
from famulus.ipc.protocol import Event, Topic
from tests.conftest import DaemonHome, wait_for

INTERVAL_S = 4.0


def digests_after(home: DaemonHome, ts: float) -> list[Event]:
    assert home.log is not None
    return [e for e in home.log.matching(Topic.DIGEST_READY) if e.ts > ts]


def test_sigstop_yields_one_catch_up(daemon_home: DaemonHome) -> None:
    digest_folder = daemon_home.root / "digests"
    daemon_home.write_config(extra=textwrap.dedent(f"""
        [plugins.digest]
        interval_s = {INTERVAL_S}
        folder = {str(digest_folder)!r}
        """))
    daemon_home.start()
    proc = daemon_home.proc
    assert proc is not None

    # Stop right after a run, so the due times during the stop are known: one and two
    # intervals after that run. The stop lasts two and a half intervals.
    wait_for(lambda: digests_after(daemon_home, 0), 3 * INTERVAL_S, "a first digest")
    seen = len(digests_after(daemon_home, 0))
    wait_for(lambda: len(digests_after(daemon_home, 0)) > seen, 3 * INTERVAL_S,
             "the next digest")
    proc.send_signal(signal.SIGSTOP)
    stopped_at = time.time()
    try:
        time.sleep(2.5 * INTERVAL_S)  # the stimulus: two due times pass while stopped
    finally:
        proc.send_signal(signal.SIGCONT)
    resumed_at = time.time()

    # The catch-up run comes at once; the next regular run is due half an interval later.
    wait_for(lambda: len(digests_after(daemon_home, resumed_at)) >= 2, 3 * INTERVAL_S,
             "the catch-up digest and the next regular one")
    runs = digests_after(daemon_home, stopped_at)
    catch_up, regular = runs[0], runs[1]
    assert catch_up.ts - resumed_at < 0.4 * INTERVAL_S
    # A second catch-up would follow the first within milliseconds.
    assert regular.ts - catch_up.ts > 0.25 * INTERVAL_S
    assert len([e for e in runs if e.ts < resumed_at + 0.4 * INTERVAL_S]) == 1
    assert catch_up.body["summaries"] == 0
    assert catch_up.body["path"] is None
    daemon_home.stop()
    log = daemon_home.stderr()
    assert log.count("catch-up run of a missed schedule: job=plugin.digest.digest") == 1


def test_digest_written_as_markdown(daemon_home: DaemonHome) -> None:
    digest_folder = daemon_home.root / "digests"
    daemon_home.write_config(extra=textwrap.dedent(f"""
        [plugins.digest]
        interval_s = 5
        folder = {str(digest_folder)!r}
        """))
    daemon_home.start()
    note = daemon_home.inbox / "ferry.txt"
    note.write_text("The ferry to Lindby leaves at eight. It returns at five.\n")
    summary = daemon_home.log.wait(lambda e: e.topic == Topic.DOCUMENT_SUMMARIZED, 180,
                                   "the summary")
    digest = daemon_home.log.wait(lambda e: e.topic == Topic.DIGEST_READY
                                  and e.body["summaries"] == 1, 180, "a digest of it")
    assert digest.body["digest"].strip()
    path = Path(digest.body["path"])
    assert path.parent == digest_folder
    text = path.read_text(encoding="utf-8")
    assert text.startswith("# Digest ")
    assert digest.body["digest"] in text
    assert "### ferry.txt" in text
    assert summary.body["summary"] in text
    assert not list(digest_folder.glob("*.partial"))


def test_scheduler_runs_and_removes_jobs() -> None:
    scheduler = Scheduler(misfire_grace_s=60)
    runs: list[float] = []
    ran = threading.Event()

    def job() -> None:
        runs.append(time.monotonic())
        ran.set()

    scheduler.start()
    try:
        scheduler.add_interval("probe", job, 0.2, run_now=True)
        assert ran.wait(5), "the job did not run within 5 s"
        assert scheduler.job_ids() == ["probe"]
        scheduler.remove("probe")
        scheduler.remove("probe")  # removing twice is harmless
        assert scheduler.job_ids() == []
    finally:
        scheduler.shutdown(1)


def test_purge_deletes_old_clipboard_results(tmp_path: Path) -> None:
    store = Store(tmp_path / "famulus.db")
    try:
        config = parse_config({"plugins": {"clipboard": {"retention_days": 1.0,
                                                         "max_results": 2}}})
        old = time.time() - 2 * 86400

        def seed(tx):  # type: ignore[no-untyped-def]
            for index in range(4):
                created = old if index == 0 else time.time()
                tx.execute("INSERT INTO clipboard_results (action, sha256, chars, text, model, "
                           "created_at) VALUES ('summarize', 'h', 10, ?, 'm', ?)",
                           (f"result {index}", created))
            tx.execute("INSERT INTO events (id, cause, ts, topic, body) VALUES "
                       "('e1', NULL, ?, ?, '{}')", (old, Topic.CLIPBOARD_RESULT))
            job = enqueue(tx, JobKind.CLIPBOARD_ACTION, Lane.CLIPBOARD,
                          payload={"text": "copied text"})
            tx.execute("UPDATE jobs SET state = 'failed' WHERE id = ?", (job,))
        store.call(seed)
        purge_expired(store, config)
        texts = [r["text"] for r in store.query("SELECT text FROM clipboard_results "
                                                "ORDER BY id")]
        assert texts == ["result 2", "result 3"]
        assert not store.query("SELECT 1 FROM events WHERE topic = ?",
                               (Topic.CLIPBOARD_RESULT,))
        payloads = [r["payload"] for r in store.query("SELECT payload FROM jobs")]
        assert payloads == ["{}"]
    finally:
        store.close()
