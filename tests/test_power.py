"""Power awareness with an injected battery source (psutil is not patched)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from famulus.daemon.config import parse_config
from famulus.daemon.journal import JobKind, Lane, enqueue
from famulus.daemon.lifecycle import Daemon
from famulus.daemon.paths import UserPaths
from famulus.daemon.power import AC_NO_BATTERY, PowerMonitor, PowerState, psutil_source
from famulus.ipc.protocol import Topic
from tests.conftest import wait_for

ON_AC = PowerState(on_battery=False, percent=80.0, has_battery=True)
ON_BATTERY = PowerState(on_battery=True, percent=42.0, has_battery=True)


class Battery:
    """A battery source whose state the test sets."""

    def __init__(self, state: PowerState) -> None:
        self.state = state
        self.fail = False

    def __call__(self) -> PowerState:
        if self.fail:
            raise OSError("battery driver unavailable")
        return self.state


def test_monitor_reports_changes_only() -> None:
    battery = Battery(ON_AC)
    changes: list[tuple[PowerState, PowerState | None]] = []
    monitor = PowerMonitor(battery, lambda new, old: changes.append((new, old)))
    assert monitor.check() == ON_AC
    discharged = PowerState(on_battery=False, percent=79.0, has_battery=True)
    battery.state = discharged
    monitor.check()  # only the percentage moved: no change to report
    battery.state = ON_BATTERY
    monitor.check()
    assert changes == [(ON_AC, None), (ON_BATTERY, discharged)]


def test_failing_source_keeps_last_state() -> None:
    battery = Battery(ON_BATTERY)
    monitor = PowerMonitor(battery)
    monitor.check()
    battery.fail = True
    assert monitor.check() == ON_BATTERY
    assert monitor.state == ON_BATTERY


def test_psutil_source_returns_a_state() -> None:
    state = psutil_source()
    assert isinstance(state, PowerState)
    if not state.has_battery:
        assert state == AC_NO_BATTERY


@pytest.fixture
def daemon(tmp_path: Path, model_path: Path, monkeypatch: pytest.MonkeyPatch
           ) -> Iterator[tuple[Daemon, Battery]]:
    for var in ("DISPLAY", "WAYLAND_DISPLAY"):
        monkeypatch.delenv(var, raising=False)
    paths = UserPaths(config_dir=tmp_path / "config", data_dir=tmp_path / "data",
                      cache_dir=tmp_path / "cache", runtime_dir=tmp_path / "run")
    config = parse_config({
        "watch": {"folders": [str(tmp_path / "inbox")], "quiet_period_s": 0.3},
        "model": {"path": str(model_path), "max_new_tokens": 48},
        "plugins": {"digest": {"enabled": False}},
    })
    battery = Battery(ON_BATTERY)
    daemon = Daemon(config, paths, power_source=battery)
    daemon.start()
    try:
        yield daemon, battery
    finally:
        daemon.shutdown()


def topics(daemon: Daemon, topic: str) -> list[dict[str, object]]:
    return [json.loads(r["body"]) for r in daemon.store.query(
        "SELECT body FROM events WHERE topic = ? ORDER BY seq", (topic,))]


def test_battery_defers_folder_backlog(daemon: tuple[Daemon, Battery], tmp_path: Path) -> None:
    d, battery = daemon
    status = d.power_status()
    assert status["on_battery"] is True
    assert status["percent"] == 42.0
    assert status["backlog_deferred"] is True
    assert status["keep_alive_s"] == d.config.power.battery_keep_alive_s
    assert topics(d, Topic.POWER_CHANGED) == [{**ON_BATTERY.to_dict(),
                                               "backlog_deferred": True}]

    note = tmp_path / "inbox" / "tram.txt"
    note.write_text("The tram runs every ten minutes. The last one leaves at midnight.\n")
    wait_for(lambda: topics(d, Topic.DOCUMENT_DETECTED), 30, "the document to be queued")
    # An interactive job still runs on battery, and the document's job waits behind it.
    job = d.store.call(lambda tx: enqueue(tx, JobKind.ASK, Lane.INTERACTIVE,
                                          payload={"prompt": "Say hello."}))
    d.wake_dispatcher()
    wait_for(lambda: d.store.query("SELECT state FROM jobs WHERE id = ?",
                                   (job,))[0]["state"] == "done", 180, "the ask job")
    states = [r["state"] for r in d.store.query(
        "SELECT state FROM jobs WHERE kind = 'summarize.document'")]
    assert states == ["queued"]

    battery.state = ON_AC
    d.power.check()
    assert d.power_status()["backlog_deferred"] is False
    wait_for(lambda: topics(d, Topic.DOCUMENT_SUMMARIZED), 180, "the deferred summary")
    assert topics(d, Topic.POWER_CHANGED)[-1] == {**ON_AC.to_dict(),
                                                  "backlog_deferred": False}
