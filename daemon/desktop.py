"""Finding the user's desktop session, for plugins that need one and for the tray.

A daemon started by a service manager before login, or over SSH, has no DISPLAY,
WAYLAND_DISPLAY or DBUS_SESSION_BUS_ADDRESS. Its core runs anyway. A plugin that sets the
class attribute `needs_desktop = True` (a clipboard watcher, for example) waits instead of
failing: `DesktopGate` logs one line, looks for a session again every `desktop_retry_s`
seconds, and starts the plugin once one is found.

A session counts as found in three cases. The environment names a display. The user's
systemd manager has received DISPLAY or WAYLAND_DISPLAY from the session, because desktops
run `systemctl --user import-environment` at login. Or a Wayland socket exists in the
private runtime folder `$XDG_RUNTIME_DIR`.
"""

from __future__ import annotations

import logging
import os
import stat
import subprocess
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

DESKTOP_VARIABLES = ("DISPLAY", "WAYLAND_DISPLAY", "DBUS_SESSION_BUS_ADDRESS")


def _is_socket(path: Path) -> bool:
    try:
        return stat.S_ISSOCK(path.stat().st_mode)
    except OSError:
        return False


def session_bus_address(environ: Mapping[str, str] | None = None) -> str | None:
    """Return the D-Bus session bus address, from the environment or the runtime folder."""
    env = os.environ if environ is None else environ
    if env.get("DBUS_SESSION_BUS_ADDRESS"):
        return env["DBUS_SESSION_BUS_ADDRESS"]
    runtime = env.get("XDG_RUNTIME_DIR")
    if runtime and _is_socket(Path(runtime) / "bus"):
        return f"unix:path={Path(runtime) / 'bus'}"
    return None


def _systemd_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """Return the user manager's environment, or {} when not running under systemd."""
    # systemd sets INVOCATION_ID for every unit it starts. Elsewhere no user manager exists
    # to query, so spawning systemctl on every retry would be wasted work.
    if not environ.get("INVOCATION_ID"):
        return {}
    try:
        out = subprocess.run(["systemctl", "--user", "show-environment"], capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    if out.returncode != 0:
        return {}
    pairs = (line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)
    return {key: value for key, value in pairs if key in DESKTOP_VARIABLES}


def find_desktop(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Return the variables of a reachable desktop session, or {} when there is none.

    The result contains DISPLAY and/or WAYLAND_DISPLAY, plus DBUS_SESSION_BUS_ADDRESS when a
    session bus is known too.
    """
    env = os.environ if environ is None else environ
    found = {k: env[k] for k in DESKTOP_VARIABLES if env.get(k)}
    if not (found.get("DISPLAY") or found.get("WAYLAND_DISPLAY")):
        found.update(_systemd_environment(env))
    runtime = env.get("XDG_RUNTIME_DIR")
    if not (found.get("DISPLAY") or found.get("WAYLAND_DISPLAY")) and runtime:
        sockets = sorted(p.name for p in Path(runtime).glob("wayland-*")
                         if not p.name.endswith(".lock") and _is_socket(p))
        if sockets:
            found["WAYLAND_DISPLAY"] = sockets[0]
    if not (found.get("DISPLAY") or found.get("WAYLAND_DISPLAY")):
        return {}
    bus = session_bus_address(env)
    if bus and "DBUS_SESSION_BUS_ADDRESS" not in found:
        found["DBUS_SESSION_BUS_ADDRESS"] = bus
    return found


class DesktopGate:
    """Holds back plugins that need a desktop session until one is reachable."""

    def __init__(self, retry_s: float, start: Callable[[Any], None]) -> None:
        self.retry_s = retry_s
        self._start = start
        self._waiting: list[Any] = []
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None
        self._closed = False

    @property
    def waiting(self) -> list[str]:
        with self._lock:
            return [p.name for p in self._waiting]

    def admit(self, plugin: Any) -> bool:
        """Return whether `plugin` may start now; otherwise keep it until a session appears."""
        if not getattr(plugin, "needs_desktop", False):
            return True
        found = find_desktop()
        if found:
            _apply(found)
            return True
        with self._lock:
            if self._closed:
                return False
            self._waiting.append(plugin)
            self._schedule()
        logger.warning("plugin needs a desktop session and is disabled until one appears "
                       "(no DISPLAY, WAYLAND_DISPLAY or session bus); retrying every %g s: "
                       "plugin=%s", self.retry_s, plugin.name)
        return False

    def _schedule(self) -> None:
        if self._timer is None and not self._closed:
            self._timer = threading.Timer(self.retry_s, self._retry)
            self._timer.daemon = True
            self._timer.start()

    def _retry(self) -> None:
        with self._lock:
            self._timer = None
            if self._closed:
                return
            found = find_desktop()
            if not found:
                self._schedule()
                return
            plugins, self._waiting = self._waiting, []
        _apply(found)
        logger.info("desktop session found (%s); starting waiting plugins: %s",
                    ", ".join(f"{k}={v}" for k, v in found.items()),
                    ", ".join(p.name for p in plugins))
        for plugin in plugins:
            try:
                self._start(plugin)
            except Exception:
                logger.exception("plugin failed to start after the desktop appeared: "
                                 "plugin=%s", plugin.name)

    def close(self) -> None:
        """Cancel the retry timer and forget the waiting plugins."""
        with self._lock:
            self._closed = True
            self._waiting = []
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

    def reopen(self) -> None:
        with self._lock:
            self._closed = False


def _apply(found: Mapping[str, str]) -> None:
    # Plugins and the libraries they use (xclip, GTK, D-Bus) read the process environment.
    for key, value in found.items():
        os.environ.setdefault(key, value)
