"""The retention purge: old events, clipboard results and clipboard job payloads."""

from __future__ import annotations

import logging
import time

from famulus.daemon.config import Config, ConfigError, parse_plugin_section
from famulus.daemon.journal import JobKind, JobState
from famulus.daemon.store import Store, Tx
from famulus.ipc.protocol import Topic

logger = logging.getLogger(__name__)


def purge_expired(store: Store, config: Config) -> None:
    """Delete what is past its retention period; log what was deleted."""
    event_days = config.bus.event_retention_days
    clip_days, clip_max = _clipboard_limits(config)
    deleted = store.call(lambda tx: _purge(tx, event_days, clip_days, clip_max))
    if any(deleted.values()):
        logger.info("retention purge: events=%d clipboard_results=%d", deleted["events"],
                    deleted["clipboard_results"])


def _clipboard_limits(config: Config) -> tuple[float, int]:
    from famulus.plugins.clipboard import ClipboardSettings

    try:
        settings = parse_plugin_section(config, "clipboard", ClipboardSettings)
    except ConfigError:
        settings = ClipboardSettings()  # the plugin reports the invalid table itself
    return settings.retention_days, settings.max_results


def _purge(tx: Tx, event_days: float, clip_days: float, clip_max: int) -> dict[str, int]:
    out = {"events": 0, "clipboard_results": 0}
    if event_days > 0:
        cutoff = time.time() - event_days * 86400
        out["events"] = tx.execute("DELETE FROM events WHERE ts < ?", (cutoff,)).rowcount
    cutoff = time.time() - clip_days * 86400
    out["clipboard_results"] = tx.execute(
        "DELETE FROM clipboard_results WHERE created_at < ?", (cutoff,)).rowcount
    out["clipboard_results"] += tx.execute(
        "DELETE FROM clipboard_results WHERE id NOT IN "
        "(SELECT id FROM clipboard_results ORDER BY id DESC LIMIT ?)", (clip_max,)).rowcount
    # Clipboard results in the event log follow the clipboard's shorter retention.
    out["events"] += tx.execute("DELETE FROM events WHERE topic = ? AND ts < ?",
                                (Topic.CLIPBOARD_RESULT, cutoff)).rowcount
    # A clipboard job's payload contains the copied text until the job has finished.
    tx.execute("UPDATE jobs SET payload = '{}' WHERE kind = ? AND state NOT IN (?, ?) "
               "AND payload != '{}'", (JobKind.CLIPBOARD_ACTION, JobState.QUEUED,
                                       JobState.RUNNING))
    return out
