"""Clipboard watchers, one class per platform backend, and the choice between them.

Each watcher reports a clipboard change as an `Offer`. It calls `should_read` first and reads
nothing while that returns False. Text marked secret by a password manager is reported as a
secret offer without its text.
"""

from __future__ import annotations

import hashlib
import os
import select
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from famulus.plugins.clipboard import ClipboardSettings

PASSWORD_HINT = "x-kde-passwordManagerHint"
# Maximum wait for the clipboard owner to reply to one conversion request.
CONVERT_TIMEOUT_S = 1.0


@dataclass(frozen=True)
class Offer:
    """One clipboard change as a watcher read it."""

    text: str | None
    secret: bool = False
    # The owner's WM_CLASS names, when the platform reports them.
    owner: tuple[str, ...] = ()
    # Set when the text was not read because it exceeds the maximum (X11 INCR transfers).
    oversized: bool = False



OfferCallback = Callable[[Offer], None]
ShouldReadCallback = Callable[[], bool]


class Watcher:
    kind = "none"

    def prime(self) -> None:
        """Record what was copied before the start, so that it does not count as new."""

    def run(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError


def choose_watcher(settings: ClipboardSettings, on_offer: OfferCallback,
                   should_read: ShouldReadCallback, warn: Callable[..., None]) -> Watcher | None:
    """Pick the backend: events where the platform sends them, polling otherwise."""
    backend = settings.backend
    display = os.environ.get("DISPLAY")
    wayland = os.environ.get("WAYLAND_DISPLAY")
    if backend in ("auto", "wayland") and wayland and shutil.which("wl-paste"):
        return WaylandWatcher(on_offer, should_read, settings.max_chars)
    if backend in ("auto", "x11") and display:
        try:
            return X11Watcher(display, on_offer, should_read, settings.max_chars)
        except Exception as exc:  # python-xlib missing, or no XFixes: poll instead
            warn("X11 clipboard events unavailable (%s: %s); polling instead",
                 type(exc).__name__, exc)
    # TODO: Windows (GetClipboardSequenceNumber, skipping ExcludeClipboardContentFromMonitor
    # Processing and CanIncludeInClipboardHistory = 0) and macOS (NSPasteboard changeCount,
    # skipping the concealed and transient types) are not implemented yet.
    command = poll_commands(display, wayland)
    if command is None:
        return None
    return PollWatcher(command, on_offer, should_read, settings.max_chars,
                       settings.poll_interval_s)


class X11Watcher(Watcher):
    """Event-driven: XFixes sends an event each time the CLIPBOARD selection changes owner."""

    kind = "x11"

    def __init__(self, display_name: str, on_offer: OfferCallback, should_read: ShouldReadCallback,
                 max_chars: int) -> None:
        from Xlib import X, display
        from Xlib.ext import xfixes

        self._X = X
        self._on_offer = on_offer
        self._should_read = should_read
        self._max_chars = max_chars
        self._display = display.Display(display_name)
        if not self._display.has_extension("XFIXES"):
            self._display.close()
            raise RuntimeError(f"the X server at {display_name} lacks the XFIXES extension")
        self._display.xfixes_query_version()
        screen = self._display.screen()
        self._window = screen.root.create_window(0, 0, 1, 1, 0, X.CopyFromParent,
                                                 X.InputOnly, X.CopyFromParent)
        atom = self._display.intern_atom
        self._clipboard = atom("CLIPBOARD")
        self._targets = atom("TARGETS")
        self._utf8 = atom("UTF8_STRING")
        self._hint = atom(PASSWORD_HINT)
        self._incr = atom("INCR")
        self._property = atom("FAMULUS_CLIPBOARD")
        self._display.xfixes_select_selection_input(
            self._window, self._clipboard, xfixes.XFixesSetSelectionOwnerNotifyMask)
        self._display.flush()
        self._wake_read, self._wake_write = os.pipe()
        self._owner_event = self._display.extension_event.SetSelectionOwnerNotify
        self._changed = False

    def stop(self) -> None:
        try:
            os.write(self._wake_write, b"x")
        except OSError:
            pass

    def run(self) -> None:
        try:
            # Text copied before the start is not new: only owner changes from now on count.
            while True:
                if self._changed:
                    self._changed = False
                    if self._should_read():
                        self._on_offer(self._read())
                if not self._wait(None):
                    return
                self._drain()
        finally:
            self._display.close()
            os.close(self._wake_read)
            os.close(self._wake_write)

    def _wait(self, timeout: float | None) -> bool:
        """Block until X sends something; return False when stop() was called."""
        if self._display.pending_events():
            return True
        ready, _, _ = select.select([self._display.fileno(), self._wake_read], [], [], timeout)
        return self._wake_read not in ready

    def _drain(self) -> None:
        for _ in range(self._display.pending_events()):
            event = self._display.next_event()
            if self._is_owner_change(event):
                self._changed = True

    def _is_owner_change(self, event: Any) -> bool:
        code, sub_code = self._owner_event
        return bool(event.type == code and getattr(event, "sub_code", None) == sub_code
                    and event.selection == self._clipboard)

    def _read(self) -> Offer:
        owner = self._owner_classes()
        targets = self._convert(self._targets)
        names: set[str] = set()
        if isinstance(targets, list):
            names = {self._display.get_atom_name(a) for a in targets}
        if PASSWORD_HINT in names:
            hint = self._convert(self._hint)
            if isinstance(hint, bytes) and hint.strip() == b"secret":
                return Offer(None, secret=True, owner=owner)
        data = self._convert(self._utf8)
        if data == "incr":
            return Offer(None, owner=owner, oversized=True)
        if not isinstance(data, bytes):
            return Offer(None, owner=owner)
        return Offer(data.decode("utf-8", "replace"), owner=owner)

    def _owner_classes(self) -> tuple[str, ...]:
        from Xlib.error import XError

        try:
            owner = self._display.get_selection_owner(self._clipboard)
            if owner == self._X.NONE:
                return ()
            wm_class = owner.get_wm_class()
        except XError:
            return ()
        return tuple(wm_class) if wm_class else ()

    def _convert(self, target: int) -> bytes | list[int] | str | None:
        """Ask the owner for `target` and return its value (None when refused or late)."""
        X = self._X
        self._window.convert_selection(self._clipboard, target, self._property, X.CurrentTime)
        self._display.flush()
        deadline = time.monotonic() + CONVERT_TIMEOUT_S
        while (remaining := deadline - time.monotonic()) > 0:
            if not self._wait(remaining):
                return None
            for _ in range(self._display.pending_events()):
                event = self._display.next_event()
                if self._is_owner_change(event):
                    self._changed = True
                elif event.type == X.SelectionNotify and event.requestor == self._window:
                    return self._take_property(event.property)
        return None

    def _take_property(self, prop: int) -> bytes | list[int] | str | None:
        if prop == self._X.NONE:
            return None
        reply = self._window.get_full_property(self._property, self._X.AnyPropertyType,
                                               sizehint=self._max_chars * 4 + 1)
        self._window.delete_property(self._property)
        self._display.flush()
        if reply is None:
            return None
        if reply.property_type == self._incr:
            # The owner sends large data in increments; such text is over any sane maximum.
            return "incr"
        if reply.format == 32:
            return list(reply.value)
        value = reply.value
        return value if isinstance(value, bytes) else bytes(value)


class WaylandWatcher(Watcher):
    """Event-driven on Wayland: `wl-paste --watch` runs a command on each change.

    wl-paste (wl-clipboard 2.2 and later) sets CLIPBOARD_STATE to `sensitive` for text marked
    with the password-manager hint; such a change is not read.
    """

    kind = "wayland"

    # NOTE: not run in the tests, which have an X server (Xvfb) but no Wayland compositor.
    def __init__(self, on_offer: OfferCallback, should_read: ShouldReadCallback,
                 max_chars: int) -> None:
        self._on_offer = on_offer
        self._should_read = should_read
        self._max_chars = max_chars
        self._proc: subprocess.Popen[bytes] | None = None

    def run(self) -> None:
        self._proc = subprocess.Popen(
            ["wl-paste", "--watch", "sh", "-c", 'echo "${CLIPBOARD_STATE:-data}"'],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        assert self._proc.stdout is not None
        first = True
        for line in self._proc.stdout:
            state = line.strip().decode("ascii", "replace")
            # wl-paste runs the command once at start for what was copied before.
            if first:
                first = False
                continue
            if not self._should_read() or state in ("nil", "clear"):
                continue
            if state == "sensitive":
                self._on_offer(Offer(None, secret=True))
                continue
            types = _run(["wl-paste", "--list-types"], 4096)
            if types is not None and PASSWORD_HINT in types.decode("utf-8", "replace"):
                hint = _run(["wl-paste", "-n", "-t", PASSWORD_HINT], 64)
                if hint is not None and hint.strip() == b"secret":
                    self._on_offer(Offer(None, secret=True))
                    continue
            self._on_offer(_read_text(["wl-paste", "-n", "-t", "text/plain;charset=utf-8"],
                                      self._max_chars))

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()


class PollWatcher(Watcher):
    """Reads the clipboard every interval through a command and reports changed text."""

    kind = "poll"

    def __init__(self, commands: dict[str, list[str]], on_offer: OfferCallback,
                 should_read: ShouldReadCallback, max_chars: int, interval_s: float) -> None:
        self._commands = commands
        self._on_offer = on_offer
        self._should_read = should_read
        self._max_chars = max_chars
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._last: tuple[bool, str] | None = None

    def prime(self) -> None:
        # The same poll as later on, with its report dropped.
        on_offer, self._on_offer = self._on_offer, lambda offer: None
        try:
            self._poll()
        finally:
            self._on_offer = on_offer

    def run(self) -> None:
        while not self._stop.wait(self._interval_s):
            if self._should_read():
                self._poll()

    def stop(self) -> None:
        self._stop.set()

    def _poll(self) -> None:
        targets = _run(self._commands["targets"], 65536)
        if targets is not None and PASSWORD_HINT.encode() in targets:
            hint = _run(self._commands["hint"], 64)
            if hint is not None and hint.strip() == b"secret":
                self._report(Offer(None, secret=True), "")
                return
        offer = _read_text(self._commands["text"], self._max_chars)
        digest = hashlib.sha256((offer.text or "").encode("utf-8", "replace")).hexdigest()
        self._report(offer, digest)

    def _report(self, offer: Offer, digest: str) -> None:
        # Each poll reads the same content until it changes, so only a change is reported.
        key = (offer.secret, digest)
        if key != self._last:
            self._last = key
            self._on_offer(offer)


def poll_commands(display: str | None, wayland: str | None) -> dict[str, list[str]] | None:
    if wayland and shutil.which("wl-paste"):
        return {"targets": ["wl-paste", "--list-types"],
                "hint": ["wl-paste", "-n", "-t", PASSWORD_HINT],
                "text": ["wl-paste", "-n", "-t", "text/plain;charset=utf-8"]}
    if display and shutil.which("xclip"):
        base = ["xclip", "-selection", "clipboard", "-o", "-t"]
        return {"targets": [*base, "TARGETS"], "hint": [*base, PASSWORD_HINT],
                "text": [*base, "UTF8_STRING"]}
    return None


def _run(command: list[str], limit: int) -> bytes | None:
    """Run a clipboard command and return up to `limit` bytes of its output, None on error."""
    try:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                stdin=subprocess.DEVNULL)
    except OSError:
        return None
    assert proc.stdout is not None
    try:
        data = proc.stdout.read(limit)
    finally:
        proc.stdout.close()
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    return data if proc.returncode in (0, -9) else None


def _read_text(command: list[str], max_chars: int) -> Offer:
    # UTF-8 needs at most 4 bytes per character. One byte more marks text over the maximum.
    limit = max_chars * 4 + 1
    data = _run(command, limit)
    if data is None:
        return Offer(None)
    if len(data) >= limit:
        return Offer(None, oversized=True)
    return Offer(data.decode("utf-8", "replace"))
