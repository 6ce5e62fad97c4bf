"""Readiness and watchdog notifications for systemd (the sd_notify protocol).

systemd passes a datagram socket in `NOTIFY_SOCKET` to a `Type=notify` service. The service
sends newline-separated `KEY=value` lines to it: `READY=1` once it serves, `STATUS=...` as
free text for `systemctl status`, `WATCHDOG=1` at least every `WATCHDOG_USEC` microseconds,
and `STOPPING=1` when it begins to shut down. The protocol is small enough to speak directly
over an AF_UNIX socket, so no library is needed. Without `NOTIFY_SOCKET` every call does
nothing, and without `WATCHDOG_USEC` no watchdog thread runs, so an unsupervised daemon has
no periodic wake-ups from this module.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable, Mapping

logger = logging.getLogger(__name__)


def parse_address(value: str) -> str | None:
    """Return the socket address for a `NOTIFY_SOCKET` value, or None if unsupported.

    A leading `@` names a Linux abstract socket, whose address starts with a NUL byte.
    """
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None


def parse_watchdog_interval(environ: Mapping[str, str]) -> float | None:
    """Return the watchdog timeout in seconds, or None when no watchdog is requested.

    `WATCHDOG_PID`, when set, names the process the watchdog is meant for; any other process
    (a child that inherited the environment) must not send keep-alives.
    """
    usec = environ.get("WATCHDOG_USEC", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    pid = environ.get("WATCHDOG_PID", "")
    if pid and pid != str(os.getpid()):
        return None
    return int(usec) / 1_000_000


class SystemdNotifier:
    """Sends sd_notify messages when the process runs under a `Type=notify` unit."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        raw = env.get("NOTIFY_SOCKET", "")
        self.address = parse_address(raw) if raw else None
        if raw and self.address is None:
            logger.warning("NOTIFY_SOCKET=%r is not a path or an abstract socket (@name); "
                           "systemd notifications are off", raw)
        self.watchdog_s = parse_watchdog_interval(env) if self.address else None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failed_sends = 0

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *fields: str) -> bool:
        """Send `KEY=value` fields in one datagram; return whether it was sent."""
        if self.address is None:
            return False
        payload = "\n".join(fields).encode("utf-8")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(payload, self.address)
        except OSError as exc:
            self._failed_sends += 1
            # Logged once, then every 100th time: a vanished socket fails on every ping.
            if self._failed_sends % 100 == 1:
                logger.warning("systemd notification failed (%d so far): fields=%s error=%s",
                               self._failed_sends, [f.split("=", 1)[0] for f in fields], exc)
            return False
        return True

    def ready(self, status: str) -> None:
        self.notify("READY=1", f"STATUS={status}")

    def stopping(self, status: str = "stopping") -> None:
        # Keep-alives end first: a ping after STOPPING=1 would tell systemd nothing useful.
        self._stop.set()
        self.notify("STOPPING=1", f"STATUS={status}")

    def start_watchdog(self, healthy: Callable[[], bool]) -> None:
        """Send `WATCHDOG=1` every half watchdog interval while `healthy()` returns true.

        When `healthy()` is false or raises, the keep-alive is skipped, so systemd restarts
        the service once the interval passes without one.
        """
        if self.watchdog_s is None or self._thread is not None:
            return
        interval = self.watchdog_s / 2
        self._thread = threading.Thread(target=self._watchdog, args=(interval, healthy),
                                        name="sd-watchdog", daemon=True)
        self._thread.start()
        logger.info("systemd watchdog: keep-alive every %.1f s", interval)

    def _watchdog(self, interval: float, healthy: Callable[[], bool]) -> None:
        while not self._stop.wait(interval):
            try:
                ok = healthy()
            except Exception:
                logger.exception("watchdog health check failed; keep-alive skipped")
                continue
            if ok:
                self.notify("WATCHDOG=1")
            else:
                logger.warning("watchdog health check reported a fault; keep-alive skipped")

    def stop(self, timeout: float = 1.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
