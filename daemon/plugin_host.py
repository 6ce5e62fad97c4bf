"""Plugin supervision: loading through entry points, the context each plugin gets, restarts.

Each plugin has a record with its state (running, restarting, paused, disabled, stopped), its
failure count and its last error. A plugin that raises in `start`, in one of its threads or
in a scheduled job is stopped and started again as a new instance after a backoff that
doubles per failure in a row. After `daemon.plugin_max_failures` failures in a row it stays
disabled until the next reload or restart. The rest of the daemon keeps running throughout.
"""

from __future__ import annotations

import enum
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any

from famulus.daemon import documents, journal
from famulus.daemon.config import Config, ConfigError, parse_plugin_section
from famulus.daemon.documents import FileInfo
from famulus.daemon.journal import JobKind, Lane
from famulus.daemon.store import StorageFull
from famulus.ipc.protocol import Event, Topic
from famulus.plugins.api import ENTRY_POINT_GROUP, Plugin, TryLater

if TYPE_CHECKING:
    from famulus.daemon.lifecycle import Daemon

logger = logging.getLogger(__name__)

MAX_BACKOFF_S = 300.0
# A plugin that ran this long without failing starts counting its failures from zero again.
HEALTHY_AFTER_S = 300.0
# Lanes a plugin may submit to: video jobs are not a plugin's business.
PLUGIN_LANES = {"interactive": Lane.INTERACTIVE, "clipboard": Lane.CLIPBOARD,
                "documents": Lane.DOCUMENTS}


def check_plugin_tables(config: Config) -> list[str]:
    """Validate each `[plugins.NAME]` table against its installed plugin; list the problems."""
    problems = []
    installed = {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}
    for name in sorted(config.plugins):
        if name not in installed:
            problems.append(f"[plugins.{name}]: no plugin named {name} is installed; "
                            f"installed: {', '.join(sorted(installed))}")
    for name, ep in sorted(installed.items()):
        try:
            schema = getattr(ep.load(), "config_schema", None)
        except Exception as exc:
            problems.append(f"plugin {name} ({ep.value}) failed to load: "
                            f"{type(exc).__name__}: {exc}")
            continue
        if schema is None:
            continue
        try:
            parse_plugin_section(config, name, schema)
        except ConfigError as exc:
            problems.append(str(exc))
    return problems


class PluginState(enum.StrEnum):
    # Held back until a desktop session appears (the plugin sets `needs_desktop`).
    WAITING_FOR_DESKTOP = "waiting_for_desktop"
    STARTING = "starting"
    RUNNING = "running"
    RESTARTING = "restarting"
    DISABLED = "disabled"
    STOPPED = "stopped"


@dataclass
class PluginRecord:
    name: str
    cls: type | None
    source: str
    state: PluginState = PluginState.STOPPED
    failures: int = 0
    last_error: str | None = None
    paused: bool = False
    instance: Any = None
    # Bumped on every start; a failure report from an older instance is ignored.
    generation: int = 0
    started_at: float = 0.0
    threads: set[threading.Thread] = field(default_factory=set)
    jobs: list[str] = field(default_factory=list)
    timer: threading.Timer | None = None

    @property
    def needs_desktop(self) -> bool:
        return bool(getattr(self.cls, "needs_desktop", False))

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "state": self.state.value, "failures": self.failures,
                "last_error": self.last_error, "paused": self.paused, "source": self.source,
                "needs_desktop": self.needs_desktop}


