"""Energy counters of Intel RAPL (Running Average Power Limit), read from Linux sysfs.

The powercap framework exposes each package as /sys/class/powercap/intel-rapl:N with
`energy_uj` (a counter in microjoules that wraps to 0 after `max_energy_range_uj`) and
`name` (for example "package-0"). Subzones such as intel-rapl:0:0 (cores) are part of their
package, so only the top-level zones are summed. On many systems `energy_uj` is readable
only by root. An unreadable or absent counter raises EnergyUnavailable with the reason.
"""

from __future__ import annotations

import re
from pathlib import Path

POWERCAP = Path("/sys/class/powercap")

# Top-level package zones only: "intel-rapl:0" but not "intel-rapl:0:1" (a subzone).
_PACKAGE_ZONE = re.compile(r"^intel-rapl:\d+$")


class EnergyUnavailable(Exception):
    """The OS exposes no readable energy counter. The message gives the reason."""


Sample = dict[str, tuple[int, int]]
"""Zone folder name -> (energy_uj, max_energy_range_uj) at one moment."""


class RaplMeter:
    """Reads the package energy counters under `root` (a fake tree in tests)."""

    def __init__(self, root: Path = POWERCAP) -> None:
        self.root = root

    def zones(self) -> list[Path]:
        if not self.root.is_dir():
            raise EnergyUnavailable(f"not exposed: {self.root} does not exist")
        zones = sorted(p for p in self.root.iterdir() if _PACKAGE_ZONE.match(p.name))
        if not zones:
            raise EnergyUnavailable(f"not exposed: no intel-rapl:N zone in {self.root}")
        return zones

    def read(self) -> Sample:
        """Return the counter and its wrap-around range of every package zone."""
        sample: Sample = {}
        for zone in self.zones():
            sample[zone.name] = (_read_counter(zone / "energy_uj"),
                                 _read_counter(zone / "max_energy_range_uj"))
        return sample

    def joules_since(self, before: Sample) -> float:
        """Return the energy in joules that all package zones used since `before`."""
        return energy_joules(before, self.read())


def energy_joules(before: Sample, after: Sample) -> float:
    """Sum each zone's counter difference, correcting one wrap-around per zone.

    NOTE: a counter that wrapped more than once between the samples is undercounted. With
    a max_energy_range_uj of 262143328850 (about 262 kJ), that takes 43 minutes at 100 W.
    """
    if before.keys() != after.keys():
        raise EnergyUnavailable(f"not exposed: the RAPL zones changed between samples "
                                f"({sorted(before)} then {sorted(after)})")
    total_uj = 0
    for zone, (start, _) in before.items():
        end, max_range = after[zone]
        delta = end - start
        if delta < 0:
            # The counter passed max_energy_range_uj and restarted at 0.
            delta += max_range
        total_uj += delta
    return total_uj / 1e6


def _read_counter(path: Path) -> int:
    try:
        text = path.read_text(encoding="ascii").strip()
    except PermissionError:
        raise EnergyUnavailable(f"not exposed: {path} is readable only by root (permission "
                                "denied)") from None
    except OSError as exc:
        raise EnergyUnavailable(f"not exposed: cannot read {path}: {exc.strerror}") from None
    try:
        return int(text)
    except ValueError:
        raise EnergyUnavailable(f"not exposed: {path} contains {text[:40]!r}, not a number of "
                                "microjoules") from None
