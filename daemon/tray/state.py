"""The tray's view of the daemon: the icon state and the tooltip text."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any


class TrayState(enum.StrEnum):
    IDLE = "idle"
    WORKING = "working"
    PAUSED = "paused"
    LOADING = "loading"
    NO_MODEL = "no_model"
    ERROR = "error"
    NOT_RUNNING = "not_running"


LABELS = {
    TrayState.IDLE: "idle",
    TrayState.WORKING: "working",
    TrayState.PAUSED: "watching paused",
    TrayState.LOADING: "loading the model",
    TrayState.NO_MODEL: "no model",
    TrayState.ERROR: "error",
    TrayState.NOT_RUNNING: "not running",
}


@dataclass(frozen=True)
class TrayView:
    """The icon's content: its state, the queue depth drawn on it, and the tooltip."""

    state: TrayState
    queue_depth: int
    tooltip: str


def queue_depth(status: dict[str, Any]) -> int:
    jobs = status.get("jobs") or {}
    return int(jobs.get("queued", 0)) + int(jobs.get("running", 0))


def classify(status: dict[str, Any] | None) -> TrayState:
    """Choose the icon state for a `status` result; None means no daemon replied.

    The most urgent condition wins: no daemon, then a model that failed or is missing, then
    start-up and model loading, then pause (set by the user, so shown even while jobs run),
    then queued work.
    """
    if status is None or status.get("state") in ("stopping", "stopped"):
        return TrayState.NOT_RUNNING
    model = status.get("model") or {}
    model_state = model.get("state")
    if model_state == "failed":
        return TrayState.ERROR
    if model_state == "missing":
        return TrayState.NO_MODEL
    if status.get("state") == "starting" or model_state == "loading":
        return TrayState.LOADING
    if status.get("paused"):
        return TrayState.PAUSED
    if queue_depth(status) > 0:
        return TrayState.WORKING
    return TrayState.IDLE


def view_of(status: dict[str, Any] | None, problem: str | None = None) -> TrayView:
    """Build the icon state and tooltip for a `status` result.

    `problem` is a reason the tray could not get a status (shown when no daemon replied).
    """
    state = classify(status)
    if status is None:
        tooltip = "famulus: not running"
        if problem:
            tooltip += f"\n{problem}"
        return TrayView(state, 0, tooltip)
    depth = queue_depth(status)
    model = status.get("model") or {}
    lines = [f"famulus: {LABELS[state]}"]
    name = model.get("name") or "no model"
    lines.append(f"model: {name} on {model.get('device') or 'no device'}")
    lines.append(f"queue: {depth}")
    if state in (TrayState.ERROR, TrayState.NO_MODEL) and model.get("error"):
        # Tooltips are short on most trays; the full message is in `famulus status`.
        lines.append(_shorten(str(model["error"]), 120))
    return TrayView(state, depth, "\n".join(lines))


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"
