"""Third-party plugins found through real entry points, supervised by a real daemon."""

from __future__ import annotations

import os
import subprocess
import textwrap
from pathlib import Path

from famulus.ipc.protocol import Topic
from tests.conftest import DaemonHome, wait_for

SUMMARY_TIMEOUT_S = 180

PLUGIN_MODULE = '''
import threading
from dataclasses import dataclass

from famulus.daemon.config import setting


@dataclass(frozen=True)
class EchoSettings:
    topic: str = setting("document.summarized", "Topic whose events are recorded.")


class EchoPlugin:
    """Records the path of each event of one topic in its data folder."""

    name = "echo"
    config_schema = EchoSettings

    def start(self, context):
        self.context = context
        context.subscribe(context.settings.topic, self.record)

    def record(self, event):
        with open(self.context.data_dir / "seen.txt", "a", encoding="utf-8") as f:
            f.write(event.body["path"] + "\\n")

    def stop(self, timeout):
        pass


class StartFailsPlugin:
    name = "start_fails"

    def start(self, context):
        raise RuntimeError("start failed on purpose")

    def stop(self, timeout):
        pass


class ThreadFailsPlugin:
    """Starts a plain thread that raises a moment later."""

    name = "thread_fails"

    def start(self, context):
        threading.Thread(target=self.run, daemon=True).start()

    def run(self):
        threading.Event().wait(0.3)
        raise RuntimeError("thread failed on purpose")

    def stop(self, timeout):
        pass


class SummaryFailsPlugin:
    """Raises in its event callback for every summarized document."""

    name = "summary_fails"

    def start(self, context):
        context.subscribe("document.summarized", self.fail)

    def fail(self, event):
        raise RuntimeError("callback failed on purpose")

    def stop(self, timeout):
        pass


@dataclass(frozen=True)
class StrictSettings:
    level: int = setting(1, "A level of at least 1.", min=1)


class StrictPlugin:
    name = "strict"
    config_schema = StrictSettings

    def start(self, context):
        pass

    def stop(self, timeout):
        pass
'''

ENTRY_POINTS = """\
[famulus.plugins]
echo = famulus_test_plugins:EchoPlugin
start_fails = famulus_test_plugins:StartFailsPlugin
thread_fails = famulus_test_plugins:ThreadFailsPlugin
strict = famulus_test_plugins:StrictPlugin
summary_fails = famulus_test_plugins:SummaryFailsPlugin
"""


FACTS = [
    "The museum shows old maps of the coast. It opens at ten.",
    "The bakery sells rye bread on Fridays. It closes at six.",
    "The swimming pool is heated in winter. Lessons start in March.",
    "The library lends bicycles to members. Each loan lasts a week.",
]


def plugin_state(home: DaemonHome, name: str) -> str:
    with home.client() as client:
        listing = {p["name"]: p for p in client.call("plugins")["plugins"]}
    return str(listing[name]["state"])


def install_test_plugins(site: Path) -> None:
    """Write a module and its dist-info, as pip would install a wheel, into `site`."""
    site.mkdir()
    (site / "famulus_test_plugins.py").write_text(PLUGIN_MODULE, encoding="utf-8")
    info = site / "famulus_test_plugins-0.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: famulus-test-plugins\n"
                                   "Version: 0.0\n", encoding="utf-8")
    (info / "entry_points.txt").write_text(ENTRY_POINTS, encoding="utf-8")


def use_test_plugins(home: DaemonHome) -> None:
    """Install the test plugins into the home and put them on the daemon's PYTHONPATH."""
    site = home.root / "site"
    install_test_plugins(site)
    home.env["PYTHONPATH"] = os.pathsep.join(
        [str(site), *filter(None, [os.environ.get("PYTHONPATH")])])
    home.env.pop("DISPLAY", None)
    home.env.pop("WAYLAND_DISPLAY", None)


