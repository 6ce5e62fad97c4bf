"""The daemon's lifecycle: single instance, start-up in order, staged shutdown.

Start-up: lock, store, bus, model host and dispatcher, plugins. Shutdown runs the stages in
reverse, each with its own timeout, and logs what is still running when one overruns.
"""

from __future__ import annotations

import enum
import fcntl
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from importlib.metadata import PackageNotFoundError, entry_points, version
from pathlib import Path
from typing import IO, Any

from famulus.daemon import documents
from famulus.daemon.config import Config, ConfigError, describe, load_config, settings
from famulus.daemon.desktop import DesktopGate
from famulus.daemon.dispatcher import Dispatcher
from famulus.daemon.documents import FileInfo
from famulus.daemon.handlers import make_handlers
from famulus.daemon.journal import recover_interrupted
from famulus.daemon.model.registry import ModelNotFound, resolve
from famulus.daemon.model.supervisor import ModelHost
from famulus.daemon.paths import UserPaths, ensure_private_dir
from famulus.daemon.sdnotify import SystemdNotifier
from famulus.daemon.store import Store
from famulus.ipc.protocol import Topic
from famulus.ipc.security import KeyStore
from famulus.ipc.server import BusServer, TcpEndpoints
from famulus.plugins.api import ENTRY_POINT_GROUP, Plugin

logger = logging.getLogger(__name__)


# Model keys that only shape the next generation; the others need a model reload.
LIVE_MODEL_KEYS = ("model.max_prompt_tokens", "model.max_new_tokens",
                   "model.repetition_penalty", "model.generation_timeout_s")


def _value(config: Config, key: str) -> Any:
    section, name = key.split(".")
    return getattr(getattr(config, section), name)


class DaemonState(enum.StrEnum):
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"


class AlreadyRunning(Exception):
    """Another famulus daemon of this user holds the instance lock."""

    def __init__(self, pid: int | None, lock_file: Path) -> None:
        owner = f"PID {pid}" if pid else "an unknown PID"
        super().__init__(f"famulus is already running ({owner}, lock {lock_file}); stop it "
                         "with `famulus stop` or `kill -TERM <pid>` first")
        self.pid = pid


def famulus_version() -> str:
    try:
        return version("famulus")
    except PackageNotFoundError:
        return "unknown"


class InstanceLock:
    """An exclusive flock on the runtime directory's lock file, holding our PID."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: IO[str] | None = None

    def acquire(self) -> None:
        f = open(self.path, "a+", encoding="ascii")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            text = f.read().strip()
            f.close()
            raise AlreadyRunning(int(text) if text.isdigit() else None, self.path) from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        self._file = f

    def release(self) -> None:
        if self._file is not None:
            self.path.unlink(missing_ok=True)
            self._file.close()
            self._file = None


class PluginHost:
    """The narrow context handed to plugins, bound to one plugin's name."""

    def __init__(self, daemon: Daemon, name: str) -> None:
        self._daemon = daemon
        self.config = daemon.config
        self.logger = logging.getLogger(f"famulus.plugins.{name}")
        self.data_dir = daemon.paths.data_dir / "plugins" / name

    def submit_file(self, path: Path, cause: str | None = None) -> int | None:
        try:
            info = FileInfo.of(path)
        except OSError:
            return None
        job = self._daemon.store.call(lambda tx: documents.submit_file(tx, info, cause=cause))
        self._daemon.wake_dispatcher()
        return job

    def file_removed(self, path: Path) -> None:
        self._daemon.store.call(lambda tx: documents.mark_removed(tx, str(path)))

    def is_settled(self, path: Path, size: int, mtime: float) -> bool:
        row = documents.get_by_path(self._daemon.store.read(), str(path))
        return documents.is_settled(row, FileInfo(str(path), size, mtime))

    def known_paths_under(self, folder: Path) -> list[str]:
        rows = self._daemon.store.query(
            "SELECT path FROM documents WHERE path LIKE ? AND state != 'removed'",
            (str(folder).rstrip("/") + "/%",))
        return [row["path"] for row in rows]

    def publish(self, topic: str, body: dict[str, Any], cause: str | None = None) -> None:
        self._daemon.store.submit(lambda tx: tx.emit(topic, body, cause))


