"""`famulus tray`: the pystray icon, its menu, and the bus client that keeps it current.

The icon runs in the main thread, because GTK and AppKit expect that. A worker thread
follows the daemon's events. After each burst of events it requests `status` and redraws the
icon. When the daemon stops or a request times out, the icon turns to "not running" and the
worker retries the connection until the daemon is back.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from famulus.daemon.config import load_config
from famulus.daemon.desktop import session_bus_address
from famulus.daemon.paths import user_paths
from famulus.daemon.tray.actions import ActionError, RecentSummary, TrayActions
from famulus.daemon.tray.icons import draw_icon
from famulus.daemon.tray.state import TrayView, view_of
from famulus.ipc.client import Client, DaemonUnavailable, Subscriber
from famulus.ipc.protocol import Event, Method, Topic

logger = logging.getLogger(__name__)

EXIT_TRAY_UNAVAILABLE = 1
RECENT_COUNT = 5
# How far back in the event log the tray looks for recent summaries when it connects.
RECENT_WINDOW_EVENTS = 2000
INSTALL_HINT = ("install the tray extra with PyGObject: on Debian or Ubuntu `sudo apt install "
                "libgirepository1.0-dev libcairo2-dev pkg-config gir1.2-gtk-3.0`, then "
                "`pip install 'famulus[tray]'`")


class NoDisplay(Exception):
    """No graphical session is reachable, so no icon can be shown."""


def load_pystray(backend: str | None) -> tuple[Any, str | None]:
    """Import pystray with a menu backend where possible; return (module, fallback reason).

    On Linux the appindicator and gtk backends give a menu and notifications, but they need
    PyGObject and a D-Bus session bus. The xorg backend needs neither and has no menu. The
    reason names what is missing and how to fix it. It is None when a menu backend, or the
    backend chosen with `backend`, loaded.
    """
    if sys.platform in ("darwin", "win32"):
        return _import_pystray(None), None
    if backend is not None:
        return _import_pystray(backend), None
    if session_bus_address() is None:
        reason = ("no D-Bus session bus is reachable (DBUS_SESSION_BUS_ADDRESS is unset); "
                  "start the tray from the desktop session")
        return _import_pystray("xorg"), reason
    try:
        import gi  # noqa: F401  # PyGObject, needed by both menu backends
    except ImportError:
        return _import_pystray("xorg"), f"PyGObject is not installed; {INSTALL_HINT}"
    problems = []
    for name in ("appindicator", "gtk"):
        try:
            return _import_pystray(name), None
        except NoDisplay:
            raise
        except Exception as exc:
            problems.append(f"{name}: {exc}")
    reason = (f"the menu backends failed to load ({'; '.join(problems)}); on Debian or "
              "Ubuntu install gir1.2-gtk-3.0")
    return _import_pystray("xorg"), reason


def _import_pystray(backend: str | None) -> Any:
    # pystray picks its backend when the package is imported, from PYSTRAY_BACKEND, so a
    # failed attempt is removed from sys.modules before the next one.
    if backend is not None:
        os.environ["PYSTRAY_BACKEND"] = backend
    try:
        import pystray
    except Exception as exc:
        for name in [m for m in sys.modules if m == "pystray" or m.startswith("pystray.")]:
            del sys.modules[name]
        # python-xlib raises its own errors (DisplayNameError, DisplayConnectionError) when
        # no X server accepts the connection, not ImportError.
        if type(exc).__module__.startswith("Xlib"):
            raise NoDisplay(f"cannot connect to the display: {exc}") from exc
        raise
    return pystray


def check_display() -> None:
    if sys.platform in ("darwin", "win32"):
        return
    if not os.environ.get("DISPLAY") and not os.environ.get("WAYLAND_DISPLAY"):
        raise NoDisplay("neither DISPLAY nor WAYLAND_DISPLAY is set")


def summary_notice(event: Event) -> tuple[str, str]:
    """Return (title, message) of the desktop notification for a `document.summarized` event."""
    name = Path(str(event.body.get("path") or "text")).name
    summary = str(event.body.get("summary") or "")
    first_line = summary.strip().splitlines()[0] if summary.strip() else ""
    if len(first_line) > 200:
        first_line = first_line[:199] + "…"
    return f"Summary ready: {name}", first_line


class TrayApp:
    """The icon, its menu and the worker that follows the daemon."""

    def __init__(self, pystray: Any, actions: TrayActions, *, events_endpoint: str,
                 requests_endpoint: str, notify_summaries: bool = False,
                 retry_s: float = 1.0, liveness_s: float = 10.0) -> None:
        self.pystray = pystray
        self.actions = actions
        self.events_endpoint = events_endpoint
        self.requests_endpoint = requests_endpoint
        self.notify_summaries = notify_summaries
        self.retry_s = retry_s
        self.liveness_s = liveness_s
        self.status: dict[str, Any] | None = None
        self.view = view_of(None)
        self.recent: deque[RecentSummary] = deque(maxlen=RECENT_COUNT)
        self._stop = threading.Event()
        self._worker: threading.Thread | None = None
        self.icon = pystray.Icon("famulus", draw_icon(self.view.state), self.view.tooltip,
                                 menu=pystray.Menu(self._menu_items))

    # -- running ------------------------------------------------------------------------------

    def run(self) -> None:
        """Show the icon and block until Quit (or `stop()`)."""
        logger.info("tray started: backend=%s menu=%s", type(self.icon).__module__,
                    self.icon.HAS_MENU)
        try:
            self.icon.run(setup=self._setup)
        except Exception:
            # The gtk backend raises at exit when no notification service runs; after a
            # stop that is harmless.
            if not self._stop.is_set():
                raise
            logger.debug("tray backend failed while closing", exc_info=True)
        finally:
            self._stop.set()
            if self._worker is not None:
                self._worker.join(5)

    def _setup(self, icon: Any) -> None:
        icon.visible = True
        self._worker = threading.Thread(target=self._follow_daemon, name="tray-bus", daemon=True)
        self._worker.start()

    def stop(self) -> None:
        self._stop.set()
        self.icon.stop()

    def _follow_daemon(self) -> None:
        """Follow the daemon, reconnecting after every loss, until the tray stops."""
        while not self._stop.is_set():
            try:
                self._session()
                problem = "the daemon stopped"
            except DaemonUnavailable as exc:
                problem = str(exc)
            except Exception as exc:
                logger.exception("tray lost the daemon after an unexpected error")
                problem = f"error: {exc}"
            self._show(None, problem)
            self._stop.wait(self.retry_s)

    def _session(self) -> None:
        """Follow one daemon run; return when it stops, raise DaemonUnavailable on a timeout."""
        with Client(self.requests_endpoint, timeout_s=3) as client, \
                Subscriber(endpoint=self.events_endpoint,
                           requests_endpoint=self.requests_endpoint) as sub:
            status = client.call(Method.STATUS)
            self._show(status)
            since = max(0, int(status["last_seq"]) - RECENT_WINDOW_EVENTS)
            for event in sub.follow(since=since, client=client, idle_timeout_s=0.05):
                self._on_event(event, replayed=True)
            logger.info("tray connected to the daemon: pid=%s", status.get("pid"))
            checked = time.monotonic()
            while not self._stop.is_set():
                event = sub.recv(timeout_s=0.5)
                if event is not None:
                    if event.topic == Topic.DAEMON_STOPPING:
                        return
                    self._on_event(event)
                    # Take the rest of a burst first, so one status call covers it.
                    for event in self._drain(sub):
                        if event.topic == Topic.DAEMON_STOPPING:
                            return
                        self._on_event(event)
                elif time.monotonic() - checked < self.liveness_s:
                    continue
                self._show(client.call(Method.STATUS))
                checked = time.monotonic()

    @staticmethod
    def _drain(sub: Subscriber) -> Iterator[Event]:
        for _ in range(1000):
            event = sub.recv(timeout_s=0.05)
            if event is None:
                return
            yield event

    def _on_event(self, event: Event, replayed: bool = False) -> None:
        if event.topic != Topic.DOCUMENT_SUMMARIZED:
            return
        try:
            item = RecentSummary(int(event.body["document"]), str(event.body["path"]),
                                 int(event.body["job"]), str(event.body.get("summary") or ""))
        except (KeyError, TypeError, ValueError):
            logger.warning("document.summarized event without document, path or job: seq=%d",
                           event.seq)
            return
        self.recent.appendleft(item)
        self.icon.update_menu()
        if self.notify_summaries and not replayed and self.icon.HAS_NOTIFICATION:
            title, message = summary_notice(event)
            self.icon.notify(message, title)

    def _show(self, status: dict[str, Any] | None, problem: str | None = None) -> None:
        view = view_of(status, problem)
        self.status = status
        changed = view != self.view
        self.view = view
        if changed:
            self._draw(view)

    def _draw(self, view: TrayView) -> None:
        logger.debug("tray state: %s queue=%d", view.state, view.queue_depth)
        self.icon.icon = draw_icon(view.state, view.queue_depth)
        self.icon.title = view.tooltip
        self.icon.update_menu()

    # -- menu ---------------------------------------------------------------------------------

    def _menu_items(self) -> Iterator[Any]:
        item, menu = self.pystray.MenuItem, self.pystray.Menu
        running = self.status is not None
        if self.recent:
            entries = [item(Path(r.path).name, menu(
                item("Open document", self._guard(lambda r=r: self.actions.open_document(r))),
                item("Open summary", self._guard(lambda r=r: self.actions.open_summary(r)))))
                for r in self.recent]
            yield item("Recent summaries", menu(*entries))
        else:
            yield item("No summaries yet", None, enabled=False)
        yield menu.SEPARATOR
        paused = bool(self.status and self.status.get("paused"))
        yield item("Resume watching" if paused else "Pause watching",
                   self._guard(self.actions.resume if paused else self.actions.pause),
                   enabled=running)
        folders = (self.status or {}).get("watch_folders") or []
        yield item("Open watched folder",
                   self._guard(lambda: self.actions.open_watched_folder(folders)),
                   enabled=bool(folders))
        yield item("Open config", self._guard(self.actions.open_config))
        yield menu.SEPARATOR
        if running:
            yield item("Stop daemon", self._guard(self.actions.stop_daemon))
        else:
            yield item("Start daemon", self._guard(self.actions.start_daemon))
        yield item("Quit tray", lambda: self.stop())

    def _guard(self, action: Any) -> Any:
        """Wrap a menu action so that a failure is logged (and notified) instead of raised."""

        def run() -> None:
            try:
                action()
            except ActionError as exc:
                logger.warning("menu action failed: %s", exc)
                if self.icon.HAS_NOTIFICATION:
                    self.icon.notify(str(exc), "famulus")
            except Exception:
                logger.exception("menu action failed")

        return run


def run_tray(config: str | None = None, backend: str | None = None) -> int:
    """Run the tray until Quit; return the exit code (non-zero without a display)."""
    paths = user_paths()
    cfg = load_config(paths, config)
    try:
        check_display()
        pystray, fallback = load_pystray(backend)
    except NoDisplay as exc:
        print(f"famulus tray needs a graphical session: {exc}. Run it from your desktop "
              "session, or install the tray service with `famulus service install`.",
              file=sys.stderr)
        return EXIT_TRAY_UNAVAILABLE
    except Exception as exc:
        # ImportError without pystray; ValueError from gi.require_version without GTK.
        print(f"famulus tray cannot load pystray's {backend or 'xorg'} backend ({exc}); "
              f"{INSTALL_HINT}", file=sys.stderr)
        return EXIT_TRAY_UNAVAILABLE
    if fallback:
        logger.warning("tray without a menu or notifications (pystray's xorg backend): %s",
                       fallback)
    actions = TrayActions(requests_endpoint=paths.requests_endpoint, config=config)
    app = TrayApp(pystray, actions, events_endpoint=paths.events_endpoint,
                  requests_endpoint=paths.requests_endpoint,
                  notify_summaries=cfg.tray.notify_summaries)
    app.run()
    return 0
