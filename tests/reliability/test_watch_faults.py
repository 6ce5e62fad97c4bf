"""The folder watcher under faults: a watched folder deleted and recreated, the inotify limit."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from famulus.daemon.config import Config, WatchSection
from famulus.ipc.protocol import Topic
from famulus.plugins.folder_watch import FolderWatchPlugin
from tests.conftest import DaemonHome, wait_for

SUMMARY_TIMEOUT_S = 120


def drop(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def wait_summarized(home: DaemonHome, path: Path) -> None:
    assert home.log is not None
    home.log.wait(lambda e: e.topic == Topic.DOCUMENT_SUMMARIZED and e.body["path"] == str(path),
                  SUMMARY_TIMEOUT_S, f"document.summarized for {path.name}")


def test_recreated_folder_is_watched_again(daemon_home: DaemonHome) -> None:
    daemon_home.start()
    first = drop(daemon_home.inbox, "first.txt", "The pump in hall 3 was serviced by Alice.")
    wait_summarized(daemon_home, first)

    shutil.rmtree(daemon_home.inbox)
    assert daemon_home.log is not None
    daemon_home.log.wait(lambda e: e.topic == Topic.DOCUMENT_REMOVED
                         and e.body.get("path") == str(first), 30, "document.removed")

    daemon_home.inbox.mkdir()
    second = drop(daemon_home.inbox, "second.txt", "The boiler in hall 5 was replaced by Bob.")
    wait_summarized(daemon_home, second)
    # A file written after the new watch is in place arrives through the watch itself.
    third = drop(daemon_home.inbox, "third.txt", "The fan in hall 7 was cleaned by Carol.")
    wait_summarized(daemon_home, third)
    assert "watched folder deleted" in daemon_home.stderr()


def test_deleted_parent_folder_is_followed(daemon_home: DaemonHome) -> None:
    nested = daemon_home.root / "outer" / "inbox"
    daemon_home.inbox = nested
    daemon_home.write_config()
    daemon_home.start()
    shutil.rmtree(daemon_home.root / "outer")
    nested.mkdir(parents=True)
    back = drop(nested, "back.txt", "The valve in hall 9 was tested by Dave.")
    wait_summarized(daemon_home, back)


def user_namespace_works() -> bool:
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "true"],
                           capture_output=True, check=False)
    return probe.returncode == 0


@pytest.mark.skipif(shutil.which("unshare") is None or not user_namespace_works(),
                    reason="needs util-linux unshare and user namespaces")
def test_inotify_limit_falls_back_to_polling(daemon_home: DaemonHome) -> None:
    # A user namespace has its own inotify limits, so this lowers the limit for the daemon
    # alone, as a machine whose watches are all taken would.
    daemon_home.prefix = ["unshare", "--user", "--map-root-user", "sh", "-c",
                          'echo 0 > /proc/sys/user/max_inotify_watches && exec "$@"', "sh"]
    config = daemon_home.config_file.read_text(encoding="utf-8")
    daemon_home.config_file.write_text(
        config.replace("[model]", "poll_interval_s = 0.5\n\n[model]"), encoding="utf-8")
    daemon_home.start()
    stderr = daemon_home.stderr()
    assert "inotify limit reached" in stderr
    assert "observer=PollingObserver" in stderr
    note = drop(daemon_home.inbox, "note.txt", "The gate in hall 2 was painted by Erin.")
    wait_summarized(daemon_home, note)


class RecordingContext:
    """The plugin API's context, recording what the watcher submits; no daemon behind it."""

    def __init__(self, folder: Path) -> None:
        self.config = Config(watch=WatchSection(folders=(str(folder),), quiet_period_s=0.2))
        self.logger = logging.getLogger("test.folder_watch")
        self.data_dir = folder.parent / "data"
        self.submitted: list[Path] = []
        self._lock = threading.Lock()

    def submit_file(self, path: Path, cause: str | None = None) -> int | None:
        with self._lock:
            self.submitted.append(path)
            return len(self.submitted)

    def file_removed(self, path: Path) -> None:
        pass

    def is_settled(self, path: Path, size: int, mtime: float) -> bool:
        return False

    def known_paths_under(self, folder: Path) -> list[str]:
        return []

    def schedule(self, name: str, fn: Callable[[], None], interval_s: float) -> None:
        pass  # the periodic rescan is not part of this test


class CountingWatch(FolderWatchPlugin):
    walks = 0

    def _walk(self, folder: Path) -> list[Path]:
        CountingWatch.walks += 1
        return super()._walk(folder)


def test_bulk_move_walks_folder_once(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    context = RecordingContext(inbox)
    plugin = CountingWatch()
    plugin.start(context)  # type: ignore[arg-type]
    try:
        staging = tmp_path / "staging"
        staging.mkdir()
        names = [f"note-{i:04d}.txt" for i in range(300)]
        for name in names:
            (staging / name).write_text(name, encoding="utf-8")
        for name in names:
            os.rename(staging / name, inbox / name)
        wait_for(lambda: len(context.submitted) >= len(names), 60, "300 submissions")
    finally:
        plugin.stop(5)
    assert sorted(p.name for p in context.submitted) == names
    # The start-up scan walks the folder once; the moves themselves must not.
    assert CountingWatch.walks == 1