def load_plugins() -> list[Plugin]:
    """Instantiate every plugin registered under the `famulus.plugins` entry points."""
    plugins: list[Plugin] = []
    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        try:
            plugin = ep.load()()
        except Exception:
            logger.exception("plugin failed to load and is disabled: plugin=%s", ep.name)
            continue
        if not isinstance(plugin, Plugin):
            logger.error("plugin %s (%s) lacks name/start/stop and is disabled", ep.name,
                         ep.value)
            continue
        plugins.append(plugin)
    return plugins


class Daemon:
    def __init__(self, config: Config, paths: UserPaths) -> None:
        self.config = config
        self.paths = paths
        self.version = famulus_version()
        self.state = DaemonState.STARTING
        self.store: Store = None  # type: ignore[assignment]
        self.bus: BusServer | None = None
        self.model: ModelHost | None = None
        self.dispatcher: Dispatcher | None = None
        self.plugins: list[Plugin] = []
        self._lock = InstanceLock(paths.lock_file)
        self._stop_requested = threading.Event()
        self._purge_timer: threading.Timer | None = None
        self.paused = False
        self._started_at = time.monotonic()
        self.notifier = SystemdNotifier()
        self.desktop = DesktopGate(config.daemon.desktop_retry_s, self._start_waiting_plugin)

    def uptime_s(self) -> float:
        return time.monotonic() - self._started_at

    def request_stop(self) -> None:
        self._stop_requested.set()

    def reload(self) -> dict[str, list[str]]:
        """Read the config file again and apply what can change while running.

        Generation, grounding and job settings apply to the next job; watch settings restart
        the plugins. Model, bus and daemon settings need a restart and are only reported.
        Raises ConfigError for an invalid file, leaving the running config unchanged.
        """
        source = None if self.config.source == "defaults" else self.config.source
        new = load_config(self.paths, source)
        changed = [key for key, _, _ in settings() if _value(self.config, key) != _value(new, key)]
        live = [k for k in changed if k.split(".")[0] in ("grounding", "jobs", "watch")
                or k in LIVE_MODEL_KEYS]
        restart = [k for k in changed if k not in live]
        # Keys that need a restart keep their old values until then.
        applied = replace(new, model=replace(self.config.model, **{
            k.split(".")[1]: _value(new, k) for k in LIVE_MODEL_KEYS}),
            bus=self.config.bus, daemon=self.config.daemon)
        self.config = applied
        if self.dispatcher is not None:
            self.dispatcher.config = applied
        if any(k.startswith("watch.") for k in live):
            self._restart_plugins()
        self.store.call(lambda tx: tx.emit(Topic.CONFIG_RELOADED, {
            "applied": live, "restart_required": restart}))
        logger.info("config reloaded: applied=%s restart_required=%s", live, restart)
        return {"applied": live, "restart_required": restart}

    def _restart_plugins(self) -> None:
        timeout = self.config.daemon.shutdown_timeout_s * 0.2
        for plugin in self.plugins:
            try:
                plugin.stop(timeout)
            except Exception:
                logger.exception("plugin failed to stop for a reload: plugin=%s", plugin.name)
        self.plugins = []
        self.desktop.close()
        self.desktop.reopen()
        for plugin in load_plugins():
            self._start_plugin(plugin)
        if self.paused:
            self.paused = False
            self.set_paused(True)

    def set_paused(self, paused: bool) -> None:
        """Pause or resume every plugin that supports it, and announce the change."""
        if paused == self.paused:
            return
        self.paused = paused
        for plugin in self.plugins:
            method = getattr(plugin, "pause" if paused else "resume", None)
            if method is None:
                continue
            try:
                method()
            except Exception:
                logger.exception("plugin failed to %s: plugin=%s",
                                 "pause" if paused else "resume", plugin.name)
        topic = Topic.WATCH_PAUSED if paused else Topic.WATCH_RESUMED
        self.store.call(lambda tx: tx.emit(topic, {"plugins": [p.name for p in self.plugins]}))
        logger.info("watchers %s", "paused" if paused else "resumed")

    def wake_dispatcher(self) -> None:
        if self.dispatcher is not None:
            self.dispatcher.wake()

    def model_status(self) -> dict[str, Any]:
        dispatcher = self.dispatcher
        if self.model is None:
            return {"state": "missing", "error": dispatcher.model_error if dispatcher else None}
        s = self.model.state
        return {"state": s.state, "name": self.config.model.name, "path": s.model,
                "device": s.device, "load_s": s.load_s, "error": s.error,
                "device_errors": s.device_errors, "restarts": s.restarts, "pid": s.pid}

    # -- start-up ---------------------------------------------------------------------------

    def start(self) -> None:
        ensure_private_dir(self.paths.runtime_dir)
        self._lock.acquire()
        logger.info("famulus %s starting: pid=%d config=%s", self.version, os.getpid(),
                    self.config.source)
        logger.info("effective config: %s", " ".join(describe(self.config)))
        if not self.config.watch.folders:
            logger.warning("watch.folders is empty: no folder is watched; only requests "
                           "over the bus are served")
        self.store = Store(self.paths.database)
        self._purge_events()
        recovered = self.store.call(recover_interrupted)
        if recovered:
            logger.warning("queued %d job(s) again that a crash left running", recovered)
        self.bus = BusServer(self.paths.events_endpoint, self.paths.requests_endpoint,
                             make_handlers(self),
                             max_message_bytes=self.config.bus.max_message_bytes,
                             tcp=self._tcp_endpoints())
        self.store.on_commit = self.bus.publish
        self.bus.start()
        logger.info("bus ready: events=%s requests=%s", self.paths.events_endpoint,
                    self.paths.requests_endpoint)
        self._start_model()
        for plugin in load_plugins():
            self._start_plugin(plugin)
        # Running only once the watchers run: a client that waits for this state can drop
        # files into a watched folder right away (the folder exists by then).
        self.state = DaemonState.RUNNING
        self.store.call(lambda tx: tx.emit(Topic.DAEMON_STARTED, {
            "pid": os.getpid(), "version": self.version, "recovered_jobs": recovered}))
        self._notify_systemd_ready()

    def _notify_systemd_ready(self) -> None:
        """Tell systemd (under a `Type=notify` unit) that the daemon serves, and start pings."""
        self.notifier.ready(f"running; model {self.model_status()['state']}")

        def healthy() -> bool:
            # A round trip through the store's writer thread: a wedged writer stops the pings.
            self.store.call(lambda tx: None, 5.0)
            return self.state == DaemonState.RUNNING

        self.notifier.start_watchdog(healthy)

    def _purge_events(self) -> None:
        """Delete events past the retention period, then schedule the next purge a day later."""
        days = self.config.bus.event_retention_days
        if days <= 0 or self.state in (DaemonState.STOPPING, DaemonState.STOPPED):
            return
        cutoff = time.time() - days * 86400
        try:
            deleted = self.store.call(lambda tx: tx.execute(
                "DELETE FROM events WHERE ts < ?", (cutoff,)).rowcount)
        except Exception:
            logger.exception("purging old events failed; retrying in a day")
            deleted = 0
        if deleted:
            logger.info("event log: deleted %d event(s) older than %g days", deleted, days)
        timer = threading.Timer(86400, self._purge_events)
        timer.daemon = True
        timer.start()
        self._purge_timer = timer

    def _tcp_endpoints(self) -> TcpEndpoints | None:
        cfg = self.config.bus
        if not cfg.tcp_requests and not cfg.tcp_events:
            return None
        if not (cfg.tcp_requests and cfg.tcp_events):
            raise ConfigError("bus.tcp_requests and bus.tcp_events must be set together "
                              "(two ports), or both left empty")
        keys = KeyStore.default().folder if cfg.curve else None
        return TcpEndpoints(events=cfg.tcp_events, requests=cfg.tcp_requests, keys_folder=keys)

    def _start_model(self) -> None:
        cfg = self.config.model
        error = None
        try:
            path = resolve(self.paths.models_dir, cfg.name, cfg.path)
            self.model = ModelHost({
                "path": str(path), "devices": list(cfg.devices),
                "cache_dir": str(self.paths.cache_dir / "compiled"),
                "npu_max_prompt_len": cfg.npu_max_prompt_len,
                "npu_min_response_len": cfg.npu_min_response_len,
                "load_timeout_s": cfg.load_timeout_s,
            }, backoff_s=self.config.jobs.restart_backoff_s)
        except ModelNotFound as exc:
            error = str(exc)
        # Summaries record the model by name; a configured path is recorded by file name.
        name = Path(cfg.path).name if cfg.path else cfg.name
        self.dispatcher = Dispatcher(self.config, self.store, self.model, name,
                                     model_error=error)
        self.dispatcher.start()

    def _start_plugin(self, plugin: Plugin) -> None:
        # A plugin with `needs_desktop = True` waits for a desktop session; the gate calls
        # this method again once one appears.
        if not self.desktop.admit(plugin):
            return
        try:
            plugin.start(PluginHost(self, plugin.name))
        except Exception:
            logger.exception("plugin failed to start and is disabled: plugin=%s", plugin.name)
            return
        self.plugins.append(plugin)
        logger.info("plugin started: plugin=%s", plugin.name)

    def _start_waiting_plugin(self, plugin: Plugin) -> None:
        """Start a plugin that waited for a desktop session, paused if the watchers are."""
        # NOTE: this runs on the desktop gate's timer thread, not under a lock shared with
        # pause, resume and reload requests.
        self._start_plugin(plugin)
        pause = getattr(plugin, "pause", None)
        if self.paused and plugin in self.plugins and pause is not None:
            pause()

    # -- running and shutdown ---------------------------------------------------------------

    def run_until_stopped(self) -> None:
        """Block until SIGINT, SIGTERM or a `shutdown` request, then shut down in stages."""
        previous = {sig: signal.signal(sig, self._on_signal)
                    for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            while not self._stop_requested.wait(3600):
                pass
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.shutdown()

    def _on_signal(self, signum: int, _frame: object) -> None:
        logger.info("received %s; shutting down", signal.Signals(signum).name)
        self._stop_requested.set()

    def shutdown(self) -> None:
        if self.state in (DaemonState.STOPPING, DaemonState.STOPPED):
            return
        self.state = DaemonState.STOPPING
        self.notifier.stopping()
        if self._purge_timer is not None:
            self._purge_timer.cancel()
        self.desktop.close()
        budget = self.config.daemon.shutdown_timeout_s
        started = time.monotonic()
        if self.store is not None:
            self._stage("announce", lambda t: self.store.call(
                lambda tx: tx.emit(Topic.DAEMON_STOPPING, {"pid": os.getpid()}), t), 0.5)
        for plugin in self.plugins:
            self._stage(f"plugin {plugin.name}", plugin.stop, budget * 0.2)
        if self.dispatcher is not None:
            self._stage("dispatcher", self.dispatcher.stop, budget * 0.3)
        if self.model is not None:
            self._stage("model host", self.model.stop, budget * 0.2)
        if self.store is not None:
            self._stage("store", self.store.close, budget * 0.2)
        if self.bus is not None:
            self._stage("bus", self.bus.stop, budget * 0.1)
        self.notifier.stop()
        self._lock.release()
        self.state = DaemonState.STOPPED
        logger.info("famulus stopped in %.2f s", time.monotonic() - started)

    def _stage(self, name: str, fn: Callable[[float], object], timeout: float) -> None:
        started = time.monotonic()
        try:
            fn(timeout)
        except Exception:
            logger.exception("shutdown stage failed: stage=%s", name)
        elapsed = time.monotonic() - started
        if elapsed > timeout:
            logger.warning("shutdown stage overran: stage=%s elapsed=%.2fs timeout=%.2fs",
                           name, elapsed, timeout)
