"""End to end: the real daemon, the real default model, real sockets, files and signals."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import zmq

from famulus.ipc.client import BusError
from famulus.ipc.protocol import Event, Topic
from tests.conftest import (
    CORPUS,
    DaemonHome,
    pid_alive,
    processes_with_home,
    wait_for,
    wait_for_none,
)

SUMMARY_TIMEOUT_S = 180


def summarized(path: Path) -> Callable[[Event], bool]:
    return lambda e: e.topic == Topic.DOCUMENT_SUMMARIZED and e.body["path"] == str(path)


def test_pdf_summary_arrives_on_sub_socket(daemon_home: DaemonHome) -> None:
    daemon_home.start()
    # A SUB socket of our own, exactly as a third-party program would open one.
    ctx = zmq.Context.instance()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, Topic.DOCUMENT_SUMMARIZED.encode())
    sub.connect(f"ipc://{daemon_home.runtime / 'events.sock'}")
    # The subscription must reach the daemon before the event is published.
    daemon_home.log.wait(lambda e: e.topic == Topic.MODEL_LOADED, 60, "model.loaded")
    # ZeroMQ has no signal for a subscription having arrived: give it a moment.
    time.sleep(0.2)
    target = daemon_home.inbox / "paper.pdf"
    shutil.copy(CORPUS / "documents" / "llm-agents-intro.pdf", target)
    try:
        assert sub.poll(SUMMARY_TIMEOUT_S * 1000), "no document.summarized on the SUB socket"
        topic, payload = sub.recv_multipart()
    finally:
        sub.close()
    event = Event.from_envelope(json.loads(payload))
    assert topic == b"document.summarized"
    assert event.body["path"] == str(target)
    assert event.body["summary"].strip()
    assert event.body["device"] == "CPU"
    rows = daemon_home.rows("SELECT d.state, s.text, s.device FROM documents d "
                            "JOIN summaries s ON s.document_id = d.id WHERE d.path = ?",
                            (str(target),))
    assert len(rows) == 1
    assert rows[0]["state"] == "summarized"
    assert rows[0]["text"] == event.body["summary"]
    # OpenVINO's usage telemetry stays off: it would create ~/intel on its first run.
    assert not (daemon_home.root / "intel").exists()


def test_bad_corpus_outcomes(daemon_home: DaemonHome) -> None:
    daemon_home.start()
    expected = {
        "encrypted-needs-password.pdf": ("failed", "encrypted"),
        "scanned-no-text-layer.pdf": ("failed", "no_text_layer"),
        "truncated.pdf": ("failed", "corrupt"),
        "random-bytes.txt": ("failed", "binary"),
        "empty.txt": ("skipped", "empty"),
        "pdf-named-as.docx": ("summarized", None),
        "utf16le-bom.txt": ("summarized", None),
    }
    for name in expected:
        shutil.copy(CORPUS / "bad" / name, daemon_home.inbox / name)
    outcome_topics = {Topic.DOCUMENT_SUMMARIZED, Topic.DOCUMENT_FAILED, Topic.DOCUMENT_SKIPPED}
    for name in expected:
        path = str(daemon_home.inbox / name)
        daemon_home.log.wait(lambda e, p=path: e.topic in outcome_topics
                             and e.body.get("path") == p, SUMMARY_TIMEOUT_S, f"outcome of {name}")
    rows = {Path(r["path"]).name: r for r in daemon_home.rows("SELECT * FROM documents")}
    for name, (state, code) in expected.items():
        assert rows[name]["state"] == state, (name, dict(rows[name]))
        assert rows[name]["reason_code"] == code, (name, dict(rows[name]))
        if state == "failed":
            assert rows[name]["reason"], name
    summaries = daemon_home.rows("SELECT d.path FROM summaries s JOIN documents d "
                                 "ON d.id = s.document_id")
    assert sorted(Path(r["path"]).name for r in summaries) == [
        "pdf-named-as.docx", "utf16le-bom.txt"]
    # Permanent failures are recorded once: one job each, no retry loop.
    for name in ("encrypted-needs-password.pdf", "truncated.pdf", "random-bytes.txt"):
        jobs = daemon_home.rows("SELECT j.state, j.attempts FROM jobs j JOIN documents d "
                                "ON d.id = j.document_id WHERE d.path = ?",
                                (str(daemon_home.inbox / name),))
        assert [(j["state"], j["attempts"]) for j in jobs] == [("failed", 1)], name
    assert daemon_home.status()["state"] == "running"


def test_empty_file_summarized_after_growing(daemon_home: DaemonHome) -> None:
    daemon_home.start()
    target = daemon_home.inbox / "notes.txt"
    target.write_bytes(b"")
    daemon_home.log.wait(lambda e: e.topic == Topic.DOCUMENT_SKIPPED, 60, "document.skipped")
    target.write_text("The river mill closed in 1998 and reopened as a library in 2024.\n")
    daemon_home.log.wait(summarized(target), SUMMARY_TIMEOUT_S, "summary after growing")


def test_chunked_write_yields_one_summary(daemon_home: DaemonHome) -> None:
    daemon_home.start()
    target = daemon_home.inbox / "slow.txt"
    text = (CORPUS / "documents" / "crazy-ones.txt").read_bytes()
    started = time.monotonic()
    with target.open("wb") as f:
        for i in range(0, len(text), len(text) // 6 + 1):
            f.write(text[i:i + len(text) // 6 + 1])
            f.flush()
            os.fsync(f.fileno())
            # Writes spaced wider than a check interval but within the quiet period.
            time.sleep(0.3)
    write_ended = time.monotonic()
    daemon_home.log.wait(summarized(target), SUMMARY_TIMEOUT_S, "summary of slow.txt")
    detected = daemon_home.log.matching(Topic.DOCUMENT_DETECTED, path=str(target))
    assert len(detected) == 1
    assert detected[0].ts >= time.time() - (time.monotonic() - write_ended) - 0.05
    assert write_ended - started > 1.5
    assert len(daemon_home.log.matching(Topic.DOCUMENT_SUMMARIZED, path=str(target))) == 1
    rows = daemon_home.rows("SELECT sha256 FROM documents WHERE path = ?", (str(target),))
    assert len(rows) == 1


def test_crdownload_renamed_yields_one_summary(daemon_home: DaemonHome) -> None:
    daemon_home.start()
    partial = daemon_home.inbox / "report.pdf.crdownload"
    final = daemon_home.inbox / "report.pdf"
    data = (CORPUS / "documents" / "llm-agents-intro.pdf").read_bytes()
    with partial.open("wb") as f:
        f.write(data[: len(data) // 2])
        f.flush()
        time.sleep(1.0)  # longer than the quiet period: a stalled download
        f.write(data[len(data) // 2:])
    partial.rename(final)
    daemon_home.log.wait(summarized(final), SUMMARY_TIMEOUT_S, "summary of report.pdf")
    paths = [r["path"] for r in daemon_home.rows("SELECT path FROM documents")]
    assert paths == [str(final)]
    assert len(daemon_home.log.matching(Topic.DOCUMENT_SUMMARIZED, path=str(final))) == 1


def test_atomic_save_resummarizes_once(daemon_home: DaemonHome) -> None:
    daemon_home.start()
    target = daemon_home.inbox / "draft.md"
    target.write_text("# Plan\n\nThe team ships the first release in March.\n")
    first = daemon_home.log.wait(summarized(target), SUMMARY_TIMEOUT_S, "first summary")
    # An editor's atomic save: write a temp file, then rename it over the original.
    temp = daemon_home.inbox / ".draft.md.swp"
    temp.write_text("# Plan\n\nThe team ships the first release in May, two months late.\n")
    os.replace(temp, target)
    second = daemon_home.log.wait(lambda e: summarized(target)(e) and e.seq > first.seq,
                                  SUMMARY_TIMEOUT_S, "summary after the save")
    assert second.body["sha256"] != first.body["sha256"]
    docs = daemon_home.rows("SELECT id, state FROM documents")
    assert len(docs) == 1
    summaries = daemon_home.rows("SELECT document_id, sha256 FROM summaries")
    assert [(s["document_id"], s["sha256"]) for s in summaries] == [
        (docs[0]["id"], second.body["sha256"])]
    assert len(daemon_home.log.matching(Topic.DOCUMENT_SUMMARIZED, path=str(target))) == 2


def test_same_content_summarized_once(daemon_home: DaemonHome) -> None:
    daemon_home.start()
    first, copy = daemon_home.inbox / "a.txt", daemon_home.inbox / "sub" / "b.txt"
    first.write_text("Solar panels on the depot roof produce 40 kW at noon.\n")
    daemon_home.log.wait(summarized(first), SUMMARY_TIMEOUT_S, "summary of a.txt")
    copy.parent.mkdir()
    shutil.copy(first, copy)
    event = daemon_home.log.wait(summarized(copy), 60, "summary of the copy")
    assert event.body["reused_from"] is not None
    texts = [r["text"] for r in daemon_home.rows("SELECT text FROM summaries")]
    assert len(texts) == 2
    assert texts[0] == texts[1]
    generated = daemon_home.rows("SELECT generated_tokens FROM summaries ORDER BY id")
    assert generated[1]["generated_tokens"] is None


def test_second_instance_names_running_pid(daemon_home: DaemonHome) -> None:
    proc = daemon_home.start(wait_model=False)
    sockets_before = sorted(p.name for p in daemon_home.runtime.iterdir())
    second = subprocess.run(daemon_home.command("run"), env=daemon_home.env,
                            capture_output=True, text=True, timeout=60)
    assert second.returncode != 0
    assert f"PID {proc.pid}" in second.stderr
    assert sorted(p.name for p in daemon_home.runtime.iterdir()) == sockets_before
    assert daemon_home.status()["pid"] == proc.pid


def test_sigterm_stops_quickly_and_cleans_up(daemon_home: DaemonHome) -> None:
    daemon_home.start()
    elapsed = daemon_home.stop(signal.SIGTERM)
    assert elapsed < 5.0
    assert daemon_home.proc is not None and daemon_home.proc.returncode == 0
    assert not (daemon_home.runtime / "events.sock").exists()
    assert not (daemon_home.runtime / "requests.sock").exists()
    assert not (daemon_home.runtime / "famulus.lock").exists()


def test_sigterm_during_summary_requeues_job(daemon_home: DaemonHome) -> None:
    daemon_home.write_config(max_new_tokens=400)
    daemon_home.start()
    target = daemon_home.inbox / "long.txt"
    shutil.copy(CORPUS / "documents" / "lorem-ipsum.txt", target)
    daemon_home.log.wait(lambda e: e.topic == Topic.JOB_STARTED, 60, "job.started")
    elapsed = daemon_home.stop(signal.SIGINT)
    assert elapsed < 5.0
    states = [r["state"] for r in daemon_home.rows("SELECT state FROM jobs")]
    assert states == ["queued"]


def test_kill9_during_summary_completes_once(daemon_home: DaemonHome) -> None:
    daemon_home.write_config(max_new_tokens=400)
    daemon_home.start()
    host_pid = daemon_home.status()["model"]["pid"]
    target = daemon_home.inbox / "report.pdf"
    shutil.copy(CORPUS / "documents" / "llm-agents-intro.pdf", target)
    daemon_home.log.wait(lambda e: e.topic == Topic.JOB_STARTED, 60, "job.started")
    daemon_home.log.wait(lambda e: e.topic == Topic.JOB_PROGRESS, 60, "generation to begin")
    daemon_home.stop(signal.SIGKILL)
    # The model host notices that its parent is gone and exits; no orphan keeps the model.
    wait_for(lambda: not pid_alive(host_pid), 10, "the orphaned model host to exit")
    assert [r["state"] for r in daemon_home.rows("SELECT state FROM jobs")] == ["running"]

    daemon_home.start()
    daemon_home.log.wait(summarized(target), SUMMARY_TIMEOUT_S, "summary after restart")
    jobs = daemon_home.rows("SELECT state, attempts FROM jobs")
    assert [j["state"] for j in jobs] == ["done"]
    assert len(daemon_home.rows("SELECT id FROM documents")) == 1
    assert len(daemon_home.rows("SELECT id FROM summaries")) == 1
    assert daemon_home.rows("PRAGMA integrity_check")[0][0] == "ok"


def test_startup_scan_catches_up(daemon_home: DaemonHome) -> None:
    daemon_home.start()
    kept, removed = daemon_home.inbox / "kept.txt", daemon_home.inbox / "gone.txt"
    kept.write_text("The harbour crane lifts 30 tonnes.\n")
    removed.write_text("The ferry leaves at nine.\n")
    for path in (kept, removed):
        daemon_home.log.wait(summarized(path), SUMMARY_TIMEOUT_S, f"summary of {path.name}")
    daemon_home.stop()

    removed.unlink()
    added = daemon_home.inbox / "added.txt"
    added.write_text("The bridge opens to cyclists in June.\n")
    daemon_home.start()
    daemon_home.log.wait(summarized(added), SUMMARY_TIMEOUT_S, "summary of added.txt")
    daemon_home.log.wait(lambda e: e.topic == Topic.DOCUMENT_REMOVED
                         and e.body["path"] == str(removed), 30, "document.removed")
    # kept.txt was unchanged: no new job for it.
    jobs = daemon_home.rows("SELECT d.path FROM jobs j JOIN documents d ON d.id = j.document_id")
    assert sorted(Path(j["path"]).name for j in jobs) == ["added.txt", "gone.txt", "kept.txt"]


def test_cli_summarize_goes_through_daemon(daemon_home: DaemonHome) -> None:
    outside = daemon_home.root / "elsewhere.txt"
    outside.write_text("The museum extends its opening hours to 8 pm on Fridays.\n")
    no_daemon = subprocess.run(daemon_home.command("summarize", str(outside)),
                               env=daemon_home.env, capture_output=True, text=True, timeout=60)
    assert no_daemon.returncode == 3
    assert "not running" in no_daemon.stderr
    daemon_home.start()
    done = subprocess.run(daemon_home.command("summarize", str(outside)), env=daemon_home.env,
                          capture_output=True, text=True, timeout=SUMMARY_TIMEOUT_S)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()
    assert "queued as job" in done.stderr


def test_invalid_params_rejected_by_daemon(daemon_home: DaemonHome) -> None:
    daemon_home.start(wait_model=False)
    note = daemon_home.root / "note.txt"
    note.write_text("The ferry leaves at nine.\n")
    cases = [
        ("events", {"since": 0, "limit": 0}, "`limit` must be at least 1"),
        ("events", {"since": "x"}, "`since` must be a whole number"),
        ("events", {"topics": "job.done"}, "`topics` must be a list"),
        ("summarize", {"path": str(note), "force": "false"}, "`force` must be"),
        ("summarize", {"path": str(daemon_home.inbox)}, "must name a regular file"),
        ("summarize", {"path": "relative.txt"}, "must be an absolute path"),
        ("summarize", {"text": "  "}, "non-empty text"),
        ("summarize", {}, "exactly one of"),
        ("job", {"id": 999}, "no job with id 999"),
    ]
    with daemon_home.client() as client:
        for method, params, message in cases:
            with pytest.raises(BusError, match=message):
                client.call(method, params)
        assert client.call("status")["state"] == "running"


def test_quick_stop_leaves_no_process(daemon_home: DaemonHome) -> None:
    # Stopping while the model host is still importing OpenVINO once left a stray child.
    daemon_home.start(wait_model=False)
    daemon_home.stop()
    assert wait_for_none(lambda: processes_with_home(daemon_home.root), 10) == []


def test_config_check_reports_missing_model(daemon_home: DaemonHome) -> None:
    daemon_home.model_path = daemon_home.root / "missing.gguf"
    daemon_home.write_config()
    proc = subprocess.run(daemon_home.command("config", "check"), env=daemon_home.env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "config OK" in proc.stdout
    assert "missing.gguf does not exist" in proc.stderr


def test_running_state_means_watching(daemon_home: DaemonHome) -> None:
    # `running` once meant only that the sockets were up; a file dropped at once then failed
    # because the watched folder did not exist yet.
    daemon_home.start(wait_model=False)
    assert daemon_home.status()["state"] == "running"
    assert daemon_home.inbox.is_dir()
    target = daemon_home.inbox / "first.txt"
    target.write_text("The tram runs every ten minutes.\n")
    daemon_home.log.wait(lambda e: e.topic == Topic.DOCUMENT_DETECTED
                         and e.body["path"] == str(target), 60, "detection")
