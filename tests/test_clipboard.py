"""The clipboard plugin against a real X server (Xvfb), real xclip copies and a real daemon."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator

import pytest

from famulus.daemon.config import ConfigError, parse_config, parse_plugin_section
from famulus.ipc.protocol import Event, Topic
from famulus.plugins.clipboard import ClipboardSettings, check_offer, compile_patterns
from famulus.plugins.clipboard_watchers import Offer
from tests.conftest import DaemonHome, wait_for
from tests.xserver import Copies, SelectionOwner, xvfb

RESULT_TIMEOUT_S = 180

CLIPBOARD_CONFIG = """
[plugins.clipboard]
backend = "x11"
actions = ["summarize"]
summarize_min_chars = 80
min_chars = 20
max_chars = 2000
deny_apps = ["KeePassXC"]

[plugins.digest]
enabled = false
"""


def article(marker: str) -> str:
    return (f"Report {marker}. The harbour town of Lindby opened a new ferry line in May. "
            "The ferry crosses the bay four times a day and carries up to sixty passengers. "
            "Tickets cost twelve crowns, and children under ten travel free of charge.")


@pytest.fixture
def display() -> Iterator[str]:
    with xvfb() as name:
        yield name


@pytest.fixture
def clipboard_home(display: str, daemon_home: DaemonHome) -> Iterator[DaemonHome]:
    # `display` comes first, so the X server outlives the daemon at teardown.
    daemon_home.write_config(extra=CLIPBOARD_CONFIG)
    daemon_home.env["DISPLAY"] = display
    daemon_home.env.pop("WAYLAND_DISPLAY", None)
    yield daemon_home


def topic_events(home: DaemonHome, topic: str) -> list[Event]:
    assert home.log is not None
    return home.log.matching(topic)


def wait_skipped(home: DaemonHome, reason: str, count: int) -> None:
    wait_for(lambda: len([e for e in topic_events(home, Topic.CLIPBOARD_SKIPPED)
                          if e.body["reason"] == reason]) >= count, 30,
             f"clipboard.skipped number {count} with reason {reason}")


def clipboard_jobs(home: DaemonHome) -> list[Event]:
    return [e for e in topic_events(home, Topic.JOB_QUEUED)
            if e.body["kind"] == "clipboard.action"]


def test_copy_pause_and_limits(clipboard_home: DaemonHome, display: str) -> None:
    home = clipboard_home
    copies = Copies(display)
    early_marker = uuid.uuid4().hex
    marker = uuid.uuid4().hex
    try:
        # Copied before the start: not new, so not processed.
        copies.copy(article(early_marker))
        wait_for(lambda: copies.current() == article(early_marker), 10,
                 "xclip to own the clipboard")
        home.start()

        copies.copy(article(marker))
        result = home.log.wait(lambda e: e.topic == Topic.CLIPBOARD_RESULT,
                               RESULT_TIMEOUT_S, "clipboard.result")
        assert result.body["action"] == "summarize"
        assert result.body["text"].strip()
        assert result.body["chars"] == len(article(marker))

        # A short copy is skipped; once its event is in, the first copy is fully handled.
        copies.copy("too short")
        wait_skipped(home, "too_small", 1)

        # Over the maximum: skipped with its length, not processed.
        copies.copy("x" * 2500)
        wait_skipped(home, "too_large", 1)
        oversized = [e for e in topic_events(home, Topic.CLIPBOARD_SKIPPED)
                     if e.body["reason"] == "too_large"]
        assert oversized[0].body == {"reason": "too_large", "chars": 2500}

        # Paused: a copy is not read at all. The copy after the resume is.
        with home.client() as client:
            assert client.call("pause", {"plugin": "clipboard"})["plugins"] == ["clipboard"]
            paused_marker = uuid.uuid4().hex
            copies.copy(article(paused_marker))
            wait_for(lambda: "clipboard change not read: paused" in home.stderr(), 30,
                     "the daemon to pass over the copy made while paused")
            listing = {p["name"]: p for p in client.call("plugins")["plugins"]}
            assert listing["clipboard"]["paused"] is True
            assert listing["folder_watch"]["paused"] is False
            assert client.call("resume", {"plugin": "clipboard"})["plugins"] == ["clipboard"]
        copies.copy("short again")
        wait_skipped(home, "too_small", 2)
    finally:
        copies.close()

    assert len(topic_events(home, Topic.CLIPBOARD_RESULT)) == 1
    assert len(clipboard_jobs(home)) == 1
    rows = home.rows("SELECT action, chars, text FROM clipboard_results")
    assert [(r["action"], r["chars"]) for r in rows] == [("summarize", len(article(marker)))]
    assert rows[0]["text"] == result.body["text"]
    # The job's payload carried the copied text; it is cleared once the result is stored.
    payloads = home.rows("SELECT payload FROM jobs WHERE kind = 'clipboard.action'")
    assert [r["payload"] for r in payloads] == ["{}"]
    home.stop()
    log = home.stderr()
    assert marker not in log
    assert paused_marker not in log
    assert early_marker not in log
    assert "reason=too_large chars=2500" in log
    assert paused_marker not in database_bytes(home).decode("utf-8", "replace")


@pytest.mark.parametrize("backend", ["x11", "poll"])
def test_secret_leaves_no_trace(clipboard_home: DaemonHome, display: str, backend: str) -> None:
    home = clipboard_home
    home.write_config(extra=CLIPBOARD_CONFIG.replace('backend = "x11"',
                                                     f'backend = "{backend}"\n'
                                                     "poll_interval_s = 0.2"))
    home.start(wait_model=False)

    copies = Copies(display)
    marker = "s3cret-" + uuid.uuid4().hex
    owner = SelectionOwner(display, f"hunter2 password {marker} for the mail account",
                           secret=True)
    try:
        owner.take()
        wait_for(lambda: "x-kde-passwordManagerHint" in owner.requested, 30,
                 "the daemon to ask for the password-manager hint")
        copies.copy("sync copy")  # handled only after the secret offer was
        wait_skipped(home, "too_small", 1)
    finally:
        owner.close()
        copies.close()

    # Never read past the mark: the text itself was not even requested.
    assert "UTF8_STRING" not in owner.requested
    assert not clipboard_jobs(home)
    events = list(home.log.events)
    home.stop()

    assert not [e for e in events if e.topic.startswith("clipboard.")
                and e.body.get("reason") != "too_small"]
    assert not [e for e in events if marker in str(e.body)]
    assert marker.encode() not in database_bytes(home)
    log = home.stderr()
    assert marker not in log
    assert "clipboard change skipped: reason=secret" in log
    assert f"watching the clipboard: backend={backend}" in log


def test_denied_app_skipped(clipboard_home: DaemonHome, display: str) -> None:
    home = clipboard_home
    home.start(wait_model=False)
    marker = uuid.uuid4().hex
    owner = SelectionOwner(display, article(marker), secret=False,
                           wm_class=("keepassxc", "KeePassXC"))
    try:
        owner.take()
        wait_skipped(home, "denied_app", 1)
    finally:
        owner.close()
    assert not clipboard_jobs(home)
    assert "UTF8_STRING" in owner.requested or "TARGETS" in owner.requested
    home.stop()
    assert marker not in home.stderr()


def database_bytes(home: DaemonHome) -> bytes:
    """Return the bytes of the database and its WAL and shared-memory files."""
    folder = home.database.parent
    return b"".join(p.read_bytes() for p in sorted(folder.glob(home.database.name + "*")))


# -- decisions without a display -------------------------------------------------------------

def test_check_offer_reasons() -> None:
    settings = ClipboardSettings(min_chars=5, max_chars=50, deny_apps=("KeePassXC",))
    patterns = compile_patterns(settings)
    key = "-----BEGIN OPENSSH PRIVATE KEY-----\nabc"
    cases = [
        (Offer("a secret text", secret=True), "secret"),
        (Offer("some text here", owner=("keepassxc", "KeePassXC")), "denied_app"),
        (Offer(None, oversized=True), "too_large"),
        (Offer("   "), "empty"),
        (Offer("abc"), "too_small"),
        (Offer("y" * 51), "too_large"),
        (Offer(key), "denied_pattern"),
        (Offer("an ordinary sentence"), None),
    ]
    for offer, reason in cases:
        assert check_offer(offer, settings, patterns).reason == reason, offer


def test_invalid_settings_name_key() -> None:
    config = parse_config({"plugins": {"clipboard": {"deny_patterns": ["("]}}})
    settings = parse_plugin_section(config, "clipboard", ClipboardSettings)
    with pytest.raises(ConfigError, match=re.escape("plugins.clipboard.deny_patterns")):
        compile_patterns(settings)
    config = parse_config({"plugins": {"clipboard": {"actions": ["sing"]}}})
    with pytest.raises(ConfigError, match="plugins.clipboard.actions.*summarize, explain"):
        parse_plugin_section(config, "clipboard", ClipboardSettings)
    config = parse_config({"plugins": {"clipboard": {"max_char": 5}}})
    with pytest.raises(ConfigError, match="unknown key plugins.clipboard.max_char"):
        parse_plugin_section(config, "clipboard", ClipboardSettings)


def test_plugins_table_rejects_loose_keys() -> None:
    with pytest.raises(ConfigError, match=r"\[plugins.clipboard\]"):
        parse_config({"plugins": {"backend": "x11"}})