class EventHub:
    """Hands committed events to plugin subscriptions on one thread of its own.

    The store's writer thread only queues events here, so a slow callback cannot hold up
    writes. The thread blocks on its queue: no wake-ups while nothing happens. When the queue
    is full, the batch is dropped for the subscriptions and counted.
    """

    MAX_QUEUED_BATCHES = 10_000

    def __init__(self) -> None:
        self._subs: list[tuple[str, str, Callable[[Event], None]]] = []
        self._lock = threading.Lock()
        self._queue: queue.Queue[list[Event] | None] = queue.Queue(self.MAX_QUEUED_BATCHES)
        self.dropped = 0
        self._thread = threading.Thread(target=self._run, name="plugin-events", daemon=True)
        self._thread.start()

    def subscribe(self, owner: str, topic: str, callback: Callable[[Event], None]) -> None:
        with self._lock:
            self._subs.append((owner, topic, callback))

    def drop(self, owner: str) -> None:
        with self._lock:
            self._subs = [s for s in self._subs if s[0] != owner]

    def on_commit(self, events: list[Event]) -> None:
        if not self._subs:
            return
        try:
            self._queue.put_nowait(events)
        except queue.Full:
            self.dropped += len(events)
            if self.dropped % 1000 < len(events):  # about once per thousand dropped events
                logger.warning("plugin subscriptions are too slow; %d event(s) not delivered "
                               "to them so far", self.dropped)

    def stop(self, timeout: float) -> None:
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            logger.warning("plugin event thread is busy; stopping without waiting for it")
            return
        self._thread.join(timeout)

    def _run(self) -> None:
        while (events := self._queue.get()) is not None:
            with self._lock:
                subs = list(self._subs)
            for event in events:
                for owner, topic, callback in subs:
                    if topic != event.topic:
                        continue
                    try:
                        callback(event)
                    except Exception:
                        logger.exception("plugin event callback failed: plugin=%s topic=%s "
                                         "seq=%d", owner, event.topic, event.seq)


class BoundContext:
    """The narrow context handed to one plugin instance (see `PluginContext`)."""

    def __init__(self, daemon: Daemon, host: PluginHost, record: PluginRecord,
                 settings: Any) -> None:
        self._daemon = daemon
        self._host = host
        self._record = record
        self._generation = record.generation
        self.config = daemon.config
        self.settings = settings
        self.logger = logging.getLogger(f"famulus.plugins.{record.name}")
        self.data_dir = daemon.paths.data_dir / "plugins" / record.name
        self.data_dir.mkdir(parents=True, exist_ok=True)

    def submit_file(self, path: Path, cause: str | None = None) -> int | None:
        try:
            info = FileInfo.of(path)
        except OSError:
            return None
        try:
            job = self._daemon.store.call(
                lambda tx: documents.submit_file(tx, info, cause=cause))
        except StorageFull as exc:
            raise TryLater(str(exc)) from exc
        self._daemon.wake_dispatcher()
        return job

    def submit_job(self, kind: str, payload: dict[str, Any], lane: str,
                   cause: str | None = None) -> int:
        if kind not in {JobKind.CLIPBOARD_ACTION, JobKind.DIGEST, JobKind.SUMMARIZE_TEXT}:
            raise ValueError(f"job kind {kind!r} cannot be submitted by a plugin; use "
                             f"{JobKind.CLIPBOARD_ACTION}, {JobKind.DIGEST} or "
                             f"{JobKind.SUMMARIZE_TEXT}")
        if lane not in PLUGIN_LANES:
            raise ValueError(f"unknown lane {lane!r}; use one of {', '.join(PLUGIN_LANES)}")
        job = self._daemon.store.call(lambda tx: journal.enqueue(
            tx, JobKind(kind), PLUGIN_LANES[lane], payload=payload, cause=cause))
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

    def subscribe(self, topic: str, callback: Callable[[Event], None]) -> None:
        generation = self._generation

        def run(event: Event) -> None:
            try:
                callback(event)
            except Exception as exc:
                self._host.report_failure(self._record.name, generation, exc)

        self._host.events.subscribe(self._record.name, topic, run)

    def schedule(self, name: str, fn: Callable[[], None], interval_s: float) -> None:
        job_id = f"plugin.{self._record.name}.{name}"
        generation = self._generation

        def run() -> None:
            try:
                fn()
            except Exception as exc:
                self._host.report_failure(self._record.name, generation, exc)

        self._daemon.scheduler.add_interval(job_id, run, interval_s)
        self._record.jobs.append(job_id)

    def spawn(self, target: Callable[[], None], name: str) -> threading.Thread:
        generation = self._generation

        def run() -> None:
            try:
                target()
            except Exception as exc:
                self._host.report_failure(self._record.name, generation, exc)

        thread = threading.Thread(target=run, name=f"plugin-{self._record.name}-{name}",
                                  daemon=True)
        self._record.threads.add(thread)
        thread.start()
        return thread


