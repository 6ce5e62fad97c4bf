"""Power awareness: whether the machine runs on battery, and what changes then.

The battery is read through a source callable, psutil's `sensors_battery` by default. Tests
pass their own source to `PowerMonitor` instead of patching psutil.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PowerState:
    on_battery: bool
    # Charge in percent; None when the machine reports no battery.
    percent: float | None
    has_battery: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


AC_NO_BATTERY = PowerState(on_battery=False, percent=None, has_battery=False)
PowerSource = Callable[[], PowerState]


def psutil_source() -> PowerState:
    """Read the battery through psutil; a machine without one counts as on AC power."""
    import psutil

    try:
        battery = psutil.sensors_battery()
    except (OSError, RuntimeError, AttributeError) as exc:
        # AttributeError: psutil has no sensors_battery on some platforms.
        logger.debug("battery state unavailable: %s", exc)
        return AC_NO_BATTERY
    if battery is None:
        return AC_NO_BATTERY
    plugged = battery.power_plugged
    return PowerState(on_battery=plugged is False, percent=round(float(battery.percent), 1),
                      has_battery=True)


class PowerMonitor:
    """Holds the last power state and calls `on_change` when it changes."""

    def __init__(self, source: PowerSource = psutil_source,
                 on_change: Callable[[PowerState, PowerState | None], None] | None = None
                 ) -> None:
        self._source = source
        self._on_change = on_change
        self._lock = threading.Lock()
        self.state: PowerState | None = None

    def check(self) -> PowerState:
        """Read the source; on a change of `on_battery`, call `on_change(new, old)`.

        A source that raises leaves the last state in place and is logged.
        """
        try:
            new = self._source()
        except Exception:
            logger.exception("reading the power state failed; keeping the last state")
            return self.state or AC_NO_BATTERY
        with self._lock:
            old, self.state = self.state, new
        if old is None or old.on_battery != new.on_battery:
            logger.info("power: on_battery=%s percent=%s", new.on_battery, new.percent)
            if self._on_change is not None:
                self._on_change(new, old)
        return new
