"""docs/examples/plain_pyzmq_client.py against a live daemon: the protocol doc is enough."""

from __future__ import annotations

import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import zmq

from famulus.ipc.client import Client
from famulus.ipc.protocol import Topic
from tests.conftest import DaemonHome

EXAMPLE = Path(__file__).resolve().parent.parent / "docs" / "examples" / "plain_pyzmq_client.py"
RUN_TIMEOUT_S = 60
SUMMARY_TIMEOUT_S = 120


def run_example(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(EXAMPLE), *args], env=env, capture_output=True,
                          text=True, timeout=RUN_TIMEOUT_S)


def event_lines(stdout: str) -> list[tuple[int, str]]:
    """Parse the example's `seq topic` lines into pairs, skipping its other lines."""
    pairs = []
    for line in stdout.splitlines():
        seq, _, topic = line.partition(" ")
        if seq.isdigit():
            pairs.append((int(seq), topic))
    return pairs


def logged_events(client: Client, up_to: int) -> list[tuple[int, str]]:
    """Read (seq, topic) of every logged event with seq <= `up_to` through `events`."""
    pairs: list[tuple[int, str]] = []
    since = 0
    while since < up_to:
        page = client.call("events", {"since": since})
        pairs += [(e["seq"], e["topic"]) for e in page["events"] if e["seq"] <= up_to]
        since = page["last_seq"]
        if not page["more"]:
            break
    return pairs


def test_example_replays_the_log(daemon_home: DaemonHome) -> None:
    daemon_home.start(wait_model=False)
    result = run_example("--runtime-dir", str(daemon_home.runtime), "--since", "0",
                         "--follow-s", "0.5")
    assert result.returncode == 0, result.stderr
    status_lines = [line for line in result.stdout.splitlines() if line.startswith("status:")]
    assert len(status_lines) == 1, result.stdout
    assert "state=running" in status_lines[0]
    assert "(smollm2-135m-instruct)" in status_lines[0]

    printed = event_lines(result.stdout)
    assert printed, result.stdout
    with daemon_home.client() as client:
        logged = logged_events(client, printed[-1][0])
    # Every logged event up to the last one printed, once each and in order.
    assert printed == logged
    started = [seq for seq, topic in logged if topic == Topic.DAEMON_STARTED]
    assert len(started) == 1
    assert (started[0], Topic.DAEMON_STARTED) in printed


def test_example_replays_from_since(daemon_home: DaemonHome) -> None:
    daemon_home.start(wait_model=False)
    with daemon_home.client() as client:
        started = [e["seq"] for e in client.call("events", {"since": 0})["events"]
                   if e["topic"] == Topic.DAEMON_STARTED]
    assert len(started) == 1
    result = run_example("--runtime-dir", str(daemon_home.runtime),
                         "--since", str(started[0] - 1), "--follow-s", "0")
    assert result.returncode == 0, result.stderr
    printed = event_lines(result.stdout)
    assert printed[0] == (started[0], Topic.DAEMON_STARTED)


def test_example_finds_runtime_dir_from_env(daemon_home: DaemonHome) -> None:
    daemon_home.start(wait_model=False)
    # isolated_env sets XDG_RUNTIME_DIR, so the example must find the sockets without help.
    result = run_example("--follow-s", "0", env=daemon_home.env)
    assert result.returncode == 0, result.stderr
    topics = [topic for _seq, topic in event_lines(result.stdout)]
    assert Topic.DAEMON_STARTED in topics


def test_example_fails_without_daemon(tmp_path: Path) -> None:
    result = run_example("--runtime-dir", str(tmp_path), "--follow-s", "0")
    assert result.returncode == 1
    assert "does not exist; is the daemon running?" in result.stderr
    assert result.stdout == ""


def test_example_times_out_on_silent_socket(tmp_path: Path) -> None:
    # A bound ROUTER that never replies acts as a stuck daemon.
    ctx: zmq.Context[Any] = zmq.Context.instance()
    pub = ctx.socket(zmq.PUB)
    router = ctx.socket(zmq.ROUTER)
    for sock in (pub, router):
        sock.setsockopt(zmq.LINGER, 0)
    pub.bind(f"ipc://{tmp_path / 'events.sock'}")
    router.bind(f"ipc://{tmp_path / 'requests.sock'}")
    try:
        started = time.monotonic()
        result = run_example("--runtime-dir", str(tmp_path), "--timeout-s", "0.5")
        elapsed = time.monotonic() - started
    finally:
        pub.close()
        router.close()
    assert result.returncode == 1
    assert "no reply to `status` within 0.5 s" in result.stderr
    assert elapsed < RUN_TIMEOUT_S


class LineReader:
    """Collects a process's stdout lines on a thread, so that reads can have a timeout.

    select() on a text pipe misses lines that readline() already buffered, hence a thread.
    """

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        self._stdout = proc.stdout
        self._lines: queue.Queue[str | None] = queue.Queue()
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self._stdout:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def read_until(self, done: Callable[[list[str]], bool], timeout_s: float,
                   description: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not done(self.lines):
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for "
                                     f"{description}; output so far: {self.lines[-20:]}"
                                     ) from None
            if line is None:
                raise AssertionError(f"the example exited before {description}; output: "
                                     f"{self.lines[-20:]}")
            self.lines.append(line)


def printed_topics(lines: list[str]) -> set[str]:
    return {topic for _seq, topic in event_lines("\n".join(lines))}


@pytest.mark.model
def test_example_prints_live_summary(daemon_home: DaemonHome) -> None:
    daemon_home.start(wait_model=True)
    proc = subprocess.Popen([sys.executable, str(EXAMPLE), "--runtime-dir",
                             str(daemon_home.runtime), "--follow-s", str(SUMMARY_TIMEOUT_S)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    reader = LineReader(proc)
    try:
        # Drop the file only once the replay is done, so that its events arrive live.
        reader.read_until(lambda lines: any(line.startswith("replayed up to seq")
                                            for line in lines), RUN_TIMEOUT_S, "the replay")
        (daemon_home.inbox / "note.txt").write_text(
            "The depot's solar roof produced 42 kWh on Monday.\n", encoding="utf-8")
        expected = {Topic.DOCUMENT_SUMMARIZED, Topic.JOB_DONE}
        reader.read_until(lambda lines: expected <= printed_topics(lines), SUMMARY_TIMEOUT_S,
                          "document.summarized and job.done")
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    assert proc.returncode == 130
    printed = event_lines("\n".join(reader.lines))
    with daemon_home.client() as client:
        logged = logged_events(client, printed[-1][0])
    assert printed == logged
