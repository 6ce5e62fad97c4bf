"""systemd notifications: READY=1, WATCHDOG=1 and STOPPING=1 sent by a real daemon."""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from famulus.daemon.sdnotify import SystemdNotifier, parse_address, parse_watchdog_interval
from tests.conftest import DaemonHome


class NotifyListener:
    """A datagram socket in the role of systemd's NOTIFY_SOCKET; collects received messages."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.messages: list[str] = []

    def wait_for(self, field: str, count: int, timeout: float) -> list[str]:
        """Receive until `count` messages hold `field`; fail after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while sum(field in m.split("\n") for m in self.messages) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"timed out waiting for {count}x {field}; "
                                     f"got {self.messages}")
            self.sock.settimeout(remaining)
            try:
                self.messages.append(self.sock.recv(4096).decode("utf-8"))
            except TimeoutError:
                continue
        return self.messages

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[NotifyListener, str]]:
    # A path in the test's own temp folder can exceed the 108-byte limit of socket paths,
    # so an abstract address (Linux only) is used, as systemd itself may pass.
    name = f"famulus-test-{uuid.uuid4().hex}"
    server = NotifyListener("\0" + name)
    yield server, "@" + name
    server.close()


def test_daemon_sends_ready_and_watchdog(daemon_home: DaemonHome,
                                         listener: tuple[NotifyListener, str]) -> None:
    server, address = listener
    daemon_home.env["NOTIFY_SOCKET"] = address
    daemon_home.env["WATCHDOG_USEC"] = "400000"  # a ping every 0.2 s
    daemon_home.env.pop("WATCHDOG_PID", None)
    daemon_home.start(wait_model=False)
    messages = server.wait_for("READY=1", 1, 30)
    ready = next(m for m in messages if "READY=1" in m.split("\n"))
    assert any(line.startswith("STATUS=running") for line in ready.split("\n"))
    server.wait_for("WATCHDOG=1", 2, 10)
    daemon_home.stop()
    messages = server.wait_for("STOPPING=1", 1, 10)
    # READY comes before any watchdog ping, and STOPPING is the last message.
    fields = [m.split("\n")[0] for m in messages]
    assert fields[0] == "READY=1"
    assert fields[-1] == "STOPPING=1"


def test_daemon_without_watchdog_sends_no_pings(daemon_home: DaemonHome, tmp_path: Path,
                                                listener: tuple[NotifyListener, str]) -> None:
    server, address = listener
    daemon_home.env["NOTIFY_SOCKET"] = address
    daemon_home.env.pop("WATCHDOG_USEC", None)
    daemon_home.start(wait_model=False)
    server.wait_for("READY=1", 1, 30)
    daemon_home.stop()
    messages = server.wait_for("STOPPING=1", 1, 10)
    assert not [m for m in messages if "WATCHDOG=1" in m]
    assert "systemd watchdog" not in daemon_home.stderr()


def test_notifier_sends_to_path_socket(tmp_path: Path) -> None:
    path = Path("/tmp") / f"famulus-notify-{uuid.uuid4().hex[:12]}.sock"
    server = NotifyListener(str(path))
    try:
        notifier = SystemdNotifier({"NOTIFY_SOCKET": str(path)})
        assert notifier.enabled
        assert notifier.notify("STATUS=testing")
        assert server.wait_for("STATUS=testing", 1, 5)
    finally:
        server.close()
        path.unlink(missing_ok=True)


def test_notifier_off_without_socket() -> None:
    notifier = SystemdNotifier({})
    assert not notifier.enabled
    assert notifier.notify("READY=1") is False
    notifier.start_watchdog(lambda: True)
    assert notifier._thread is None


def test_notifier_reports_vanished_socket() -> None:
    notifier = SystemdNotifier({"NOTIFY_SOCKET": "/nonexistent/notify.sock"})
    assert notifier.notify("READY=1") is False


@pytest.mark.parametrize(("value", "expected"), [
    ("/run/systemd/notify", "/run/systemd/notify"),
    ("@abstract", "\0abstract"),
    ("@", None),
    ("vsock:2:1234", None),
])
def test_parse_address(value: str, expected: str | None) -> None:
    assert parse_address(value) == expected


def test_watchdog_interval_rules() -> None:
    assert parse_watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 30.0
    assert parse_watchdog_interval({}) is None
    assert parse_watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert parse_watchdog_interval({"WATCHDOG_USEC": "abc"}) is None
    other = str(os.getpid() + 1)
    assert parse_watchdog_interval({"WATCHDOG_USEC": "1000", "WATCHDOG_PID": other}) is None
    own = str(os.getpid())
    assert parse_watchdog_interval({"WATCHDOG_USEC": "1000", "WATCHDOG_PID": own}) == 0.001
