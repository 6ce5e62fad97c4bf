"""`famulus tray`: icon states in screenshots under Xvfb with trayer, menu actions, no display.

The end-to-end test runs a real X server (Xvfb), a real system tray (trayer), a private
D-Bus session bus, a real daemon and `famulus tray` with pystray's gtk backend. It reads the
icon's state from the colours in root-window screenshots (imagemagick's `import`), which are
kept in $FAMULUS_TEST_ARTIFACTS (default: the test's temp folder).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from famulus.daemon.model.host import DEVICE_FAULTS_ENV
from famulus.daemon.tray.actions import ActionError, RecentSummary, TrayActions
from famulus.daemon.tray.app import summary_notice
from famulus.daemon.tray.icons import COLOURS, draw_icon
from famulus.daemon.tray.state import TrayState, classify, view_of
from famulus.ipc.protocol import Event
from tests.conftest import CORPUS, DaemonHome, wait_for

pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

SCREEN = (320, 200)
TRAY_TOOLS = ("Xvfb", "trayer", "import", "xdotool", "dbus-daemon")


def status_of(state: str = "running", model: str = "loaded", paused: bool = False,
              queued: int = 0, running: int = 0) -> dict[str, Any]:
    return {"state": state, "paused": paused, "jobs": {"queued": queued, "running": running},
            "model": {"state": model, "name": "smollm2", "device": "CPU",
                      "error": "boom" if model == "failed" else None}}


# -- state and icons, without a display ----------------------------------------------------

@pytest.mark.parametrize(("status", "expected"), [
    (None, TrayState.NOT_RUNNING),
    (status_of(state="stopping"), TrayState.NOT_RUNNING),
    (status_of(model="failed", paused=True, queued=2), TrayState.ERROR),
    (status_of(model="missing"), TrayState.NO_MODEL),
    (status_of(model="loading", queued=1), TrayState.LOADING),
    (status_of(state="starting", model="stopped"), TrayState.LOADING),
    (status_of(paused=True, queued=3), TrayState.PAUSED),
    (status_of(queued=2, running=1), TrayState.WORKING),
    (status_of(), TrayState.IDLE),
])
def test_classify_states(status: dict[str, Any] | None, expected: TrayState) -> None:
    assert classify(status) == expected


def test_tooltip_has_model_device_queue() -> None:
    view = view_of(status_of(queued=2, running=1))
    assert view.queue_depth == 3
    assert view.tooltip.splitlines() == ["famulus: working", "model: smollm2 on CPU",
                                         "queue: 3"]
    failed = view_of(status_of(model="failed"))
    assert failed.tooltip.splitlines()[-1] == "boom"
    gone = view_of(None, "no daemon is listening")
    assert gone.tooltip == "famulus: not running\nno daemon is listening"


def test_each_state_has_own_colour() -> None:
    assert len(set(COLOURS.values())) == len(TrayState)
    for state in TrayState:
        image = draw_icon(state, 4).convert("RGB")
        assert image.getpixel((10, 32)) == COLOURS[state], state


def test_summary_notice_is_short() -> None:
    event = Event(seq=1, id="x", cause=None, ts=0.0, topic="document.summarized",
                  body={"path": "/a/report.pdf", "summary": "First line.\nSecond line."})
    assert summary_notice(event) == ("Summary ready: report.pdf", "First line.")


def test_tray_without_display_exits(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    env["HOME"] = str(tmp_path)
    result = subprocess.run([sys.executable, "-m", "famulus.daemon.cli", "tray"], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "needs a graphical session" in lines[0]
    assert "DISPLAY" in lines[0]


# -- menu actions, against a real daemon -------------------------------------------------------

RECORDER = textwrap.dedent("""\
    import sys
    with open(sys.argv[1], "a", encoding="utf-8") as log:
        log.write(sys.argv[2] + "\\n")
    """)


def recording_opener(tmp_path: Path) -> tuple[list[str], Path]:
    """Return an opener command that appends each opened path to a log file, and the log."""
    script = tmp_path / "opener.py"
    script.write_text(RECORDER, encoding="utf-8")
    log = tmp_path / "opened.txt"
    return [sys.executable, str(script), str(log)], log


def opened(log: Path, count: int) -> list[str]:
    wait_for(lambda: log.exists() and len(log.read_text().splitlines()) >= count, 10,
             f"{count} opened path(s)")
    return log.read_text(encoding="utf-8").splitlines()


def actions_for(home: DaemonHome, tmp_path: Path) -> tuple[TrayActions, Path]:
    opener, log = recording_opener(tmp_path)
    actions = TrayActions(requests_endpoint=f"ipc://{home.runtime / 'requests.sock'}",
                          config=str(home.config_file), opener=opener,
                          summaries_dir=tmp_path / "summaries",
                          daemon_command=home.command("run"), env=home.env)
    return actions, log


def test_tray_actions(daemon_home: DaemonHome, tmp_path: Path) -> None:
    actions, log = actions_for(daemon_home, tmp_path)
    with pytest.raises(ActionError, match="not running"):
        actions.pause()

    proc = actions.start_daemon()
    daemon_home.proc = proc
    wait_for(lambda: daemon_home._status_or_exit(daemon_home.client(), proc), 60,
             "the daemon started by the tray")
    assert os.getsid(proc.pid) == proc.pid  # its own session: it outlives the tray

    actions.pause()
    assert daemon_home.status()["paused"] is True
    actions.resume()
    assert daemon_home.status()["paused"] is False

    document = tmp_path / "note.txt"
    document.write_text("The harbour crane was repaired on Monday.\n", encoding="utf-8")
    item = RecentSummary(document=7, path=str(document), job=9, summary="A crane was fixed.")
    # Each opener is its own process, so the log lines can come in any order.
    openers = [actions.open_document(item), actions.open_summary(item),
               actions.open_watched_folder(daemon_home.status()["watch_folders"]),
               actions.open_config()]
    for proc in openers:
        assert proc is not None
        assert proc.wait(10) == 0
    paths = set(opened(log, 4))
    summary_file = tmp_path / "summaries" / "summary-7-9.txt"
    assert paths == {str(document), str(summary_file), str(daemon_home.inbox),
                     str(daemon_home.config_file)}
    assert "A crane was fixed." in summary_file.read_text(encoding="utf-8")

    with pytest.raises(ActionError, match="does not exist"):
        actions.open_document(RecentSummary(1, str(tmp_path / "gone.txt"), 1, ""))
    with pytest.raises(ActionError, match="no folder is watched"):
        actions.open_watched_folder([])

    actions.stop_daemon()
    proc.wait(15)
    assert proc.returncode == 0


def test_open_config_creates_missing_file(tmp_path: Path) -> None:
    opener, log = recording_opener(tmp_path)
    config = tmp_path / "cfg" / "config.toml"
    actions = TrayActions(requests_endpoint="ipc:///nonexistent", config=str(config),
                          opener=opener)
    actions.open_config()
    assert opened(log, 1) == [str(config)]
    assert config.read_text(encoding="utf-8").startswith("# famulus configuration")


# -- the icon under Xvfb with trayer -------------------------------------------------------------

def artifacts_dir(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("FAMULUS_TEST_ARTIFACTS") or tmp_path / "artifacts") / "tray"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


NOTIFICATION_SERVER = textwrap.dedent("""\
    import sys

    from gi.repository import Gio, GLib

    XML = (
        '<node><interface name="org.freedesktop.Notifications">'
        '<method name="Notify"><arg type="s" direction="in"/><arg type="u" direction="in"/>'
        '<arg type="s" direction="in"/><arg type="s" direction="in"/>'
        '<arg type="s" direction="in"/><arg type="as" direction="in"/>'
        '<arg type="a{sv}" direction="in"/><arg type="i" direction="in"/>'
        '<arg type="u" direction="out"/></method>'
        '<method name="CloseNotification"><arg type="u" direction="in"/></method>'
        '</interface></node>')
    log = open(sys.argv[1], "a", encoding="utf-8")


    def on_call(conn, sender, path, interface, method, params, invocation):
        if method == "Notify":
            args = params.unpack()
            log.write(args[3] + "\\t" + args[4].replace("\\n", " ") + "\\n")
            log.flush()
            invocation.return_value(GLib.Variant("(u)", (1,)))
        else:
            invocation.return_value(None)


    def on_bus(conn, name):
        info = Gio.DBusNodeInfo.new_for_xml(XML).interfaces[0]
        conn.register_object("/org/freedesktop/Notifications", info, on_call, None, None)


    def on_name(conn, name):
        print("ready", flush=True)


    Gio.bus_own_name(Gio.BusType.SESSION, "org.freedesktop.Notifications",
                     Gio.BusNameOwnerFlags.NONE, on_bus, on_name, lambda *args: sys.exit(1))
    GLib.MainLoop().run()
    """)


class XSession:
    """Xvfb, trayer and a D-Bus session bus, stopped by PID at the end."""

    def __init__(self, tmp_path: Path) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        read_fd, write_fd = os.pipe()
        xvfb = subprocess.Popen(
            ["Xvfb", "-displayfd", str(write_fd), "-screen", "0", f"{SCREEN[0]}x{SCREEN[1]}x24",
             "-nolisten", "tcp"], pass_fds=(write_fd,), stderr=subprocess.DEVNULL)
        self.procs.append(xvfb)
        os.close(write_fd)
        with os.fdopen(read_fd) as pipe:
            number = pipe.readline().strip()  # Xvfb writes it once it accepts clients
        if not number:
            raise AssertionError("Xvfb did not start")
        self.display = f":{number}"
        self.env = {"DISPLAY": self.display}
        bus = subprocess.Popen(
            ["dbus-daemon", "--session", "--nofork", "--print-address=1",
             f"--address=unix:path={tmp_path / 'session-bus'}"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self.procs.append(bus)
        assert bus.stdout is not None
        self.env["DBUS_SESSION_BUS_ADDRESS"] = bus.stdout.readline().decode().strip()
        self.procs.append(subprocess.Popen(
            ["trayer", "--edge", "top", "--align", "right", "--widthtype", "pixel",
             "--width", "64", "--heighttype", "pixel", "--height", "32", "--expand", "false",
             "--transparent", "false"],
            env={**os.environ, **self.env}, stderr=subprocess.DEVNULL))
        wait_for(self._tray_manager_running, 15, "trayer to own the system tray selection")

    def _tray_manager_running(self) -> bool:
        # An icon started before any tray manager owns the selection may never dock.
        from Xlib import X, display

        connection = display.Display(self.display)
        try:
            atom = connection.intern_atom("_NET_SYSTEM_TRAY_S0")
            return bool(connection.get_selection_owner(atom) != X.NONE)
        finally:
            connection.close()

    def start_notification_server(self, script: Path, log: Path) -> None:
        """Own org.freedesktop.Notifications on the session bus, logging each Notify call."""
        script.write_text(NOTIFICATION_SERVER, encoding="utf-8")
        server = subprocess.Popen([sys.executable, str(script), str(log)],
                                  env={**os.environ, **self.env}, stdout=subprocess.PIPE)
        self.procs.append(server)
        assert server.stdout is not None
        if server.stdout.readline().strip() != b"ready":
            raise AssertionError("the notification server did not start")

    def screenshot(self, path: Path) -> Image.Image:
        subprocess.run(["import", "-window", "root", str(path)], env={**os.environ, **self.env},
                       check=True, timeout=30, capture_output=True)
        with Image.open(path) as image:
            return image.convert("RGB")

    def xdotool(self, *args: str) -> None:
        subprocess.run(["xdotool", *args], env={**os.environ, **self.env}, check=True,
                       timeout=10, capture_output=True)

    def close(self) -> None:
        for proc in reversed(self.procs):
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


@pytest.fixture
def xsession(tmp_path: Path) -> Iterator[XSession]:
    missing = [tool for tool in TRAY_TOOLS if shutil.which(tool) is None]
    if missing:
        if os.environ.get("CI") == "true":
            pytest.fail(f"missing {', '.join(missing)}; .ci/setup installs them")
        pytest.skip(f"needs {', '.join(missing)} (installed by .ci/setup)")
    pytest.importorskip("gi", reason="needs PyGObject (the tray extra)")
    session = XSession(tmp_path)
    yield session
    session.close()


def colour_counts(image: Image.Image) -> dict[TrayState, list[tuple[int, int]]]:
    """Find the pixels of each state's fill colour (within a small tolerance)."""
    found: dict[TrayState, list[tuple[int, int]]] = {state: [] for state in TrayState}
    width, height = image.size
    pixels = image.load()
    assert pixels is not None
    for y in range(height):
        for x in range(width):
            r, g, b = pixels[x, y]
            for state, (cr, cg, cb) in COLOURS.items():
                if abs(r - cr) <= 6 and abs(g - cg) <= 6 and abs(b - cb) <= 6:
                    found[state].append((x, y))
    return found


