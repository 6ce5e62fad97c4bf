"""Shared fixtures: the real default model and real daemons in throwaway homes."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings

from famulus.daemon.demo import isolated_env
from famulus.daemon.model.registry import ModelNotFound, pull, resolve
from famulus.daemon.paths import user_paths
from famulus.ipc.client import Client, DaemonUnavailable, Subscriber
from famulus.ipc.protocol import Event

# CI runs the same examples every time, so a failure there is reproducible and not a
# matter of luck; local runs keep exploring new examples.
settings.register_profile("ci", derandomize=True)
if os.environ.get("CI") == "true":
    settings.load_profile("ci")

CORPUS = Path(__file__).parent / "corpus"


@pytest.fixture(scope="session")
def model_path() -> Path:
    """Return the default model's GGUF file, pulling it once if it is not registered."""
    models_dir = user_paths().models_dir
    try:
        return resolve(models_dir, "smollm2-135m-instruct", "")
    except ModelNotFound:
        return pull(models_dir)


def wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll `predicate` until it returns a true value; fail the test after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


class EventLog:
    """Collects every event of a daemon on a background SUB socket (with replay)."""

    def __init__(self, runtime: Path) -> None:
        self.events: list[Event] = []
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._runtime = runtime
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        client = Client(f"ipc://{self._runtime / 'requests.sock'}", timeout_s=5)
        with Subscriber(endpoint=f"ipc://{self._runtime / 'events.sock'}",
                        requests_endpoint=client.endpoint) as sub:
            try:
                for event in sub.follow(since=0, client=client, idle_timeout_s=0.2):
                    self._add(event)
            except DaemonUnavailable:
                return
            while not self._stop.is_set():
                event = sub.recv(timeout_s=0.2)
                if event is not None:
                    self._add(event)
        client.close()

    def _add(self, event: Event) -> None:
        with self._cond:
            self.events.append(event)
            self._cond.notify_all()

    def wait(self, match: Callable[[Event], bool], timeout: float, what: str) -> Event:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for event in self.events:
                    if match(event):
                        return event
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    seen = [(e.topic, e.body.get("path")) for e in self.events[-15:]]
                    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; "
                                         f"last events: {seen}")
                self._cond.wait(remaining)

    def matching(self, topic: str, **body: Any) -> list[Event]:
        with self._cond:
            return [e for e in self.events if e.topic == topic
                    and all(e.body.get(k) == v for k, v in body.items())]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


class DaemonHome:
    """A throwaway home with a config, and `famulus run` processes started in it."""

    def __init__(self, root: Path, model_path: Path, **config: Any) -> None:
        self.root = root
        self.env = isolated_env(root)
        self.inbox = root / "inbox"
        self.config_file = root / "config.toml"
        self.runtime = root / "run" / "famulus"
        self.database = root / "data" / "famulus" / "famulus.db"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log: EventLog | None = None
        self.stderr_path = root / "daemon.log"
        self.model_path = model_path
        # Put before `famulus run`, e.g. to start the daemon in its own user namespace.
        self.prefix: list[str] = []
        self.write_config(**config)

    def write_config(self, quiet_period_s: float = 0.4, max_new_tokens: int = 48,
                     extra: str = "") -> None:
        self.config_file.write_text(textwrap.dedent(f"""\
            [watch]
            folders = [{str(self.inbox)!r}]
            quiet_period_s = {quiet_period_s}

            [model]
            path = {str(self.model_path)!r}
            max_new_tokens = {max_new_tokens}
            """) + extra, encoding="utf-8")

    def command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "famulus.daemon.cli", "--config", str(self.config_file),
                *args]

    def start(self, wait_model: bool = True) -> subprocess.Popen[bytes]:
        with self.stderr_path.open("ab") as log:
            proc = subprocess.Popen(self.prefix + self.command("run"), env=self.env, stderr=log,
                                    stdout=subprocess.DEVNULL)
        self.proc = proc
        client = self.client()
        wait_for(lambda: self._status_or_exit(client, proc), 60, "the daemon to run")
        self.log = EventLog(self.runtime)
        if wait_model:
            wait_for(lambda: client.call("status")["model"]["state"] in ("loaded", "failed"),
                     120, "the model to load")
        client.close()
        return proc

    @staticmethod
    def _status_or_exit(client: Client, proc: subprocess.Popen[bytes]) -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"daemon exited during start-up with code {proc.returncode}")
        try:
            return client.call("status", timeout_s=0.5)["state"] == "running"
        except DaemonUnavailable:
            return False

    def client(self) -> Client:
        return Client(f"ipc://{self.runtime / 'requests.sock'}", timeout_s=10)

    def status(self) -> dict[str, Any]:
        with self.client() as client:
            return client.call("status")

    def db(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.database, timeout=10)
        conn.row_factory = sqlite3.Row
        return conn

    def rows(self, sql: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        conn = self.db()
        try:
            return conn.execute(sql, params).fetchall()
        finally:
            conn.close()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> float:
        """Signal the daemon and return how long it took to exit."""
        if self.log is not None:
            self.log.close()
            self.log = None
        if self.proc is None or self.proc.poll() is not None:
            return 0.0
        started = time.monotonic()
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise AssertionError(
                f"daemon did not exit within {timeout} s of signal {sig}") from None
        return time.monotonic() - started

    def stderr(self) -> str:
        return self.stderr_path.read_text(encoding="utf-8", errors="replace")


def processes_with_home(home: Path) -> list[int]:
    """List the PIDs of live processes whose environment has HOME=`home`."""
    marker = f"HOME={home}".encode() + b"\0"
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if marker in environ and pid_alive(int(entry.name)):
            pids.append(int(entry.name))
    return pids


@pytest.fixture
def daemon_home(tmp_path: Path, model_path: Path) -> Iterator[DaemonHome]:
    home = DaemonHome(tmp_path, model_path)
    yield home
    home.stop()
    # Every process the daemon started (model host and anything it forked) must be gone.
    leftovers = wait_for_none(lambda: processes_with_home(tmp_path), 10)
    for pid in leftovers:
        os.kill(pid, signal.SIGKILL)
    assert not leftovers, f"processes left behind by the daemon: {leftovers}"


def wait_for_none(probe: Callable[[], list[int]], timeout: float) -> list[int]:
    """Poll `probe` until it returns an empty list or `timeout` passes; return the last."""
    deadline = time.monotonic() + timeout
    while (found := probe()) and time.monotonic() < deadline:
        time.sleep(0.1)
    return found


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # kill(0) succeeds for a zombie too, so its state is read to tell it apart.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def stop_process(pid: int, timeout: float = 10) -> None:
    """Send SIGSTOP and wait until every thread of `pid` is stopped.

    The stop takes effect per thread as each one next enters the kernel, so a request sent
    right after kill() could still be served by a thread that was running.
    """
    os.kill(pid, signal.SIGSTOP)

    def all_stopped() -> bool:
        states = []
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                states.append((task / "stat").read_text().rsplit(")", 1)[1].split()[0])
            except OSError:
                continue  # the thread ended meanwhile
        return bool(states) and all(state in ("T", "t") for state in states)
    wait_for(all_stopped, timeout, f"every thread of pid {pid} to stop")
