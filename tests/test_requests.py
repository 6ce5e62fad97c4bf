"""Bus requests against the real daemon: jobs, cancel, search, pause and resume."""

from __future__ import annotations

import pytest

from famulus.ipc.client import BusError
from famulus.ipc.protocol import Topic
from tests.conftest import DaemonHome

LONG_TEXT = " ".join(f"Sentence {i} tells a long story about the harbour." for i in range(40))


def test_cancel_running_then_queued(daemon_home: DaemonHome) -> None:
    daemon_home.write_config(max_new_tokens=2000)
    daemon_home.start()
    with daemon_home.client() as client:
        running = client.call("summarize", {"text": LONG_TEXT})["job"]
        queued = client.call("summarize", {"text": "The ferry leaves at nine."})["job"]
        daemon_home.log.wait(lambda e: e.topic == Topic.JOB_PROGRESS
                             and e.body["job"] == running, 60, "generation to start")
        assert client.call("cancel", {"id": queued}) == {"job": queued, "state": "cancelled"}
        assert client.call("cancel", {"id": running}) == {"job": running, "state": "cancelling"}
        daemon_home.log.wait(lambda e: e.topic == Topic.JOB_CANCELLED
                             and e.body["job"] == running, 60, "the running job to stop")
        assert client.call("job", {"id": running})["state"] == "cancelled"
        assert client.call("job", {"id": queued})["state"] == "cancelled"
        started = daemon_home.log.matching(Topic.JOB_STARTED, job=queued)
        assert started == []
        with pytest.raises(BusError, match="only queued and running jobs"):
            client.call("cancel", {"id": running})
        with pytest.raises(BusError, match="no job with id 999"):
            client.call("cancel", {"id": 999})
        # The model host still serves the next job.
        after = client.call("summarize", {"text": "The bridge opens in June."})["job"]
        daemon_home.log.wait(lambda e: e.topic == Topic.JOB_DONE and e.body["job"] == after,
                             120, "the next job")


def test_jobs_listing_filters(daemon_home: DaemonHome) -> None:
    daemon_home.start()
    with daemon_home.client() as client:
        first = client.call("summarize", {"text": "The depot roof has solar panels."})["job"]
        daemon_home.log.wait(lambda e: e.topic == Topic.JOB_DONE and e.body["job"] == first,
                             120, "the first job")
        second = client.call("summarize", {"text": "The museum opens late."})["job"]
        daemon_home.log.wait(lambda e: e.topic == Topic.JOB_DONE and e.body["job"] == second,
                             120, "the second job")
        listing = client.call("jobs", {"limit": 1})
        assert [j["id"] for j in listing["jobs"]] == [second]
        assert listing["more"] is True
        page = client.call("jobs", {"limit": 1, "before": second})
        assert [j["id"] for j in page["jobs"]] == [first]
        done = client.call("jobs", {"state": ["done"], "lane": "interactive"})
        assert {j["id"] for j in done["jobs"]} == {first, second}
        assert client.call("jobs", {"state": "failed"})["jobs"] == []
        with pytest.raises(BusError, match="`state` must be one or more of"):
            client.call("jobs", {"state": "finished"})
        with pytest.raises(BusError, match="`lane` must be one of"):
            client.call("jobs", {"lane": "fast"})


def test_search_finds_summary(daemon_home: DaemonHome) -> None:
    daemon_home.start()
    target = daemon_home.inbox / "crane.txt"
    target.write_text("The harbour crane lifts thirty tonnes of steel every morning.\n")
    event = daemon_home.log.wait(lambda e: e.topic == Topic.DOCUMENT_SUMMARIZED, 120,
                                 "the summary")
    word = max(event.body["summary"].split(), key=len).strip(".,;:!?\"'()")
    with daemon_home.client() as client:
        results = client.call("search", {"query": word.upper()})["results"]
        assert [r["path"] for r in results] == [str(target)]
        assert "[" in results[0]["snippet"]
        # FTS5 syntax in the query is taken as plain words, never as an error.
        assert client.call("search", {"query": 'NEAR( " OR *'})["results"] == []
        with pytest.raises(BusError, match="`query` must be non-empty text"):
            client.call("search", {"query": "  "})


