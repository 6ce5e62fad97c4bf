"""The digest plugin: at each interval, one summary of the period's document summaries.

The plugin only schedules. The dispatcher runs each digest as a job in the documents lane,
publishes it as `digest.ready` and writes it as a Markdown file into `folder`. A period with
no summaries still publishes `digest.ready` (with `summaries: 0`) but writes no file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from famulus.daemon.config import setting
from famulus.plugins.api import PluginContext


@dataclass(frozen=True)
class DigestSettings:
    enabled: bool = setting(True, "Write a digest at every interval.")
    interval_s: float = setting(
        86400.0, "Interval between digests, and the period each digest covers.", min=1.0)
    folder: str = setting(
        "~/famulus-digests", "Folder the Markdown digests are written to; created when "
        "missing. Empty: publish the digest as an event only.")
    max_summaries: int = setting(
        50, "Most document summaries one digest covers (the oldest first).", min=1)


class DigestPlugin:
    name: ClassVar[str] = "digest"
    config_schema: ClassVar[type] = DigestSettings

    def __init__(self) -> None:
        self._ctx: PluginContext | None = None

    def start(self, context: PluginContext) -> None:
        self._ctx = context
        settings: DigestSettings = context.settings
        if not settings.enabled:
            context.logger.info("digest disabled (plugins.digest.enabled = false)")
            return
        context.schedule("digest", self.run, settings.interval_s)

    def run(self) -> None:
        assert self._ctx is not None
        settings: DigestSettings = self._ctx.settings
        self._ctx.submit_job("digest", {"period_s": settings.interval_s,
                                        "folder": settings.folder,
                                        "max_summaries": settings.max_summaries},
                             lane="documents")

    def stop(self, timeout: float) -> None:
        """Nothing to stop: the daemon removes the scheduled job."""