class PluginHost:
    """Loads, starts, supervises, pauses and stops every plugin."""

    def __init__(self, daemon: Daemon) -> None:
        self._daemon = daemon
        self._lock = threading.RLock()
        self.records: dict[str, PluginRecord] = {}
        self.events = EventHub()
        self._stopping = False
        self._previous_hook = threading.excepthook
        threading.excepthook = self._excepthook

    # -- loading and starting -------------------------------------------------------------

    def load(self) -> None:
        """Find every plugin registered under the entry-point group; record load failures."""
        records: dict[str, PluginRecord] = {}
        for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
            record = PluginRecord(name=ep.name, cls=None, source=ep.value)
            records[ep.name] = record
            try:
                cls = ep.load()
            except Exception as exc:
                logger.exception("plugin failed to load and is disabled: plugin=%s (%s)",
                                 ep.name, ep.value)
                self._disable(record, f"failed to load: {type(exc).__name__}: {exc}")
                continue
            if not isinstance(cls, type) or not all(
                    hasattr(cls, attr) for attr in ("name", "start", "stop")):
                logger.error("plugin %s (%s) lacks name/start/stop and is disabled", ep.name,
                             ep.value)
                self._disable(record, "not a plugin class: it needs name, start and stop")
                continue
            record.cls = cls
        unknown = sorted(set(self._daemon.config.plugins) - set(records))
        if unknown:
            logger.warning("config has [plugins.%s] but no such plugin is installed; "
                           "installed: %s", ", plugins.".join(unknown), ", ".join(records))
        with self._lock:
            self.records = records

    def start_all(self) -> None:
        for record in list(self.records.values()):
            if record.cls is None or record.state is PluginState.DISABLED:
                continue
            # The gate starts a plugin that needs a desktop session once one appears.
            if not self._daemon.desktop.admit(record):
                record.state = PluginState.WAITING_FOR_DESKTOP
                continue
            self._start(record)

    def start_one(self, record: PluginRecord) -> None:
        """Start a plugin that waited for a desktop session, paused if it was paused."""
        if record.state is PluginState.WAITING_FOR_DESKTOP:
            self._start(record)

    def _start(self, record: PluginRecord) -> None:
        assert record.cls is not None
        with self._lock:
            if self._stopping:
                return
            record.timer = None
            record.generation += 1
            record.state = PluginState.STARTING
            record.threads = set()
            record.jobs = []
        schema = getattr(record.cls, "config_schema", None)
        try:
            settings = (parse_plugin_section(self._daemon.config, record.name, schema)
                        if schema is not None else None)
        except ConfigError as exc:
            logger.error("plugin config is invalid, plugin disabled: plugin=%s: %s",
                         record.name, exc)
            self._disable(record, str(exc))
            return
        generation = record.generation
        try:
            instance = record.cls()
            if not isinstance(instance, Plugin):
                raise TypeError(f"{record.source} does not implement name, start and stop")
            record.instance = instance
            before = set(threading.enumerate())
            instance.start(BoundContext(self._daemon, self, record, settings))
            # Threads the plugin started itself: an uncaught exception in one is a failure.
            record.threads |= set(threading.enumerate()) - before
        except Exception as exc:
            self._handle_failure(record.name, generation, exc, where="start")
            return
        with self._lock:
            if record.generation != generation or record.state is not PluginState.STARTING:
                return  # a thread of the new instance already failed
            record.state = PluginState.RUNNING
            record.started_at = time.monotonic()
        logger.info("plugin started: plugin=%s", record.name)
        if record.paused:
            self._call(record, "pause")

    # -- failures -------------------------------------------------------------------------

    def report_failure(self, name: str, generation: int, exc: BaseException) -> None:
        """Handle a failure on a thread of its own: the stop may join the failing thread."""
        threading.Thread(target=self._handle_failure, args=(name, generation, exc),
                         kwargs={"where": "run"}, name=f"plugin-{name}-failure",
                         daemon=True).start()

    def _excepthook(self, args: threading.ExceptHookArgs) -> None:
        with self._lock:
            owner = next((r for r in self.records.values() if args.thread in r.threads), None)
        if owner is None or args.exc_value is None or not isinstance(args.exc_value, Exception):
            self._previous_hook(args)
            return
        self.report_failure(owner.name, owner.generation, args.exc_value)

    def _handle_failure(self, name: str, generation: int, exc: BaseException, *,
                        where: str) -> None:
        with self._lock:
            record = self.records.get(name)
            if (record is None or record.generation != generation or self._stopping
                    or record.state in (PluginState.DISABLED, PluginState.RESTARTING)):
                return
            if record.state is PluginState.RUNNING and \
                    time.monotonic() - record.started_at > HEALTHY_AFTER_S:
                record.failures = 0
            record.failures += 1
            record.last_error = f"{type(exc).__name__}: {exc}"
            record.state = PluginState.RESTARTING
            failures = record.failures
        logger.error("plugin failed in %s: plugin=%s failures=%d error=%s", where, name,
                     failures, record.last_error, exc_info=exc)
        self._teardown(record, self._daemon.config.daemon.shutdown_timeout_s * 0.2)
        limit = self._daemon.config.daemon.plugin_max_failures
        if failures >= limit:
            self._disable(record, record.last_error)
            logger.error("plugin disabled after %d failures in a row: plugin=%s; fix it and "
                         "run `famulus reload`", failures, name)
            return
        backoff = min(self._daemon.config.daemon.plugin_restart_backoff_s
                      * 2 ** (failures - 1), MAX_BACKOFF_S)
        self._emit(Topic.PLUGIN_FAILED, {"plugin": name, "failures": failures,
                                         "error": record.last_error, "retry_in_s": backoff})
        timer = threading.Timer(backoff, self._start, args=(record,))
        timer.daemon = True
        with self._lock:
            if self._stopping:
                return
            record.timer = timer
        timer.start()

    def _disable(self, record: PluginRecord, error: str | None) -> None:
        with self._lock:
            record.state = PluginState.DISABLED
            record.last_error = error
        self._emit(Topic.PLUGIN_DISABLED, {"plugin": record.name, "failures": record.failures,
                                           "error": error})

    def _teardown(self, record: PluginRecord, timeout: float) -> None:
        """Stop the instance, its scheduled jobs and its subscriptions."""
        for job_id in record.jobs:
            self._daemon.scheduler.remove(job_id)
        record.jobs = []
        self.events.drop(record.name)
        instance, record.instance = record.instance, None
        if instance is None:
            return
        try:
            instance.stop(timeout)
        except Exception:
            logger.exception("plugin failed to stop: plugin=%s", record.name)

    def _emit(self, topic: str, body: dict[str, Any]) -> None:
        try:
            self._daemon.store.submit(lambda tx: tx.emit(topic, body))
        except Exception:
            logger.exception("announcing a plugin change failed: topic=%s", topic)

    # -- control --------------------------------------------------------------------------

    def set_paused(self, paused: bool, name: str | None = None) -> list[str]:
        """Pause or resume one plugin or all; return the names whose state changed."""
        changed = []
        for record in list(self.records.values()):
            if name is not None and record.name != name:
                continue
            if record.paused == paused:
                continue
            record.paused = paused
            changed.append(record.name)
            if record.state is PluginState.RUNNING:
                self._call(record, "pause" if paused else "resume")
        return changed

    def _call(self, record: PluginRecord, method_name: str) -> None:
        method = getattr(record.instance, method_name, None)
        if method is None:
            return
        try:
            method()
        except Exception:
            logger.exception("plugin failed to %s: plugin=%s", method_name, record.name)

    def listing(self) -> list[dict[str, Any]]:
        with self._lock:
            return [r.describe() for r in self.records.values()]

    def restart_all(self) -> None:
        """Stop every plugin and load and start them again (after a config reload)."""
        paused = {r.name for r in self.records.values() if r.paused}
        self.stop_all(self._daemon.config.daemon.shutdown_timeout_s * 0.2)
        self._daemon.desktop.close()
        self._daemon.desktop.reopen()
        with self._lock:
            self._stopping = False
        self.load()
        for record in self.records.values():
            record.paused = record.name in paused
        self.start_all()

    def stop_all(self, timeout: float) -> None:
        with self._lock:
            self._stopping = True
            records = list(self.records.values())
        for record in records:
            if record.timer is not None:
                record.timer.cancel()
            self._teardown(record, timeout)
            if record.state is not PluginState.DISABLED:
                record.state = PluginState.STOPPED

    def close(self, timeout: float) -> None:
        self.stop_all(timeout)
        self.events.stop(timeout)
        if threading.excepthook == self._excepthook:
            threading.excepthook = self._previous_hook