def test_failing_plugins_disabled_daemon_summarizes(daemon_home: DaemonHome) -> None:
    use_test_plugins(daemon_home)
    daemon_home.write_config(extra=textwrap.dedent("""
        [daemon]
        plugin_max_failures = 3
        plugin_restart_backoff_s = 0.5

        [plugins.strict]
        level = 0
        """))
    daemon_home.start()
    log = daemon_home.log
    for name in ("start_fails", "thread_fails"):
        log.wait(lambda e, n=name: e.topic == Topic.PLUGIN_DISABLED
                 and e.body["plugin"] == n and e.body["failures"] == 3, 60,
                 f"{name} to be disabled")

    # summary_fails raises once per summary: restarted twice, disabled on the third, while
    # the documents keep being summarized, the fourth after it was disabled.
    paths = []
    for number, fact in enumerate(FACTS, start=1):
        path = daemon_home.inbox / f"note-{number}.txt"
        path.write_text(fact + "\n", encoding="utf-8")
        paths.append(path)
        log.wait(lambda e, p=path: e.topic == Topic.DOCUMENT_SUMMARIZED
                 and e.body["path"] == str(p), SUMMARY_TIMEOUT_S, f"summary of {path.name}")
        if number < 3:
            log.wait(lambda e, n=number: e.topic == Topic.PLUGIN_FAILED
                     and e.body["plugin"] == "summary_fails" and e.body["failures"] == n,
                     30, f"failure {number} of summary_fails")
            wait_for(lambda: plugin_state(daemon_home, "summary_fails") == "running", 30,
                     "summary_fails to run again")
        elif number == 3:
            log.wait(lambda e: e.topic == Topic.PLUGIN_DISABLED
                     and e.body["plugin"] == "summary_fails", 30, "summary_fails disabled")

    # Two restarts with backoff, then disabled on the third failure.
    for name, error in (("start_fails", "RuntimeError: start failed on purpose"),
                        ("thread_fails", "RuntimeError: thread failed on purpose"),
                        ("summary_fails", "RuntimeError: callback failed on purpose")):
        failed = log.matching(Topic.PLUGIN_FAILED, plugin=name)
        assert [e.body["failures"] for e in failed] == [1, 2]
        assert [e.body["retry_in_s"] for e in failed] == [0.5, 1.0]
        assert all(e.body["error"] == error for e in failed)

    with daemon_home.client() as client:
        listing = {p["name"]: p for p in client.call("plugins")["plugins"]}
        status = client.call("status")
    assert status["state"] == "running"
    assert status["power"]["on_battery"] in (True, False)
    assert listing["start_fails"]["state"] == "disabled"
    assert listing["start_fails"]["failures"] == 3
    assert listing["thread_fails"]["state"] == "disabled"
    assert listing["echo"]["state"] == "running"
    assert listing["echo"]["source"] == "famulus_test_plugins:EchoPlugin"
    assert listing["folder_watch"]["state"] == "running"
    assert listing["summary_fails"]["state"] == "disabled"
    assert listing["strict"]["state"] == "disabled"
    assert "plugins.strict.level" in listing["strict"]["last_error"]
    assert "at least 1" in listing["strict"]["last_error"]

    # The subscription of the working plugin saw every summary, in its own data folder.
    seen = daemon_home.root / "data" / "famulus" / "plugins" / "echo" / "seen.txt"
    wait_for(lambda: seen.exists() and len(seen.read_text().splitlines()) >= len(paths), 10,
             "the echo plugin to record every summary")
    assert seen.read_text().splitlines() == [str(p) for p in paths]

    out = subprocess.run(daemon_home.command("plugins"), env=daemon_home.env,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    lines = {line.split()[0]: line for line in out.stdout.splitlines()}
    assert "disabled" in lines["start_fails"]
    assert "failures=3" in lines["start_fails"]
    assert "start failed on purpose" in lines["start_fails"]
    assert "running" in lines["echo"]


def test_config_check_names_plugin_key(daemon_home: DaemonHome) -> None:
    use_test_plugins(daemon_home)
    daemon_home.write_config(extra=textwrap.dedent("""
        [plugins.strict]
        level = 0

        [plugins.nosuch]
        enabled = true
        """))
    out = subprocess.run(daemon_home.command("config", "check"), env=daemon_home.env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert "invalid value 0 for plugins.strict.level" in out.stderr
    assert "must be at least 1" in out.stderr
    assert "no plugin named nosuch is installed" in out.stderr
    assert "config OK" not in out.stdout


def test_reload_restarts_changed_plugin(daemon_home: DaemonHome) -> None:
    use_test_plugins(daemon_home)
    daemon_home.write_config(extra="[plugins.strict]\nlevel = 0\n")
    daemon_home.start(wait_model=False)
    assert plugin_state(daemon_home, "strict") == "disabled"

    daemon_home.write_config(extra="[plugins.strict]\nlevel = 2\n")
    with daemon_home.client() as client:
        result = client.call("reload")
    assert result["applied"] == ["plugins.strict"]
    wait_for(lambda: plugin_state(daemon_home, "strict") == "running", 30,
             "strict to run with its fixed config")
    assert plugin_state(daemon_home, "folder_watch") == "running"
