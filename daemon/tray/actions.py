"""The tray menu's actions, as plain methods that tests call directly.

Files and folders open with the desktop's opener (`xdg-open` on Linux, `open` on macOS,
`os.startfile` on Windows); `opener` replaces it, for example in tests.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from famulus.daemon.paths import user_paths
from famulus.ipc.client import BusError, Client, DaemonUnavailable
from famulus.ipc.protocol import Method

logger = logging.getLogger(__name__)

NEW_CONFIG_TEXT = """\
# famulus configuration. Every key, its default and its unit are listed in
# config.example.toml in the famulus sources; keys left out keep their defaults.
"""


class ActionError(Exception):
    """A menu action failed; the message is meant for the person who clicked."""


@dataclass(frozen=True)
class RecentSummary:
    """One `document.summarized` event, as listed in the menu."""

    document: int
    path: str
    job: int
    summary: str


def default_opener() -> list[str] | None:
    if sys.platform == "darwin":
        return ["open"]
    if sys.platform == "win32":
        return None  # os.startfile
    return ["xdg-open"]


class TrayActions:
    """The menu actions, bound to one daemon's request endpoint and config file."""

    def __init__(self, *, requests_endpoint: str | None = None, config: str | None = None,
                 opener: Sequence[str] | None = None, summaries_dir: Path | None = None,
                 daemon_command: Sequence[str] | None = None, env: dict[str, str] | None = None
                 ) -> None:
        paths = user_paths()
        self.requests_endpoint = requests_endpoint or paths.requests_endpoint
        self.config = config
        self.config_file = Path(config) if config else _config_file()
        self.opener = list(opener) if opener is not None else default_opener()
        self.summaries_dir = summaries_dir or paths.cache_dir / "tray"
        self.daemon_command = list(daemon_command) if daemon_command else [
            sys.executable, "-m", "famulus.daemon.cli",
            *(["--config", config] if config else []), "run"]
        self.env = env

    # -- requests to the daemon -------------------------------------------------------------

    def _call(self, method: str) -> Any:
        try:
            with Client(self.requests_endpoint, timeout_s=5) as client:
                return client.call(method)
        except DaemonUnavailable as exc:
            raise ActionError(f"famulus is not running ({exc})") from None
        except BusError as exc:
            raise ActionError(f"{method} failed: {exc.message}") from None

    def pause(self) -> None:
        self._call(Method.PAUSE)

    def resume(self) -> None:
        self._call(Method.RESUME)

    def stop_daemon(self) -> None:
        self._call(Method.SHUTDOWN)

    def start_daemon(self) -> subprocess.Popen[bytes]:
        """Start `famulus run` in its own session, so that quitting the tray leaves it running.

        A daemon already running makes the new one exit at once with code 1.
        """
        # NOTE: when the systemd unit is installed, `systemctl --user start famulus` would
        # keep the daemon under the service manager; this starts it outside of it.
        logger.info("starting the daemon: %s", " ".join(self.daemon_command))
        return subprocess.Popen(self.daemon_command, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True, env=self.env)

    # -- opening files ------------------------------------------------------------------------

    def open_path(self, path: Path) -> subprocess.Popen[bytes] | None:
        """Open a file or folder with the desktop's opener; raise ActionError if missing."""
        if not path.exists():
            raise ActionError(f"{path} does not exist (moved or deleted?)")
        if self.opener is None:
            os.startfile(path)  # type: ignore[attr-defined]  # Windows only
            return None
        try:
            return subprocess.Popen([*self.opener, str(path)], stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                    start_new_session=True, env=self.env)
        except OSError as exc:
            raise ActionError(f"cannot run {self.opener[0]} to open {path}: {exc.strerror}; "
                              "install xdg-utils or set a default application") from None

    def open_document(self, item: RecentSummary) -> subprocess.Popen[bytes] | None:
        return self.open_path(Path(item.path))

    def open_summary(self, item: RecentSummary) -> subprocess.Popen[bytes] | None:
        """Write the summary to a text file in the tray's cache folder and open that."""
        self.summaries_dir.mkdir(parents=True, exist_ok=True)
        target = self.summaries_dir / f"summary-{item.document}-{item.job}.txt"
        target.write_text(f"{item.path}\n\n{item.summary}\n", encoding="utf-8")
        return self.open_path(target)

    def open_watched_folder(self, folders: Sequence[str]) -> subprocess.Popen[bytes] | None:
        if not folders:
            raise ActionError("no folder is watched; set watch.folders in the config")
        return self.open_path(Path(folders[0]))

    def open_config(self) -> subprocess.Popen[bytes] | None:
        """Open the config file, creating it with a short header first if it is missing."""
        if not self.config_file.exists():
            self.config_file.parent.mkdir(parents=True, exist_ok=True)
            self.config_file.write_text(NEW_CONFIG_TEXT, encoding="utf-8")
            logger.info("created an empty config file: path=%s", self.config_file)
        return self.open_path(self.config_file)


def _config_file() -> Path:
    from famulus.daemon.config import config_path

    return config_path(user_paths())[0]
