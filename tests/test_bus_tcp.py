"""The optional TCP endpoints of the real daemon, with and without CURVE."""

from __future__ import annotations

import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from famulus.ipc import security
from famulus.ipc.client import Client, DaemonUnavailable, Subscriber
from tests.conftest import DaemonHome


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def tcp_config(events: str, requests: str, curve: bool) -> str:
    return (f'\n[bus]\ntcp_events = "{events}"\ntcp_requests = "{requests}"\n'
            f"curve = {'true' if curve else 'false'}\n")


def famulus(home: DaemonHome, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(home.command(*args), env=home.env, capture_output=True, text=True,
                          timeout=60)


def test_curve_accepts_known_key_only(daemon_home: DaemonHome, tmp_path: Path) -> None:
    events, requests = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    daemon_home.write_config(extra=tcp_config(events, requests, curve=True))
    for args in (("keys", "server"), ("keys", "client", "--name", "laptop")):
        assert famulus(daemon_home, *args).returncode == 0
    keys = daemon_home.root / "config" / "famulus" / "keys"
    authorized = famulus(daemon_home, "keys", "authorize", str(keys / "client.key"),
                         "--name", "laptop")
    assert authorized.returncode == 0, authorized.stderr
    assert famulus(daemon_home, "keys", "list").stdout.split() == ["laptop"]
    # A stranger with a valid key pair and the server's public key, but not authorized.
    stranger = tmp_path / "stranger-keys"
    security.create_client_keys(stranger, "stranger")
    shutil.copy(keys / "server.key", stranger / "server.key")

    daemon_home.start(wait_model=False)
    with Client(requests, curve_keys=keys, timeout_s=10) as client:
        assert client.call("status")["state"] == "running"
    with Client(requests, curve_keys=stranger, timeout_s=2) as client, \
            pytest.raises(DaemonUnavailable):
        client.call("status")
    with Client(requests, timeout_s=2) as client, pytest.raises(DaemonUnavailable):
        client.call("status")
    # Events reach an authorized subscriber over TCP too.
    with Subscriber(["daemon.started"], endpoint=events, requests_endpoint=requests,
                    curve_keys=keys) as sub:
        first = next(sub.follow(since=0, idle_timeout_s=10))
    assert first.body["pid"] == daemon_home.proc.pid
    # The ipc:// sockets stay usable without keys.
    assert daemon_home.status()["state"] == "running"


def test_public_bind_without_curve_refused(daemon_home: DaemonHome) -> None:
    events, requests = f"tcp://0.0.0.0:{free_port()}", f"tcp://0.0.0.0:{free_port()}"
    daemon_home.write_config(extra=tcp_config(events, requests, curve=False))
    proc = subprocess.run(daemon_home.command("run"), env=daemon_home.env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "tcp://0.0.0.0" in proc.stderr
    assert "famulus keys server" in proc.stderr


def test_loopback_without_curve_serves(daemon_home: DaemonHome) -> None:
    events, requests = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    daemon_home.write_config(extra=tcp_config(events, requests, curve=False))
    daemon_home.start(wait_model=False)
    with Client(requests, timeout_s=10) as client:
        assert client.call("status")["state"] == "running"


def test_half_tcp_config_rejected(daemon_home: DaemonHome) -> None:
    daemon_home.write_config(extra='\n[bus]\ntcp_requests = "tcp://127.0.0.1:5555"\n')
    proc = subprocess.run(daemon_home.command("run"), env=daemon_home.env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "must be set together" in proc.stderr
