"""Test helpers for the clipboard: a private Xvfb server, xclip copies, a selection owner."""

from __future__ import annotations

import os
import random
import select
import shutil
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest


@contextmanager
def xvfb() -> Iterator[str]:
    """Start Xvfb on a free display number and yield its DISPLAY value."""
    if shutil.which("Xvfb") is None or shutil.which("xclip") is None:
        pytest.skip("Xvfb and xclip are needed (installed by .ci/setup)")
    read_fd, write_fd = os.pipe()
    # A random high display number: other X servers on a shared machine take the low ones,
    # and a server in another mount namespace leaves no lock file here to warn Xvfb.
    number = random.randrange(200, 60000)
    proc = subprocess.Popen(["Xvfb", f":{number}", "-displayfd", str(write_fd), "-nolisten",
                             "tcp", "-screen", "0", "320x240x24"], pass_fds=(write_fd,),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.close(write_fd)
    try:
        ready, _, _ = select.select([read_fd], [], [], 20)
        assert ready, "Xvfb did not report its display number within 20 s"
        reported = os.read(read_fd, 32).decode().strip()
        assert reported == str(number), f"Xvfb reported display {reported!r}, not {number}"
        yield f":{number}"
    finally:
        os.close(read_fd)
        proc.terminate()
        proc.wait(10)


class Copies:
    """Text copied with `xclip`; each copy's xclip process serves it until the next copy."""

    def __init__(self, display: str) -> None:
        self.env = {**os.environ, "DISPLAY": display}
        self._procs: list[subprocess.Popen[bytes]] = []

    def copy(self, text: str) -> None:
        # -quiet keeps xclip in the foreground, so it can be ended by its PID.
        proc = subprocess.Popen(["xclip", "-selection", "clipboard", "-quiet"],
                                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, env=self.env)
        assert proc.stdin is not None
        proc.stdin.write(text.encode("utf-8"))
        proc.stdin.close()
        self._procs.append(proc)

    def current(self) -> str | None:
        """Return the clipboard's text as xclip reads it, None when it is empty."""
        out = subprocess.run(["xclip", "-selection", "clipboard", "-o"], capture_output=True,
                             env=self.env, timeout=10)
        return out.stdout.decode("utf-8", "replace") if out.returncode == 0 else None

    def close(self) -> None:
        for proc in self._procs:
            if proc.poll() is None:
                proc.terminate()
            proc.wait(5)


class SelectionOwner(threading.Thread):
    """Owns CLIPBOARD through python-xlib, as a password manager or another app would.

    It offers TARGETS, UTF8_STRING with `text` and, with `secret`, the KDE password-manager
    hint `x-kde-passwordManagerHint` = `secret`. `requested` records each target asked for.
    """

    def __init__(self, display_name: str, text: str, *, secret: bool,
                 wm_class: tuple[str, str] | None = None) -> None:
        super().__init__(daemon=True)
        from Xlib import X, display

        self._X = X
        self.display = display.Display(display_name)
        self.text = text.encode("utf-8")
        self.secret = secret
        self.requested: list[str] = []
        self._closing = threading.Event()
        screen = self.display.screen()
        self.window = screen.root.create_window(0, 0, 1, 1, 0, X.CopyFromParent, X.InputOnly,
                                                X.CopyFromParent)
        if wm_class is not None:
            self.window.set_wm_class(*wm_class)
        atom = self.display.intern_atom
        self.atoms = {name: atom(name) for name in
                      ("CLIPBOARD", "TARGETS", "UTF8_STRING", "x-kde-passwordManagerHint")}

    def take(self) -> None:
        self.window.set_selection_owner(self.atoms["CLIPBOARD"], self._X.CurrentTime)
        self.display.flush()
        self.start()

    def run(self) -> None:
        from Xlib import Xatom
        from Xlib.protocol import event as xevent

        X = self._X
        offered = [self.atoms["TARGETS"], self.atoms["UTF8_STRING"]]
        if self.secret:
            offered.append(self.atoms["x-kde-passwordManagerHint"])
        while not self._closing.is_set():
            if not self.display.pending_events():
                select.select([self.display.fileno()], [], [], 0.1)
                continue
            ev = self.display.next_event()
            if ev.type == X.SelectionClear:
                return
            if ev.type != X.SelectionRequest:
                continue
            name = self.display.get_atom_name(ev.target)
            self.requested.append(name)
            prop = ev.property or ev.target
            if name == "TARGETS":
                ev.requestor.change_property(prop, Xatom.ATOM, 32, offered)
            elif name == "UTF8_STRING":
                ev.requestor.change_property(prop, self.atoms["UTF8_STRING"], 8, self.text)
            elif name == "x-kde-passwordManagerHint" and self.secret:
                ev.requestor.change_property(prop, Xatom.STRING, 8, b"secret")
            else:
                prop = X.NONE
            reply = xevent.SelectionNotify(time=ev.time, requestor=ev.requestor,
                                           selection=ev.selection, target=ev.target,
                                           property=prop)
            ev.requestor.send_event(reply, event_mask=0)
            self.display.flush()

    def close(self) -> None:
        self._closing.set()
        if self.is_alive():
            self.join(5)
        self.display.close()
