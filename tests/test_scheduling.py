"""Scheduling and residency through a real daemon: priority lanes, the bounded request queue,
cancel, idle unload and reload, model requests, and a job that crashes the host twice."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from importlib.metadata import version
from pathlib import Path

import pytest

from famulus.daemon.model.host import DEVICE_FAULTS_ENV
from famulus.ipc.client import BusError
from famulus.ipc.protocol import Event, Topic
from tests.conftest import DaemonHome, wait_for

CORPUS = Path(__file__).parent / "corpus"
BACKLOG = 20


def paragraph(i: int) -> str:
    return (f"Report {i}. The team in office {i} counted {i * 7} parcels on Monday and "
            f"{i * 5} on Tuesday. The manager asked for a second van. Deliveries resumed "
            "after the storm, and the depot stayed open late on both days.")


def test_interactive_summarize_overtakes_the_backlog(daemon_home: DaemonHome) -> None:
    """An interactive request during a 20-document backlog finishes before the backlog,
    and before the long document in progress, which yields between its chunks."""
    daemon_home.write_config(max_new_tokens=24, extra="max_prompt_tokens = 256\n")
    daemon_home.start()
    log = daemon_home.log
    assert log is not None
    long_doc = daemon_home.inbox / "000-long.txt"
    long_doc.write_text("\n\n".join(paragraph(i) for i in range(12)), encoding="utf-8")
    long_started = log.wait(lambda e: e.topic == Topic.JOB_PROGRESS and e.body["step"] >= 1,
                            120, "the long document's second chunk")
    long_job = long_started.body["job"]

    for i in range(1, BACKLOG):
        (daemon_home.inbox / f"{i:03d}-short.txt").write_text(paragraph(i), encoding="utf-8")
    log.wait(lambda e: e.topic == Topic.DOCUMENT_DETECTED
             and e.body["path"].endswith(f"{BACKLOG - 1:03d}-short.txt"), 60,
             "the backlog to be detected")

    with daemon_home.client() as client:
        job = client.call("summarize", {"text": paragraph(99)})["job"]
    done = log.wait(lambda e: e.topic == Topic.JOB_DONE and e.body["job"] == job, 300,
                    "the interactive job")

    summarized = log.wait(lambda e: e.topic == Topic.DOCUMENT_SUMMARIZED
                          and e.body["job"] == long_job, 600, "the long document")
    assert done.seq < summarized.seq, "the interactive job waited for the whole long document"

    log.wait(lambda e: len(log.matching(Topic.DOCUMENT_SUMMARIZED)) >= BACKLOG, 900,
             "the backlog to finish")
    last = max(e.seq for e in log.matching(Topic.DOCUMENT_SUMMARIZED))
    assert done.seq < last
    # Only the long document's chunk boundaries let it in: it started after that job did.
    started = log.matching(Topic.JOB_STARTED, job=job)[0]
    assert long_started.seq < started.seq < summarized.seq


def test_full_request_queue_answers_busy(daemon_home: DaemonHome) -> None:
    # The load hangs on a (simulated) NPU, so requests stay queued.
    daemon_home.env[DEVICE_FAULTS_ENV] = "NPU=hang"
    daemon_home.write_config(extra='devices = ["NPU", "CPU"]\nload_timeout_s = 600.0\n'
                             "[jobs]\nmax_queued_requests = 2\n")
    daemon_home.start(wait_model=False)
    with daemon_home.client() as client:
        wait_for(lambda: client.call("status")["model"]["state"] == "loading", 60,
                 "the load to start")
        first = client.call("ask", {"prompt": "one"})["job"]
        client.call("summarize", {"text": "two"})
        with pytest.raises(BusError) as busy:
            client.call("ask", {"prompt": "three"})
        assert busy.value.code == "busy"
        assert "jobs.max_queued_requests=2" in busy.value.message
        # Room again once one of them is gone.
        client.call("cancel", {"id": first})
        client.call("ask", {"prompt": "three"})


def test_cancel_stops_a_long_generation_within_a_second(daemon_home: DaemonHome) -> None:
    daemon_home.start()
    log = daemon_home.log
    assert log is not None
    with daemon_home.client() as client:
        job = client.call("ask", {"prompt": "Count from 1 to 2000, one number per line.",
                                  "max_new_tokens": 2000, "stream": True})["job"]
        log.wait(lambda e: e.topic == Topic.JOB_TOKEN and e.body["job"] == job, 120,
                 "the first tokens")
        sent = time.monotonic()
        assert client.call("cancel", {"id": job})["state"] == "cancelling"
        ended = log.wait(lambda e: e.topic in (Topic.JOB_CANCELLED, Topic.JOB_DONE)
                         and e.body["job"] == job, 30, "the job to stop")
        elapsed = time.monotonic() - sent
    assert ended.topic == Topic.JOB_CANCELLED
    assert elapsed < 1.0, f"cancel took {elapsed:.2f} s"
    # The model host survived the cancel and serves the next request.
    status = daemon_home.status()
    assert status["model"]["state"] == "loaded"
    assert status["model"]["restarts"] == 0


def test_idle_unload_and_reload_are_reported(daemon_home: DaemonHome) -> None:
    daemon_home.write_config(extra="keep_alive_s = 1.0\n")
    daemon_home.start()
    log = daemon_home.log
    assert log is not None
    unloaded = log.wait(lambda e: e.topic == Topic.MODEL_UNLOADED, 30, "the idle unload")
    assert unloaded.body["reason"] == "idle"
    assert unloaded.body["device"] == "CPU"
    status = daemon_home.status()["model"]
    assert status["state"] == "unloaded"
    assert status["pid"] is None
    assert status["keep_alive_s"] == 1.0
    with daemon_home.client() as client:
        job = client.call("ask", {"prompt": "Say hello.", "max_new_tokens": 8})["job"]
    done = log.wait(lambda e: e.topic == Topic.JOB_DONE and e.body["job"] == job, 120,
                    "the job after the reload")
    reloaded = [e for e in log.matching(Topic.MODEL_LOADED) if e.seq > unloaded.seq]
    assert reloaded
    assert reloaded[0].seq < done.seq
    assert [e for e in log.matching(Topic.MODEL_LOADING) if e.seq > unloaded.seq]
    # Both loads used the model's compile cache in the user cache folder, one folder per
    # model and OpenVINO version.
    blobs = list(daemon_home.root.rglob("compiled/smollm2-135m-instruct/*/*.blob"))
    assert len(blobs) == 1, blobs
    assert blobs[0].parent.name == version("openvino")


def test_model_requests_unload_load_and_pin(daemon_home: DaemonHome) -> None:
    daemon_home.start()
    log = daemon_home.log
    assert log is not None
    with daemon_home.client() as client:
        client.call("model.unload")
        event = log.wait(lambda e: e.topic == Topic.MODEL_UNLOADED, 30, "the unload")
        assert event.body["reason"] == "request"
        assert client.call("status")["model"]["state"] == "unloaded"
        client.call("model.load")
        wait_for(lambda: client.call("status")["model"]["state"] == "loaded", 120,
                 "the model to load again")
        assert client.call("model.pin", {"pinned": True})["pinned"] is True
        assert client.call("status")["model"]["pinned"] is True
        client.call("model.pin", {"pinned": False})
        assert client.call("status")["model"]["pinned"] is False
    listed = subprocess.run(daemon_home.command("model", "list", "--json"), env=daemon_home.env,
                            capture_output=True, text=True, timeout=60, check=True)
    rows = json.loads(listed.stdout)
    assert [(r["name"], r["state"], r["device"], r["kind"]) for r in rows] == [
        ("smollm2-135m-instruct", "loaded", "CPU", "llm")]
    assert rows[0]["size_bytes"] == daemon_home.model_path.stat().st_size


def test_second_host_crash_fails_job(daemon_home: DaemonHome
                                                               ) -> None:
    daemon_home.write_config(max_new_tokens=400, extra="[jobs]\nrestart_backoff_s = 0.0\n")
    daemon_home.start()
    log = daemon_home.log
    assert log is not None
    with daemon_home.client() as client:
        job = client.call("ask", {"prompt": "Tell a long story about a lighthouse.",
                                  "max_new_tokens": 400, "stream": True})["job"]

    def kill_host_during(attempt: int) -> None:
        started = log.wait(lambda e: e.topic == Topic.JOB_STARTED and e.body["job"] == job
                           and e.body["attempt"] == attempt, 120, f"attempt {attempt}")

        def token(e: Event) -> bool:
            return e.topic == Topic.JOB_TOKEN and e.body["job"] == job and e.seq > started.seq
        log.wait(token, 120, f"tokens of attempt {attempt}")
        os.kill(daemon_home.status()["model"]["pid"], signal.SIGKILL)

    kill_host_during(1)
    kill_host_during(2)
    failed = log.wait(lambda e: e.topic in (Topic.JOB_FAILED, Topic.JOB_DONE)
                      and e.body["job"] == job, 120, "the job to end")
    assert failed.topic == Topic.JOB_FAILED
    assert "the model host crashed after 2 attempt(s)" in failed.body["error"]
    # The daemon and a fresh host serve the next request.
    with daemon_home.client() as client:
        nxt = client.call("ask", {"prompt": "Say hello.", "max_new_tokens": 8})["job"]
    log.wait(lambda e: e.topic == Topic.JOB_DONE and e.body["job"] == nxt, 120, "the next job")


def test_reload_applies_generation_keys_of_the_model_table(daemon_home: DaemonHome) -> None:
    # Regression: generation settings come from the model's spec, which reload must rebuild.
    daemon_home.start()
    log = daemon_home.log
    assert log is not None
    with daemon_home.config_file.open("a", encoding="utf-8") as f:
        f.write('\n[models.smollm2-135m-instruct]\nmax_new_tokens = 16\n')
    with daemon_home.client() as client:
        assert client.call("reload")["applied"] == ["models.smollm2-135m-instruct"]
        job = client.call("ask", {"prompt": "Tell a long story about a lighthouse."})["job"]
        done = log.wait(lambda e: e.topic == Topic.JOB_DONE and e.body["job"] == job, 120,
                        "the job")
        assert done.body["result"]["tokens"] <= 16
        with daemon_home.config_file.open("a", encoding="utf-8") as f:
            f.write('devices = ["CPU"]\n')
        result = client.call("reload")
        assert result["restart_required"] == ["models.smollm2-135m-instruct"]
