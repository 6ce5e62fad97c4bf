"""The folder watch plugin: new and changed files in watched folders become summary jobs.

A file is handed on only after its size and mtime have stayed unchanged for the quiet period,
so a file written in chunks yields one job after the last write. Names of partial downloads,
lock files and editor temporaries are ignored. A rename acts on its destination, which covers
a finished download renamed into place and an editor's atomic save. A scan at start catches up
with files added, changed or deleted while the daemon was down.

Changes come from inotify where it works. When the system's inotify watch limit is reached, the
folders are polled instead, with a warning. A watched folder that is deleted is watched again,
and scanned, once it is created anew.
"""

from __future__ import annotations

import errno
import fnmatch
import os
import threading
import time
from pathlib import Path
from typing import ClassVar

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver, ObservedWatch
from watchdog.observers.polling import PollingObserver

from famulus.plugins.api import PluginContext, TryLater

# Matched against the file name only, case-insensitively.
BUILTIN_IGNORE = (
    ".*",  # hidden files, including editor swap files such as .doc.txt.swp
    "*.crdownload", "*.part", "*.partial", "*.download", "*.opdownload", "*.tmp", "*.temp",
    "~$*", ".~lock.*#", "*.swp", "*.swx", "*~", "#*#", "*.kate-swp", "4913",
)


# inotify_add_watch fails with ENOSPC at fs.inotify.max_user_watches and inotify_init with
# EMFILE at fs.inotify.max_user_instances.
WATCH_LIMIT_ERRNOS = (errno.ENOSPC, errno.EMFILE)


def is_ignored(name: str, extra: tuple[str, ...] = ()) -> bool:
    lowered = name.lower()
    return any(fnmatch.fnmatchcase(lowered, p.lower()) for p in BUILTIN_IGNORE + extra)


class _Pending:
    """Paths waiting for their quiet period, and the stat seen last for each."""

    def __init__(self) -> None:
        self.lock = threading.Condition()
        self.items: dict[str, tuple[tuple[int, int] | None, float]] = {}

    def touch(self, path: str) -> None:
        with self.lock:
            self.items[path] = (None, time.monotonic())
            self.lock.notify()


class _Handler(FileSystemEventHandler):
    def __init__(self, plugin: FolderWatchPlugin) -> None:
        self.plugin = plugin

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in ("opened", "closed_no_write"):
            return
        if event.is_directory and event.event_type in ("modified", "closed"):
            # Each file added to a folder also changes the folder's mtime. The files bring
            # events of their own, and walking the folder for each of them took quadratic
            # time on a bulk copy.
            return
        # An exception here would end watchdog's dispatch thread, and with it all watching.
        try:
            for raw in (event.src_path, getattr(event, "dest_path", "")):
                if raw:
                    self.plugin.changed(os.fsdecode(raw), is_dir=event.is_directory)
        except Exception:
            self.plugin.ctx.logger.exception("handling a file system event failed: event=%s",
                                             event.event_type)


class _ParentHandler(FileSystemEventHandler):
    """Watches the parent of a deleted watched folder for the folder's return."""

    def __init__(self, plugin: FolderWatchPlugin) -> None:
        self.plugin = plugin

    def on_any_event(self, event: FileSystemEvent) -> None:
        if not (event.is_directory and event.event_type in ("created", "moved")):
            return
        try:
            self.plugin.recheck_missing()
        except Exception:
            self.plugin.ctx.logger.exception("watching a recreated folder failed")


