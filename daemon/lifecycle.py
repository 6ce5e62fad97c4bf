"""The daemon's lifecycle: single instance, start-up in order, staged shutdown.

Start-up: lock, store, bus, model host and dispatcher, plugins. Shutdown runs the stages in
reverse, each with its own timeout, and logs what is still running when one overruns.
"""

from __future__ import annotations

import enum
import fcntl
import logging
import os
import select
import signal
import threading
import time
import types
from collections.abc import Callable
from dataclasses import replace
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import IO, Any

from famulus.daemon import image_jobs
from famulus.daemon.config import Config, ConfigError, describe, load_config, settings
from famulus.daemon.desktop import DesktopGate
from famulus.daemon.dispatcher import Dispatcher
from famulus.daemon.handlers import make_handlers
from famulus.daemon.journal import Lane, recover_interrupted
from famulus.daemon.model import catalog
from famulus.daemon.model.catalog import ModelSpec
from famulus.daemon.model.registry import ModelNotFound
from famulus.daemon.model.supervisor import ModelHost
from famulus.daemon.paths import UserPaths, ensure_private_dir
from famulus.daemon.plugin_host import PluginHost, PluginRecord
from famulus.daemon.power import PowerMonitor, PowerSource, PowerState, psutil_source
from famulus.daemon.retention import purge_expired
from famulus.daemon.scheduler import Scheduler
from famulus.daemon.sdnotify import SystemdNotifier
from famulus.daemon.store import Store
from famulus.daemon.video.supervisor import VideoSupervisor
from famulus.ipc.protocol import Event, Topic
from famulus.ipc.security import KeyStore
from famulus.ipc.server import BusServer, TcpEndpoints

logger = logging.getLogger(__name__)


# Model keys that only shape the next generation; the others need a model reload.
LIVE_MODEL_KEYS = ("model.max_prompt_tokens", "model.max_new_tokens",
                   "model.repetition_penalty", "model.generation_timeout_s",
                   "model.vision_max_side_px", "model.vision_max_pixels")


def _reload_model_tables(old: Config, new: Config
                         ) -> tuple[types.MappingProxyType[str, Any], list[str], list[str]]:
    """Split changed `[models.NAME]` tables into live ones (only generation keys changed)
    and ones that need a restart; return the tables to apply and both lists."""
    live_keys = {k.split(".")[1] for k in LIVE_MODEL_KEYS}
    tables, live, restart = dict(old.models), [], []
    for name in sorted(set(old.models) | set(new.models)):
        before, after = dict(old.models.get(name, {})), dict(new.models.get(name, {}))
        if before == after:
            continue
        keys = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
        if keys <= live_keys:
            live.append(f"models.{name}")
            tables[name] = new.models.get(name, types.MappingProxyType({}))
        else:
            restart.append(f"models.{name}")
    return types.MappingProxyType(tables), live, restart


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


