"""Daemon without a desktop session: core runs, desktop plugins wait and start later."""

from __future__ import annotations

import socket
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from famulus.daemon.desktop import find_desktop, session_bus_address
from tests.conftest import DaemonHome, wait_for

PROBE_MODULE = textwrap.dedent("""\
    import os
    from pathlib import Path
    from typing import ClassVar


    class DesktopProbePlugin:
        name: ClassVar[str] = "desktop_probe"
        needs_desktop: ClassVar[bool] = True

        def start(self, context):
            Path(os.environ["FAMULUS_PROBE_MARKER"]).write_text(
                os.environ.get("WAYLAND_DISPLAY", "") + "|" + os.environ.get("DISPLAY", ""))

        def stop(self, timeout):
            pass
    """)


def install_probe_plugin(site: Path) -> None:
    """Register a plugin with `needs_desktop = True` through a real entry point."""
    site.mkdir()
    (site / "desktop_probe_plugin.py").write_text(PROBE_MODULE, encoding="utf-8")
    info = site / "desktop_probe-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: desktop-probe\nVersion: 0.1\n",
                                   encoding="utf-8")
    (info / "entry_points.txt").write_text(
        "[famulus.plugins]\ndesktop_probe = desktop_probe_plugin:DesktopProbePlugin\n",
        encoding="utf-8")


def bind_socket(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    return sock


@pytest.fixture
def headless_home(daemon_home: DaemonHome, tmp_path: Path) -> Iterator[DaemonHome]:
    site = tmp_path / "site"
    install_probe_plugin(site)
    env = daemon_home.env
    for name in ("DISPLAY", "WAYLAND_DISPLAY", "DBUS_SESSION_BUS_ADDRESS", "INVOCATION_ID"):
        env.pop(name, None)
    env["PYTHONPATH"] = str(site)
    env["FAMULUS_PROBE_MARKER"] = str(tmp_path / "probe-started")
    daemon_home.write_config(extra="\n[daemon]\ndesktop_retry_s = 0.2\n")
    yield daemon_home


def test_desktop_plugin_waits_for_session(headless_home: DaemonHome, tmp_path: Path) -> None:
    home = headless_home
    marker = tmp_path / "probe-started"
    home.start(wait_model=False)
    assert home.status()["state"] == "running"
    wait_for(lambda: "plugin=desktop_probe" in home.stderr(), 10, "the waiting log line")
    assert "plugin started: plugin=folder_watch" in home.stderr()
    assert not marker.exists()

    # A Wayland compositor appears: its socket shows up in the runtime folder.
    runtime = Path(home.env["XDG_RUNTIME_DIR"])
    compositor = bind_socket(runtime / "wayland-0")
    try:
        wait_for(marker.exists, 10, "the plugin to start after the session appeared")
        assert marker.read_text() == "wayland-0|"
        wait_for(lambda: "plugin started: plugin=desktop_probe" in home.stderr(), 5,
                 "the start log line")
    finally:
        compositor.close()
    # One warning per waiting plugin (the built-in clipboard plugin waits too), not per retry.
    waiting = [line for line in home.stderr().splitlines() if "needs a desktop session" in line]
    assert sum("plugin=desktop_probe" in line for line in waiting) == 1
    assert sum("plugin=clipboard" in line for line in waiting) <= 1
    assert home.status()["state"] == "running"


def test_desktop_plugin_starts_with_display(headless_home: DaemonHome, tmp_path: Path) -> None:
    headless_home.env["DISPLAY"] = ":99"
    headless_home.start(wait_model=False)
    wait_for((tmp_path / "probe-started").exists, 10, "the plugin to start")
    assert (tmp_path / "probe-started").read_text() == "|:99"
    assert "needs a desktop session" not in headless_home.stderr()


def test_find_desktop_rules(tmp_path: Path) -> None:
    runtime = tmp_path / "run"
    runtime.mkdir()
    assert find_desktop({}) == {}
    assert find_desktop({"XDG_RUNTIME_DIR": str(runtime)}) == {}
    # A session bus alone is no desktop: plugins that need one need a display.
    bus = bind_socket(runtime / "bus")
    try:
        assert find_desktop({"XDG_RUNTIME_DIR": str(runtime)}) == {}
        assert session_bus_address({"XDG_RUNTIME_DIR": str(runtime)}) == \
            f"unix:path={runtime / 'bus'}"
        assert find_desktop({"DISPLAY": ":1", "XDG_RUNTIME_DIR": str(runtime)}) == {
            "DISPLAY": ":1", "DBUS_SESSION_BUS_ADDRESS": f"unix:path={runtime / 'bus'}"}
        # A lock file or a plain file named like a Wayland socket does not count.
        (runtime / "wayland-0.lock").write_text("")
        (runtime / "wayland-1").write_text("")
        assert find_desktop({"XDG_RUNTIME_DIR": str(runtime)}) == {}
        wayland = bind_socket(runtime / "wayland-2")
        try:
            assert find_desktop({"XDG_RUNTIME_DIR": str(runtime)})["WAYLAND_DISPLAY"] == \
                "wayland-2"
        finally:
            wayland.close()
    finally:
        bus.close()