class FolderWatchPlugin:
    """Watches the folders in `watch.folders` with watchdog."""

    name: ClassVar[str] = "folder_watch"

    def __init__(self) -> None:
        self._pending = _Pending()
        self._stopping = threading.Event()
        self._observer: BaseObserver | None = None
        # Watches per watched folder, the folders deleted since, and the parent watches that
        # wait for them. Changed by the observer's thread and by start, pause and stop.
        self._roots_lock = threading.RLock()
        self._root_watches: dict[Path, ObservedWatch] = {}
        self._missing: set[Path] = set()
        self._parent_watches: dict[Path, ObservedWatch] = {}
        self._thread: threading.Thread | None = None
        self._ctx: PluginContext | None = None

    @property
    def ctx(self) -> PluginContext:
        assert self._ctx is not None, "plugin not started"
        return self._ctx

    def start(self, context: PluginContext) -> None:
        self._ctx = context
        self._thread = threading.Thread(target=self._settle_loop, name="folder-watch",
                                        daemon=True)
        self._thread.start()
        self._watch()
        interval = context.config.schedule.reconcile_interval_s
        if interval > 0:
            context.schedule("rescan", self.rescan, interval)

    def rescan(self) -> None:
        """Compare every watched folder with the store (a missed event is caught here)."""
        if self._observer is None:
            return  # paused: the resume scan catches up
        for folder in self.ctx.config.watch_folders():
            self.reconcile(folder)

    def _watch(self) -> None:
        """Start the observer, then scan each folder for what changed while unobserved."""
        folders = self.ctx.config.watch_folders()
        for folder in folders:
            folder.mkdir(parents=True, exist_ok=True)
        try:
            self._start_observer(Observer(), folders)
        except OSError as exc:
            if exc.errno not in WATCH_LIMIT_ERRNOS:
                raise
            interval = self.ctx.config.watch.poll_interval_s
            self.ctx.logger.warning(
                "inotify limit reached (%s): polling the watched folders every %.1f s instead. "
                "Raise fs.inotify.max_user_watches with sysctl to get change events again.",
                exc.strerror, interval)
            self._start_observer(PollingObserver(timeout=interval), folders)
        for folder in folders:
            self.reconcile(folder)

    def _start_observer(self, observer: BaseObserver, folders: list[Path]) -> None:
        recursive = self.ctx.config.watch.recursive
        with self._roots_lock:
            self._root_watches = {
                folder: observer.schedule(_Handler(self), str(folder), recursive=recursive)
                for folder in folders}
            self._missing.clear()
            self._parent_watches.clear()
        try:
            observer.start()
        except OSError:
            observer.stop()  # ends the emitters that did start
            raise
        self._observer = observer
        for folder in folders:
            self.ctx.logger.info("watching folder=%s recursive=%s observer=%s", folder,
                                 recursive, type(observer).__name__)

    def _root_lost(self, root: Path) -> None:
        """Wait for a deleted watched folder to come back: its watch ended with it."""
        observer = self._observer
        if observer is None:
            return
        with self._roots_lock:
            watch = self._root_watches.pop(root, None)
            if watch is None:
                return
            observer.unschedule(watch)
            self._missing.add(root)
        self.ctx.logger.warning("watched folder deleted: folder=%s; it is watched again once "
                                "it is created", root)
        self.recheck_missing()

    def recheck_missing(self) -> None:
        """Watch again each deleted folder that is back, and the parents of the others."""
        observer = self._observer
        if observer is None:
            return
        with self._roots_lock:
            back = []
            for root in sorted(self._missing):
                # The parent watch comes first, so a folder created right after the check
                # below still produces an event.
                parent = _nearest_existing(root.parent)
                if parent not in self._parent_watches:
                    self._parent_watches[parent] = observer.schedule(
                        _ParentHandler(self), str(parent), recursive=False)
                if root.is_dir():
                    back.append(root)
            for root in back:
                self._missing.discard(root)
                self._root_watches[root] = observer.schedule(
                    _Handler(self), str(root), recursive=self.ctx.config.watch.recursive)
            needed = {_nearest_existing(root.parent) for root in self._missing}
            for parent in [p for p in self._parent_watches if p not in needed]:
                observer.unschedule(self._parent_watches.pop(parent))
        for root in back:
            self.ctx.logger.info("watched folder is back: folder=%s", root)
            self.reconcile(root)

    def _unwatch(self, timeout: float) -> None:
        observer, self._observer = self._observer, None
        if observer is not None:
            observer.stop()
            observer.join(timeout)

    def pause(self) -> None:
        """Stop observing; pending files are dropped and found again by the resume scan."""
        self._unwatch(5.0)
        with self._pending.lock:
            self._pending.items.clear()

    def resume(self) -> None:
        self._watch()

    def stop(self, timeout: float) -> None:
        self._stopping.set()
        with self._pending.lock:
            self._pending.lock.notify()
        self._unwatch(timeout)
        if self._thread is not None:
            self._thread.join(timeout)

    # -- detection ------------------------------------------------------------------------

    def changed(self, path: str, *, is_dir: bool) -> None:
        """Note a file system change; the settle loop decides what it means."""
        if is_ignored(os.path.basename(path), self.ctx.config.watch.ignore_patterns):
            return
        if is_dir:
            if os.path.isdir(path):
                # A folder moved or copied in: its files produce no events of their own.
                for file in self._walk(Path(path)):
                    self._pending.touch(str(file))
            else:
                self.ctx.file_removed(Path(path))
                if Path(path) in self._root_watches:
                    self._root_lost(Path(path))
            return
        self._pending.touch(path)

    def _walk(self, folder: Path) -> list[Path]:
        extra = self.ctx.config.watch.ignore_patterns
        files: list[Path] = []
        for root, dirs, names in os.walk(folder):
            dirs[:] = [d for d in dirs if not is_ignored(d, extra)]
            if not self.ctx.config.watch.recursive and Path(root) != folder:
                continue
            files.extend(Path(root) / n for n in names if not is_ignored(n, extra))
        return files

    def reconcile(self, folder: Path) -> None:
        """Queue what changed while the daemon was down and mark vanished files removed."""
        found = self._walk(folder)
        queued = 0
        for file in found:
            try:
                st = file.stat()
            except OSError:
                continue
            if not self.ctx.is_settled(file, st.st_size, st.st_mtime):
                self._pending.touch(str(file))
                queued += 1
        present = {str(f) for f in found}
        vanished = [p for p in self.ctx.known_paths_under(folder) if p not in present]
        for path in vanished:
            if not os.path.exists(path):
                self.ctx.file_removed(Path(path))
        self.ctx.logger.info("folder scan: folder=%s files=%d to_process=%d removed=%d",
                             folder, len(found), queued, len(vanished))

    # -- quiet period ---------------------------------------------------------------------

    def _settle_loop(self) -> None:
        quiet = self.ctx.config.watch.quiet_period_s
        while not self._stopping.is_set():
            with self._pending.lock:
                while not self._pending.items and not self._stopping.is_set():
                    self._pending.lock.wait()  # idle: no wake-ups until something changes
                if self._stopping.is_set():
                    return
                # Re-check at a fraction of the quiet period while files are settling.
                self._pending.lock.wait(quiet / 4)
                items = dict(self._pending.items)
            for path, (seen, changed_at) in items.items():
                try:
                    self._check(path, seen, changed_at, quiet)
                except Exception:
                    self.ctx.logger.exception("checking a changed file failed: path=%s", path)
                    self._drop(path, seen, changed_at)

    def _check(self, path: str, seen: tuple[int, int] | None, changed_at: float,
               quiet: float) -> None:
        # TODO: a file name that is not valid UTF-8 (watchdog passes it with surrogate
        # escapes) cannot be stored as SQLite text, so its submit fails and is only logged.
        try:
            st = os.stat(path)
        except FileNotFoundError:
            self._drop(path, seen, changed_at)
            self.ctx.file_removed(Path(path))
            return
        current = (st.st_size, st.st_mtime_ns)
        now = time.monotonic()
        if current != seen:
            with self._pending.lock:
                if self._pending.items.get(path) == (seen, changed_at):
                    self._pending.items[path] = (current, now)
            return
        if now - changed_at < quiet:
            return
        if not self._readable(path):
            return
        if not self._drop(path, seen, changed_at):
            return  # a newer change arrived meanwhile; wait for it to settle
        try:
            self.ctx.submit_file(Path(path))
        except TryLater:
            # Offered again after another quiet period; the daemon has logged why.
            self._pending.touch(path)

    def _drop(self, path: str, seen: tuple[int, int] | None, changed_at: float) -> bool:
        """Remove `path` from the pending set unless it changed since it was read."""
        with self._pending.lock:
            if self._pending.items.get(path) != (seen, changed_at):
                return False
            del self._pending.items[path]
            return True

    @staticmethod
    def _readable(path: str) -> bool:
        try:
            with open(path, "rb"):
                return True
        except OSError:
            return False


def _nearest_existing(folder: Path) -> Path:
    while not folder.is_dir() and folder != folder.parent:
        folder = folder.parent
    return folder
