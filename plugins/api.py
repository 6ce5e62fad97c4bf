"""The plugin API: what a plugin implements and the narrow context it receives.

A plugin is a class registered under the entry-point group `famulus.plugins`; the built-in
plugins register the same way. It gets no access to the daemon's internals, only to `PluginContext`.

A plugin may also declare:

- `config_schema`: a frozen dataclass whose fields are declared with
  `famulus.daemon.config.setting`. The daemon validates the `[plugins.NAME]` table against it
  before `start` and hands the result over as `context.settings`. An invalid table disables
  the plugin with a message that names the key and the fix.
- `pause()` and `resume()`: called by the bus requests of the same names.
- `needs_desktop = True`: the plugin needs a graphical session (a display or a clipboard).

A plugin that raises in `start`, in a thread started through `context.spawn` (or any thread
it started inside `start`), in an event callback or in a scheduled job is stopped, restarted
with backoff and disabled after `daemon.plugin_max_failures` failures in a row.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

from famulus.daemon.config import Config
from famulus.ipc.protocol import Event

ENTRY_POINT_GROUP = "famulus.plugins"


class TryLater(Exception):
    """The daemon cannot take the request now (for example, its disk is full).

    The reason is logged by the daemon; the plugin offers the same item again later.
    """


class PluginContext(Protocol):
    """The operations a running plugin may use."""

    config: Config
    # The plugin's validated `[plugins.NAME]` table (an instance of its `config_schema`),
    # or None when the plugin declares no schema.
    settings: Any
    logger: logging.Logger
    # A folder of the plugin's own below the daemon's data directory; created on start.
    data_dir: Path

    def submit_file(self, path: Path, cause: str | None = None) -> int | None:
        """Queue a summary of a new or changed file; return the job id, None if unchanged.

        Raises TryLater when the daemon cannot record it now.
        """
        ...

    def submit_job(self, kind: str, payload: dict[str, Any], lane: str,
                   cause: str | None = None) -> int:
        """Queue a job of a known kind (such as `clipboard.action`) in a lane; return its id.

        Lanes: interactive, clipboard, documents. Raises ValueError for an unknown kind or lane.
        """
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

    def subscribe(self, topic: str, callback: Callable[[Event], None]) -> None:
        """Call `callback` for each committed event whose topic equals `topic`.

        Callbacks run one at a time on the daemon's event thread, so they must return quickly.
        Subscriptions end when the plugin stops.
        """
        ...

    def schedule(self, name: str, fn: Callable[[], None], interval_s: float) -> None:
        """Run `fn` every `interval_s` seconds on the daemon's scheduler.

        A run missed during a suspend is made up once at most. Jobs end when the plugin stops.
        """
        ...

    def spawn(self, target: Callable[[], None], name: str) -> threading.Thread:
        """Start a daemon thread whose uncaught exception counts as a plugin failure."""
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
        """Start the plugin's own threads and return; called once per plugin instance."""
        ...

    def stop(self, timeout: float) -> None:
        """Stop within `timeout` seconds; called at shutdown, reload and after a failure."""
        ...