def test_pause_defers_until_resume(daemon_home: DaemonHome) -> None:
    daemon_home.start()
    with daemon_home.client() as client:
        assert client.call("pause")["paused"] is True
        assert client.call("status")["paused"] is True
        paused = daemon_home.log.wait(lambda e: e.topic == Topic.WATCH_PAUSED, 10,
                                      "watch.paused")
        target = daemon_home.inbox / "while-paused.txt"
        target.write_text("The library opens at nine on Saturdays.\n")
        assert client.call("resume")["paused"] is False
        resumed = daemon_home.log.wait(lambda e: e.topic == Topic.WATCH_RESUMED, 10,
                                       "watch.resumed")
    detected = daemon_home.log.wait(lambda e: e.topic == Topic.DOCUMENT_DETECTED
                                    and e.body["path"] == str(target), 60, "detection")
    # Nothing was picked up while paused: the file was found by the scan after resume.
    assert paused.seq < resumed.seq < detected.seq
    daemon_home.log.wait(lambda e: e.topic == Topic.DOCUMENT_SUMMARIZED
                         and e.body["path"] == str(target), 120, "the summary")


def test_ask_streams_tokens(daemon_home: DaemonHome) -> None:
    daemon_home.start()
    with daemon_home.client() as client:
        job = client.call("ask", {"prompt": "Name three rivers in Europe.", "stream": True,
                                  "max_new_tokens": 60})["job"]
        done = daemon_home.log.wait(lambda e: e.topic == Topic.JOB_DONE and e.body["job"] == job,
                                    120, "the answer")
        with pytest.raises(BusError, match="`prompt` must be non-empty text"):
            client.call("ask", {"prompt": ""})
        with pytest.raises(BusError, match="`stream` must be true or false"):
            client.call("ask", {"prompt": "hi", "stream": "yes"})
    tokens = daemon_home.log.matching(Topic.JOB_TOKEN, job=job)
    assert tokens
    assert [t.body["index"] for t in tokens] == list(range(len(tokens)))
    assert all(t.seq < done.seq for t in tokens)
    assert "".join(t.body["text"] for t in tokens).strip() == done.body["result"]["text"]


def test_summarize_without_stream_sends_no_tokens(daemon_home: DaemonHome) -> None:
    daemon_home.start()
    with daemon_home.client() as client:
        quiet = client.call("summarize", {"text": "The ferry leaves at nine."})["job"]
        loud = client.call("summarize", {"text": "The ferry leaves at ten.", "stream": True})["job"]
    for job in (quiet, loud):
        daemon_home.log.wait(lambda e, j=job: e.topic == Topic.JOB_DONE and e.body["job"] == j,
                             120, f"job {job}")
    assert daemon_home.log.matching(Topic.JOB_TOKEN, job=quiet) == []
    assert daemon_home.log.matching(Topic.JOB_TOKEN, job=loud)


def test_reload_applies_live_keys(daemon_home: DaemonHome) -> None:
    daemon_home.start(wait_model=False)
    second = daemon_home.root / "second-inbox"
    daemon_home.config_file.write_text(daemon_home.config_file.read_text().replace(
        f"folders = [{str(daemon_home.inbox)!r}]",
        f"folders = [{str(daemon_home.inbox)!r}, {str(second)!r}]").replace(
        "max_new_tokens = 48", 'max_new_tokens = 60\ndevices = ["CPU"]'))
    with daemon_home.client() as client:
        result = client.call("reload")
        assert result["applied"] == ["watch.folders", "model.max_new_tokens"]
        assert result["restart_required"] == ["model.devices"]
        assert str(second) in client.call("status")["watch_folders"]
        daemon_home.config_file.write_text("[watch]\nquiet_period = 1\n")
        with pytest.raises(BusError, match="unknown key watch.quiet_period"):
            client.call("reload")
        assert str(second) in client.call("status")["watch_folders"]
    (second / "note.txt").write_text("The tram runs every ten minutes.\n")
    daemon_home.log.wait(lambda e: e.topic == Topic.DOCUMENT_DETECTED
                         and e.body["path"] == str(second / "note.txt"), 60,
                         "detection in the new folder")
    daemon_home.log.wait(lambda e: e.topic == Topic.CONFIG_RELOADED, 10, "config.reloaded")
