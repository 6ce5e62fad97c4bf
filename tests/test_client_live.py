"""The client library against a real daemon that stops, resumes and restarts."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading

import pytest

from famulus.ipc.client import (
    AsyncClient,
    AsyncSubscriber,
    BusError,
    Client,
    DaemonUnavailable,
    Subscriber,
)
from famulus.ipc.protocol import Event, Topic
from tests.conftest import DaemonHome, stop_process, wait_for


def test_stopped_daemon_times_out_then_recovers(daemon_home: DaemonHome) -> None:
    proc = daemon_home.start(wait_model=False)
    client = Client(f"ipc://{daemon_home.runtime / 'requests.sock'}", timeout_s=0.5)
    stop_process(proc.pid)
    try:
        with pytest.raises(DaemonUnavailable):
            client.call("job", {"id": 1})
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    # The late reply to `job` must not be taken as the reply to `status`.
    status = client.call("status", timeout_s=10)
    assert status["pid"] == proc.pid
    assert "state" in status
    client.close()


def test_shutdown_with_stopped_client(daemon_home: DaemonHome) -> None:
    daemon_home.start(wait_model=False)
    # A client process that sends a request and is frozen before it reads the reply.
    script = ("import sys, zmq\n"
              "s = zmq.Context().socket(zmq.DEALER)\n"
              f"s.connect('ipc://{daemon_home.runtime / 'requests.sock'}')\n"
              "s.send_multipart([b'', b'{\"v\":1,\"id\":\"x\",\"method\":\"status\"}'])\n"
              "print('sent', flush=True)\n"
              "sys.stdin.read()\n")
    client = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert client.stdout is not None
        assert client.stdout.readline().strip() == "sent"
        os.kill(client.pid, signal.SIGSTOP)
        elapsed = daemon_home.stop(signal.SIGTERM)
        assert elapsed < 5.0
    finally:
        os.kill(client.pid, signal.SIGCONT)
        client.kill()
        client.wait(10)


def test_follow_across_restart_is_complete(daemon_home: DaemonHome) -> None:
    daemon_home.start(wait_model=False)
    seen: list[Event] = []
    stop = threading.Event()

    def follow() -> None:
        with Subscriber(endpoint=f"ipc://{daemon_home.runtime / 'events.sock'}",
                        requests_endpoint=f"ipc://{daemon_home.runtime / 'requests.sock'}"
                        ) as sub:
            client = Client(sub.requests_endpoint, timeout_s=30)
            for event in sub.follow(since=0, client=client, idle_timeout_s=30):
                seen.append(event)
                if stop.is_set() and event.topic == Topic.WATCH_RESUMED:
                    return

    thread = threading.Thread(target=follow, daemon=True)
    thread.start()
    with daemon_home.client() as client:
        client.call("pause")
        client.call("resume")
    wait_for(lambda: any(e.topic == Topic.WATCH_RESUMED for e in seen), 30, "first resume")
    daemon_home.stop()
    daemon_home.start(wait_model=False)
    stop.set()
    with daemon_home.client() as client:
        client.call("pause")
        client.call("resume")
    thread.join(60)
    assert not thread.is_alive()
    seqs = [e.seq for e in seen]
    assert seqs == list(range(1, len(seqs) + 1))
    topics = [e.topic for e in seen]
    assert topics.count(Topic.DAEMON_STARTED) == 2
    assert topics.count(Topic.DAEMON_STOPPING) == 1


def test_old_events_purged_at_start(daemon_home: DaemonHome) -> None:
    daemon_home.start(wait_model=False)
    daemon_home.stop()
    conn = daemon_home.db()
    with conn:
        conn.execute("UPDATE events SET ts = 0 WHERE seq = 1")
    old_last = conn.execute("SELECT MAX(seq) FROM events").fetchone()[0]
    conn.close()
    daemon_home.start(wait_model=False)
    status = daemon_home.status()
    assert status["first_seq"] == 2
    assert status["last_seq"] > old_last
    seqs = [r["seq"] for r in daemon_home.rows("SELECT seq FROM events")]
    assert 1 not in seqs


def test_async_client_and_follow(daemon_home: DaemonHome) -> None:
    proc = daemon_home.start(wait_model=False)
    requests = f"ipc://{daemon_home.runtime / 'requests.sock'}"
    events = f"ipc://{daemon_home.runtime / 'events.sock'}"

    async def scenario() -> list[str]:
        async with AsyncClient(requests, timeout_s=0.5) as client:
            stop_process(proc.pid)
            try:
                with pytest.raises(DaemonUnavailable):
                    await client.call("job", {"id": 1})
            finally:
                os.kill(proc.pid, signal.SIGCONT)
            status = await client.call("status", timeout_s=10)
            assert status["pid"] == proc.pid
            with pytest.raises(BusError, match="no job with id 999"):
                await client.call("job", {"id": 999}, timeout_s=10)
        topics = []
        async with AsyncSubscriber([Topic.WATCH_PAUSED, Topic.WATCH_RESUMED], endpoint=events,
                                   requests_endpoint=requests) as sub, \
                AsyncClient(requests, timeout_s=10) as client:
            await client.call("pause")
            await client.call("resume")
            async for event in sub.follow(since=0, idle_timeout_s=10, client=client):
                topics.append(event.topic)
                if event.topic == Topic.WATCH_RESUMED:
                    break
        return topics

    assert asyncio.run(scenario()) == [Topic.WATCH_PAUSED, Topic.WATCH_RESUMED]
