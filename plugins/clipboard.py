"""The clipboard plugin: new clipboard text runs the configured actions as clipboard jobs.

Changes are detected from events where the platform sends them and by polling otherwise:

- X11: XFixes selection-owner events (python-xlib); the text is read as UTF8_STRING.
- Wayland: `wl-paste --watch` (wl-clipboard).
- Elsewhere, or when `backend = "poll"`: `xclip` or `wl-paste` every `poll_interval_s`.

Privacy rules, applied before anything is stored:

- Text that a password manager marks as secret (the `x-kde-passwordManagerHint` target with
  the value `secret`) is never read past that mark, passed to an action, stored, logged or
  published. Only the fact that a secret was skipped is logged.
- Deny patterns, an application deny list (matched against the owner window's WM_CLASS on
  X11), and minimum and maximum sizes skip text with a `clipboard.skipped` event that carries
  the reason and the length, never the text.
- While paused, changes are not read at all.
- Logs carry lengths and hash prefixes, never clipboard text.
"""

from __future__ import annotations

import hashlib
import re
import threading
from dataclasses import dataclass
from typing import ClassVar

from famulus.daemon.config import ConfigError, setting
from famulus.ipc.protocol import Topic
from famulus.plugins.api import PluginContext
from famulus.plugins.clipboard_watchers import Offer, Watcher, choose_watcher

ACTIONS = ("summarize", "explain", "translate")


@dataclass(frozen=True)
class ClipboardSettings:
    backend: str = setting(
        "auto", "How changes are detected: auto (X11 events, Wayland events, else polling), "
        "x11, wayland or poll.", choices=("auto", "x11", "wayland", "poll"))
    poll_interval_s: float = setting(
        1.0, "Interval of the polling backend.", min=0.1)
    actions: tuple[str, ...] = setting(
        ["summarize"], "Actions run on new clipboard text: summarize, explain, translate.",
        choices=ACTIONS)
    summarize_min_chars: int = setting(
        400, "The summarize action runs only on text at least this long.", min=1)
    summarize_prompt: str = setting(
        "Summarize the following text in two or three sentences. Use only facts from the "
        "text.", "Instruction placed before the clipboard text for the summarize action.")
    explain_prompt: str = setting(
        "Explain the following text in simple words.",
        "Instruction placed before the clipboard text for the explain action.")
    translate_prompt: str = setting(
        "Translate the following text into {language}. Reply with the translation only.",
        "Instruction for the translate action; {language} is replaced by translate_language.")
    translate_language: str = setting("English", "Target language of the translate action.")
    min_chars: int = setting(
        20, "Shorter text is skipped (single words, numbers, paths).", min=1)
    max_chars: int = setting(
        20000, "Longer text is skipped without being processed.", min=1)
    deny_patterns: tuple[str, ...] = setting(
        [r"-----BEGIN [A-Z ]*PRIVATE KEY-----"],
        "Regular expressions (Python syntax); text that matches any of them is skipped.")
    deny_apps: tuple[str, ...] = setting(
        ["keepassxc", "keepass2", "1password", "bitwarden", "org.gnome.seahorse"],
        "Applications whose clipboard text is skipped, matched case-insensitively against "
        "the owner's WM_CLASS (X11 only; other platforms do not report the owner).")
    retention_days: float = setting(
        7.0, "Clipboard results older than this are deleted by the retention purge.",
        min=0.0)
    max_results: int = setting(
        500, "Only this many of the newest clipboard results are kept.", min=1)


@dataclass(frozen=True)
class Decision:
    reason: str | None
    chars: int = 0
    sha256: str = ""


def check_offer(offer: Offer, settings: ClipboardSettings,
                patterns: list[re.Pattern[str]]) -> Decision:
    """Decide whether a clipboard change is processed; `reason` names why it is skipped."""
    if offer.secret:
        return Decision("secret")
    denied = {a.lower() for a in settings.deny_apps}
    if any(name.lower() in denied for name in offer.owner):
        return Decision("denied_app")
    if offer.oversized:
        return Decision("too_large")
    text = offer.text
    if text is None or not text.strip():
        return Decision("empty")
    chars = len(text)
    if chars < settings.min_chars:
        return Decision("too_small", chars)
    if chars > settings.max_chars:
        return Decision("too_large", chars)
    if any(p.search(text) for p in patterns):
        return Decision("denied_pattern", chars)
    return Decision(None, chars, hashlib.sha256(text.encode("utf-8", "replace")).hexdigest())


