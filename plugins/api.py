"""The plugin API: what a plugin implements and the narrow context it receives.

A plugin is a class registered under the entry-point group `famulus.plugins`; the built-in
plugins register the same way. It gets no access to the daemon's internals, only to `PluginContext`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

from famulus.daemon.config import Config

ENTRY_POINT_GROUP = "famulus.plugins"


class PluginContext(Protocol):
    """The operations a running plugin may use."""

    config: Config
    logger: logging.Logger
    data_dir: Path

    def submit_file(self, path: Path, cause: str | None = None) -> int | None:
        """Queue a summary of a new or changed file; return the job id, None if unchanged."""
        ...

    def file_removed(self, path: Path) -> None:
        """Record that a file (or a folder with files) is gone."""
        ...

    def is_settled(self, path: Path, size: int, mtime: float) -> bool:
        """Tell whether this exact file version was already handled."""
        ...

    def known_paths_under(self, folder: Path) -> list[str]:
        """List the paths of documents recorded below `folder` and not removed."""
        ...

    def publish(self, topic: str, body: dict[str, Any], cause: str | None = None) -> None:
        """Append an event to the log and publish it on the bus."""
        ...


@runtime_checkable
class Plugin(Protocol):
    """A watcher or other extension run by the daemon.

    A plugin that needs the desktop session (a display or a session bus) sets the class
    attribute `needs_desktop: ClassVar[bool] = True`. The daemon then starts it only once a
    session is reachable, and keeps running without it until then.
    """

    name: ClassVar[str]

    def start(self, context: PluginContext) -> None:
        """Start the plugin's own threads and return; called once at daemon start."""
        ...

    def stop(self, timeout: float) -> None:
        """Stop within `timeout` seconds; called once at shutdown."""
        ...