class Daemon:
    def __init__(self, config: Config, paths: UserPaths,
                 power_source: PowerSource = psutil_source) -> None:
        self.config = config
        self.paths = paths
        self.version = famulus_version()
        self.state = DaemonState.STARTING
        self.store: Store = None  # type: ignore[assignment]
        self.bus: BusServer | None = None
        self.model: ModelHost | None = None
        self.model_spec: ModelSpec | None = None
        self.dispatcher: Dispatcher | None = None
        self.plugin_host: PluginHost | None = None
        self.scheduler = Scheduler(config.schedule.misfire_grace_s)
        self.power = PowerMonitor(power_source, self._power_changed)
        self.video: VideoSupervisor | None = None
        self._lock = InstanceLock(paths.lock_file)
        self._stop_requested = threading.Event()
        # Written to wake the main thread in run_until_stopped; None outside of it.
        self._wake_fd: int | None = None
        self.paused = False
        self._started_at = time.monotonic()
        self.notifier = SystemdNotifier()
        self.desktop = DesktopGate(config.daemon.desktop_retry_s, self._start_waiting_plugin)

    def uptime_s(self) -> float:
        return time.monotonic() - self._started_at

    def request_stop(self) -> None:
        self._stop_requested.set()
        wake = self._wake_fd
        if wake is not None:
            try:
                os.write(wake, b"\0")
            except OSError:
                pass  # the pipe is full, so the main thread is awake already, or closed

    def reload(self) -> dict[str, list[str]]:
        """Read the config file again and apply what can change while running.

        Generation, grounding and job settings apply to the next job. Watch settings and
        changed `[plugins.NAME]` tables restart the plugins. Model, bus, daemon, schedule and
        power settings need a restart and are only reported.
        Raises ConfigError for an invalid file, leaving the running config unchanged.
        """
        source = None if self.config.source == "defaults" else self.config.source
        new = load_config(self.paths, source)
        changed = [key for key, _, _ in settings() if _value(self.config, key) != _value(new, key)]
        live = [k for k in changed if k.split(".")[0] in ("grounding", "jobs", "watch")
                or k in LIVE_MODEL_KEYS]
        restart = [k for k in changed if k not in live]
        old_tables = self.config.plugins
        live += [f"plugins.{name}" for name in sorted(set(new.plugins) | set(old_tables))
                 if new.plugins.get(name) != old_tables.get(name)]
        models, live_tables, restart_tables = _reload_model_tables(self.config, new)
        live += live_tables
        restart += restart_tables
        # Keys that need a restart keep their old values until then.
        applied = replace(new, model=replace(self.config.model, **{
            k.split(".")[1]: _value(new, k) for k in LIVE_MODEL_KEYS}),
            bus=self.config.bus, daemon=self.config.daemon, schedule=self.config.schedule,
            power=self.config.power, video=self.config.video, models=models)
        self.config = applied
        if self.dispatcher is not None:
            self.dispatcher.config = applied
            if self.model_spec is not None:
                # Generation settings come from the model's spec: rebuild it from the new
                # values. Its path and devices only change with a restart.
                try:
                    self.dispatcher.generation = catalog.spec(
                        applied, self.paths.models_dir, self.model_spec.name)
                except ModelNotFound as exc:
                    logger.warning("generation settings not reloaded: %s", exc)
        if any(k.startswith(("watch.", "plugins.")) for k in live) and self.plugin_host:
            self.plugin_host.restart_all()
        self.store.call(lambda tx: tx.emit(Topic.CONFIG_RELOADED, {
            "applied": live, "restart_required": restart}))
        logger.info("config reloaded: applied=%s restart_required=%s", live, restart)
        return {"applied": live, "restart_required": restart}

    def set_paused(self, paused: bool, plugin: str | None = None) -> list[str]:
        """Pause or resume every plugin, or only `plugin`, and announce the change.

        Returns the names of the plugins whose state changed. Without `plugin`, `paused` in
        `status` follows the request too.
        """
        if plugin is None:
            self.paused = paused
        host = self.plugin_host
        changed = host.set_paused(paused, plugin) if host is not None else []
        if changed:
            topic = Topic.WATCH_PAUSED if paused else Topic.WATCH_RESUMED
            self.store.call(lambda tx: tx.emit(topic, {"plugins": changed}))
            logger.info("plugins %s: %s", "paused" if paused else "resumed", ", ".join(changed))
        return changed

    def _on_commit(self, events: list[Event]) -> None:
        if self.bus is not None:
            self.bus.publish(events)
        if self.plugin_host is not None:
            self.plugin_host.events.on_commit(events)

    def _power_changed(self, new: PowerState, old: PowerState | None) -> None:
        """Defer the folder backlog on battery (if configured) and announce the change."""
        defer = new.on_battery and self.config.power.defer_backlog_on_battery
        if self.dispatcher is not None:
            self.dispatcher.deferred_lanes = self._deferred_lanes()
            self.dispatcher.wake()
        for host in self._model_hosts():
            host.set_on_battery(new.on_battery)
        if old is not None or new.on_battery:
            self.store.submit(lambda tx: tx.emit(Topic.POWER_CHANGED, {
                **new.to_dict(), "backlog_deferred": defer}))

    def _deferred_lanes(self) -> frozenset[Lane]:
        state = self.power.state
        if state is not None and state.on_battery and self.config.power.defer_backlog_on_battery:
            return frozenset({Lane.DOCUMENTS})
        return frozenset()

    def power_status(self) -> dict[str, Any]:
        state = self.power.state
        on_battery = state is not None and state.on_battery
        return {**(state.to_dict() if state else {}),
                "backlog_deferred": on_battery and self.config.power.defer_backlog_on_battery,
                "keep_alive_s": self.config.power.battery_keep_alive_s if on_battery else None}

    def wake_dispatcher(self) -> None:
        if self.dispatcher is not None:
            self.dispatcher.wake()

    def _model_hosts(self) -> list[ModelHost]:
        vision = self.dispatcher.vision if self.dispatcher is not None else None
        hosts = [self.model, vision.host if vision is not None else None]
        return [h for h in hosts if h is not None]

    def vision_status(self) -> dict[str, Any] | None:
        vision = self.dispatcher.vision if self.dispatcher is not None else None
        if vision is None:
            return None
        if vision.host is None:
            return {"state": "missing", "name": vision.name, "error": vision.error}
        return {**vision.host.state.as_dict(), "name": vision.name, "kind": "vlm",
                "keep_alive_s": vision.host.keep_alive()}

    def model_status(self) -> dict[str, Any]:
        dispatcher = self.dispatcher
        if self.model is None:
            return {"state": "missing", "error": dispatcher.model_error if dispatcher else None}
        spec = self.model_spec
        return {**self.model.state.as_dict(), "name": self.config.model.name,
                "path": str(spec.path) if spec else None, "kind": spec.kind if spec else None,
                "keep_alive_s": self.model.keep_alive()}

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
        self.purge()
        recovered = self.store.call(recover_interrupted)
        if recovered:
            logger.warning("queued %d job(s) again that a crash left running", recovered)
        self.bus = BusServer(self.paths.events_endpoint, self.paths.requests_endpoint,
                             make_handlers(self),
                             max_message_bytes=self.config.bus.max_message_bytes,
                             tcp=self._tcp_endpoints())
        self.store.on_commit = self._on_commit
        self.bus.start()
        logger.info("bus ready: events=%s requests=%s", self.paths.events_endpoint,
                    self.paths.requests_endpoint)
        # Before the dispatcher starts: on battery, it must not take a document job first.
        self.power.check()
        self._start_model()
        self._start_scheduler()
        self._start_video()
        self.plugin_host = PluginHost(self)
        self.plugin_host.load()
        self.plugin_host.start_all()
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

    def purge(self) -> None:
        """Delete events and clipboard results past their retention (at start and scheduled)."""
        if self.state in (DaemonState.STOPPING, DaemonState.STOPPED):
            return
        try:
            purge_expired(self.store, self.config)
        except Exception:
            logger.exception("the retention purge failed; it runs again at the next interval")

    def _start_scheduler(self) -> None:
        cfg = self.config.schedule
        self.scheduler.add_interval("retention", self.purge, cfg.purge_interval_s)
        if self.config.power.check_interval_s > 0:
            self.scheduler.add_interval("power", self.power.check,
                                        self.config.power.check_interval_s)
        self.scheduler.start()

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
            self.model_spec = catalog.spec(self.config, self.paths.models_dir, cfg.name)
            self.model = self._model_host(self.model_spec)
        except ModelNotFound as exc:
            error = str(exc)
        # Summaries record the model by name; a configured path is recorded by file name.
        name = Path(cfg.path).name if cfg.path else cfg.name
        self.dispatcher = Dispatcher(self.config, self.store, self.model, name,
                                     model_error=error, model_spec=self.model_spec)
        self.dispatcher.deferred_lanes = self._deferred_lanes()
        image_jobs.attach(self.dispatcher, self.config, self.paths)
        state = self.power.state
        for host in self._model_hosts():
            host.set_on_battery(state is not None and state.on_battery)
        self.dispatcher.start()

    def _model_host(self, spec: ModelSpec) -> ModelHost:
        """Create a model host for `spec` whose loads, unloads and failures become bus events."""
        def emit(topic: str, body: dict[str, Any]) -> None:
            self.store.submit(lambda tx: tx.emit(topic, body))

        host = ModelHost(spec.load_params(self.paths.cache_dir), name=spec.name,
                         backoff_s=self.config.jobs.restart_backoff_s, on_event=emit,
                         keep_alive_s=spec.keep_alive_s,
                         battery_keep_alive_s=spec.battery_keep_alive_s)
        state = self.power.state
        host.set_on_battery(state is not None and state.on_battery)
        return host

    def _start_video(self) -> None:
        keys = KeyStore.default().folder if self.config.video.tcp_endpoint else None
        self.video = VideoSupervisor(self.config, self.store, self.paths.runtime_dir,
                                     self.model, keys)
        self.video.start()
        # Video jobs left queued by an earlier run start now.
        self.video.wake()

    def _start_waiting_plugin(self, record: PluginRecord) -> None:
        """Start a plugin that waited for a desktop session (on the gate's timer thread)."""
        if self.plugin_host is not None:
            self.plugin_host.start_one(record)

    # -- running and shutdown ---------------------------------------------------------------

    def run_until_stopped(self) -> None:
        """Block until SIGINT, SIGTERM or a `shutdown` request, then shut down in stages."""
        # The kernel may deliver a signal to any thread, and Python runs its handler only in
        # the main thread: a main thread asleep in a lock wait did not wake for a SIGTERM that
        # another thread took. The C handler writes every signal to the wakeup fd, and the
        # main thread sleeps in select on it, so it wakes whichever thread the signal hit.
        read_fd, write_fd = os.pipe()
        for fd in (read_fd, write_fd):
            os.set_blocking(fd, False)
        previous_wakeup = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        self._wake_fd = write_fd
        previous = {sig: signal.signal(sig, self._on_signal)
                    for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            while not self._stop_requested.is_set():
                select.select([read_fd], [], [])
                try:
                    os.read(read_fd, 512)
                except BlockingIOError:
                    pass
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            signal.set_wakeup_fd(previous_wakeup)
            self._wake_fd = None
            os.close(read_fd)
            os.close(write_fd)
            self.shutdown()

    def _on_signal(self, signum: int, _frame: object) -> None:
        logger.info("received %s; shutting down", signal.Signals(signum).name)
        self._stop_requested.set()

    def shutdown(self) -> None:
        if self.state in (DaemonState.STOPPING, DaemonState.STOPPED):
            return
        self.state = DaemonState.STOPPING
        self.scheduler.shutdown(0)
        self.notifier.stopping()
        self.desktop.close()
        budget = self.config.daemon.shutdown_timeout_s
        started = time.monotonic()
        if self.store is not None:
            self._stage("announce", lambda t: self.store.call(
                lambda tx: tx.emit(Topic.DAEMON_STOPPING, {"pid": os.getpid()}), t), 0.5)
        if self.plugin_host is not None:
            self._stage("plugins", self.plugin_host.close, budget * 0.2)
        if self.video is not None:
            self._stage("video", self.video.stop, budget * 0.2)
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