class TrayWatcher:
    """Takes screenshots until the icon shows a state; keeps each state's screenshot."""

    def __init__(self, session: XSession, folder: Path) -> None:
        self.session = session
        self.folder = folder
        self.shots = 0
        self.position: tuple[int, int] | None = None

    def wait_gone(self, timeout: float) -> None:
        """Wait until no state colour is on screen (the icon left the tray)."""
        wait_for(lambda: max(len(v) for v in colour_counts(self.session.screenshot(
            self.folder / "gone.png")).values()) < 40, timeout, "the icon to disappear")
        (self.folder / "gone.png").unlink()

    def wait_state(self, state: TrayState, timeout: float) -> Path:
        deadline = time.monotonic() + timeout
        seen: TrayState | None = None
        while True:
            self.shots += 1
            path = self.folder / f"{self.shots:03d}-{state.value}.png"
            counts = colour_counts(self.session.screenshot(path))
            best = max(counts, key=lambda s: len(counts[s]))
            if len(counts[best]) >= 40:
                seen = best
                if best == state:
                    xs = [x for x, _ in counts[best]]
                    ys = [y for _, y in counts[best]]
                    self.position = (sum(xs) // len(xs), sum(ys) // len(ys))
                    return path
            path.unlink()
            if time.monotonic() > deadline:
                raise AssertionError(f"tray icon did not show {state} within {timeout:.0f} s; "
                                     f"last seen: {seen}")
            time.sleep(0.3)


def start_tray(home: DaemonHome, session: XSession, log: Path) -> subprocess.Popen[bytes]:
    env = {**home.env, **session.env}
    with log.open("ab") as stderr:
        return subprocess.Popen(home.command("-v", "tray", "--backend", "gtk"), env=env,
                                stderr=stderr, stdout=subprocess.DEVNULL)


def open_menu(session: XSession, watcher: TrayWatcher, screenshot: Path) -> None:
    """Right-click the icon where the last screenshot found it, and keep a screenshot."""
    assert watcher.position is not None
    x, y = watcher.position
    session.xdotool("mousemove", str(x), str(y), "click", "3")

    def menu_shown() -> bool:
        # The root window is black and trayer sits in the top 32 rows, so light pixels below
        # them belong to the menu.
        below = session.screenshot(screenshot).crop((0, 40, *SCREEN)).convert("L")
        return below.point(lambda v: 255 if v > 150 else 0).histogram()[255] > 3000

    wait_for(menu_shown, 10, "the tray menu to open")


def summarize_files(home: DaemonHome, files: list[Path]) -> None:
    with home.client() as client:
        for path in files:
            client.call("summarize", {"path": str(path)})


def test_tray_icon_follows_daemon(daemon_home: DaemonHome, xsession: XSession,
                                  tmp_path: Path, model_path: Path) -> None:
    folder = artifacts_dir(tmp_path)
    watcher = TrayWatcher(xsession, folder)
    tray_log = folder / "tray.log"
    notifications = tmp_path / "notifications.txt"
    xsession.start_notification_server(tmp_path / "notification_server.py", notifications)
    daemon_home.write_config(extra="\n[tray]\nnotify_summaries = true\n")
    tray = start_tray(daemon_home, xsession, tray_log)
    try:
        watcher.wait_state(TrayState.NOT_RUNNING, 30)

        daemon_home.start()
        watcher.wait_state(TrayState.IDLE, 30)

        documents = []
        for name in ("crazy-ones.txt", "lorem-ipsum.txt"):
            for copy in range(2):
                target = tmp_path / f"{copy}-{name}"
                target.write_text(f"Copy {copy}.\n" + (CORPUS / "documents" / name).read_text(
                    encoding="utf-8"), encoding="utf-8")
                documents.append(target)
        summarize_files(daemon_home, documents)
        watcher.wait_state(TrayState.WORKING, 30)
        watcher.wait_state(TrayState.IDLE, 300)
        wait_for(lambda: notifications.exists() and len(
            notifications.read_text(encoding="utf-8").splitlines()) >= len(documents), 10,
            "a notification per summary")
        titles = sorted(line.split("\t")[0] for line in
                        notifications.read_text(encoding="utf-8").splitlines())
        assert titles == sorted(f"Summary ready: {d.name}" for d in documents)

        # Pause through the real menu: its second entry.
        open_menu(xsession, watcher, folder / "menu.png")
        xsession.xdotool("key", "Down", "Down", "Return")
        wait_for(lambda: daemon_home.status()["paused"], 10, "pause from the tray menu")
        watcher.wait_state(TrayState.PAUSED, 30)
        with daemon_home.client() as client:
            client.call("resume")
        watcher.wait_state(TrayState.IDLE, 30)

        daemon_home.stop()
        watcher.wait_state(TrayState.NOT_RUNNING, 30)

        # The tray reconnects to the next daemon, here one whose model file is missing.
        daemon_home.model_path = tmp_path / "missing.gguf"
        daemon_home.write_config()
        daemon_home.start(wait_model=False)
        watcher.wait_state(TrayState.NO_MODEL, 30)
        daemon_home.stop()

        # An NPU whose load hangs (the model host's test seam for devices this machine
        # lacks) keeps the model in its loading state until the daemon stops.
        daemon_home.model_path = model_path
        daemon_home.env[DEVICE_FAULTS_ENV] = "NPU=hang"
        daemon_home.write_config(extra='devices = ["NPU", "CPU"]\nload_timeout_s = 600.0\n')
        daemon_home.start(wait_model=False)
        watcher.wait_state(TrayState.LOADING, 30)
        daemon_home.stop()
        del daemon_home.env[DEVICE_FAULTS_ENV]

        broken = tmp_path / "broken.gguf"
        broken.write_bytes(b"GGUF" + os.urandom(4096))
        daemon_home.model_path = broken
        daemon_home.write_config()
        daemon_home.start()
        watcher.wait_state(TrayState.ERROR, 60)
        assert tray.poll() is None, "the tray exited while the daemon restarted"

        # Stop the daemon, then quit the tray, through the menu's last two entries.
        open_menu(xsession, watcher, folder / "menu-stop.png")
        xsession.xdotool("key", "Up", "Up", "Return")
        assert daemon_home.proc is not None
        daemon_home.proc.wait(15)
        watcher.wait_state(TrayState.NOT_RUNNING, 30)
        open_menu(xsession, watcher, folder / "menu-quit.png")
        xsession.xdotool("key", "Up", "Return")
        assert tray.wait(15) == 0
    finally:
        if tray.poll() is None:
            tray.send_signal(signal.SIGTERM)
        try:
            tray.wait(10)
        except subprocess.TimeoutExpired:
            tray.kill()
            tray.wait(5)
    log = tray_log.read_text(encoding="utf-8", errors="replace")
    assert "backend=pystray._gtk menu=True" in log


def test_tray_backend_choice(xsession: XSession, tmp_path: Path) -> None:
    """The default backend has a menu; without a session bus the tray falls back to xorg."""
    folder = artifacts_dir(tmp_path)
    watcher = TrayWatcher(xsession, folder)
    base = {**os.environ, **xsession.env, "HOME": str(tmp_path),
            "XDG_RUNTIME_DIR": str(tmp_path / "run")}
    (tmp_path / "run").mkdir(mode=0o700)
    no_bus = {k: v for k, v in base.items() if k != "DBUS_SESSION_BUS_ADDRESS"}
    for name, env, expected in (("default", base, "menu=True"),
                                ("no-bus", no_bus, "backend=pystray._xorg menu=False")):
        log = folder / f"tray-{name}.log"
        with log.open("wb") as stderr:
            tray = subprocess.Popen([sys.executable, "-m", "famulus.daemon.cli", "-v", "tray"],
                                    env=env, stderr=stderr, stdout=subprocess.DEVNULL)
        try:
            wait_for(lambda log=log: "tray state: not_running" in log.read_text(), 30,
                     f"the {name} tray to start")
            if name == "default":
                watcher.wait_state(TrayState.NOT_RUNNING, 30)
                # NOTE: the xorg icon is not checked on screen: with pystray 0.19.5 it stayed
                # blank in about one start of three on a loaded 2-core machine.
            assert tray.poll() is None
        finally:
            tray.terminate()
            tray.wait(10)
        if name == "default":
            watcher.wait_gone(10)
        text = log.read_text(encoding="utf-8", errors="replace")
        assert expected in text, text
        warnings = [line for line in text.splitlines() if "WARNING" in line]
        if name == "no-bus":
            assert len(warnings) == 1, warnings
            assert "no D-Bus session bus" in warnings[0]
        else:
            assert warnings == []