def compile_patterns(settings: ClipboardSettings) -> list[re.Pattern[str]]:
    out = []
    for pattern in settings.deny_patterns:
        try:
            out.append(re.compile(pattern))
        except re.error as exc:
            raise ConfigError(f"invalid value {pattern!r} in plugins.clipboard.deny_patterns: "
                              f"{exc}; write a Python regular expression") from None
    return out


class ClipboardPlugin:
    """Watches the clipboard and queues the configured actions on new text."""

    name: ClassVar[str] = "clipboard"
    config_schema: ClassVar[type] = ClipboardSettings
    needs_desktop: ClassVar[bool] = True

    def __init__(self) -> None:
        self._ctx: PluginContext | None = None
        self._settings = ClipboardSettings()
        self._patterns: list[re.Pattern[str]] = []
        self._paused = threading.Event()
        self._stopping = threading.Event()
        self._watcher: Watcher | None = None
        self._thread: threading.Thread | None = None
        self._last_sha256 = ""
        self._pause_logged = False
        self.backend = "none"

    def start(self, context: PluginContext) -> None:
        self._ctx = context
        self._settings = context.settings
        self._patterns = compile_patterns(self._settings)
        watcher = choose_watcher(self._settings, self._offer, self._should_read,
                                 context.logger.warning)
        if watcher is None:
            context.logger.warning("no clipboard found (DISPLAY and WAYLAND_DISPLAY unset, "
                                   "or no xclip/wl-paste); the clipboard plugin stays idle")
            return
        watcher.prime()
        self._watcher = watcher
        self.backend = watcher.kind
        context.logger.info("watching the clipboard: backend=%s actions=%s", watcher.kind,
                            ",".join(self._settings.actions) or "none")
        self._thread = context.spawn(watcher.run, "watch")

    def stop(self, timeout: float) -> None:
        self._stopping.set()
        if self._watcher is not None:
            self._watcher.stop()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def pause(self) -> None:
        self._paused.set()
        if self._ctx is not None:
            self._ctx.logger.info("clipboard watching paused")

    def resume(self) -> None:
        self._pause_logged = False
        self._paused.clear()
        if self._ctx is not None:
            self._ctx.logger.info("clipboard watching resumed")

    def _should_read(self) -> bool:
        """Tell the watcher whether to read a change at all."""
        if self._stopping.is_set():
            return False
        if self._paused.is_set():
            # Logged once per pause, because the polling backend checks at every interval.
            if self._ctx is not None and not self._pause_logged:
                self._pause_logged = True
                self._ctx.logger.info("clipboard change not read: paused")
            return False
        return True

    def _offer(self, offer: Offer) -> None:
        assert self._ctx is not None
        ctx = self._ctx
        if self._paused.is_set() or self._stopping.is_set():
            return
        decision = check_offer(offer, self._settings, self._patterns)
        if decision.reason == "secret":
            # Nothing about a secret goes further than this line: no length, no hash, no event.
            ctx.logger.info("clipboard change skipped: reason=secret")
            return
        if decision.reason == "empty":
            return
        if decision.reason is not None:
            ctx.logger.info("clipboard change skipped: reason=%s chars=%d", decision.reason,
                            decision.chars)
            ctx.publish(Topic.CLIPBOARD_SKIPPED, {"reason": decision.reason,
                                                  "chars": decision.chars})
            return
        if decision.sha256 == self._last_sha256:
            return  # the same text again (a re-copy, or an owner change with equal text)
        self._last_sha256 = decision.sha256
        assert offer.text is not None
        queued = []
        for action in self._settings.actions:
            if action == "summarize" and decision.chars < self._settings.summarize_min_chars:
                continue
            job = ctx.submit_job("clipboard.action", {
                "action": action, "text": offer.text, "prompt": self._prompt(action),
                "language": self._settings.translate_language, "sha256": decision.sha256,
                "max_results": self._settings.max_results}, lane="clipboard")
            queued.append(f"{action}:{job}")
        ctx.logger.info("clipboard change: chars=%d sha256=%s jobs=%s", decision.chars,
                        decision.sha256[:12], ",".join(queued) or "none")

    def _prompt(self, action: str) -> str:
        s = self._settings
        return {"summarize": s.summarize_prompt, "explain": s.explain_prompt,
                "translate": s.translate_prompt}[action]
