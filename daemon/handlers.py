"""Request handlers: one function per bus method, with its parameters and result.

Each handler receives the decoded request and returns a JSON-able result, or raises
RequestError with a code from the protocol's catalogue. They run on the bus thread, so they
only read the store or queue short writes.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from famulus.daemon import documents, journal
from famulus.daemon.config import ConfigError
from famulus.daemon.documents import FileInfo
from famulus.daemon.journal import JobKind, JobState, Lane
from famulus.daemon.model.supervisor import ModelError, ModelHost
from famulus.daemon.video.requests import make_video_handlers
from famulus.ipc.protocol import PROTOCOL_VERSION, ErrorCode, Method, Request
from famulus.ipc.server import Handler, RequestError

if TYPE_CHECKING:
    from famulus.daemon.lifecycle import Daemon

logger = logging.getLogger(__name__)


def _int_param(request: Request, name: str, default: int | None = None) -> int:
    value = request.params.get(name, default)
    # SQLite integers are 64-bit signed; larger values would fail inside the query.
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63:
        raise RequestError(ErrorCode.INVALID_PARAMS,
                           f"`{name}` must be a whole number from 0 to 2**63-1, got {value!r}")
    return value


def _bool_param(request: Request, name: str, default: bool) -> bool:
    value = request.params.get(name, default)
    if not isinstance(value, bool):
        raise RequestError(ErrorCode.INVALID_PARAMS,
                           f"`{name}` must be true or false, got {value!r}")
    return value


def make_handlers(daemon: Daemon) -> dict[str, Handler]:
    store = daemon.store

    def status(request: Request) -> dict[str, Any]:
        """Return daemon state, model state, queue depth and counts.

        Params: none. Result: {"state", "pid", "version", "uptime_s", "model": {...},
        "jobs": {state: n}, "documents": {state: n}, "current_job", "last_seq",
        "watch_folders", "storage_full", "bus": {...}}.
        """
        conn = store.read()
        first, last = conn.execute("SELECT MIN(seq), MAX(seq) FROM events").fetchone()
        last = last or 0
        return {"state": daemon.state.value, "pid": os.getpid(), "version": daemon.version,
                "uptime_s": round(daemon.uptime_s(), 3), "model": daemon.model_status(),
                "vision": daemon.vision_status(),
                "jobs": journal.counts(conn), "documents": documents.counts(conn),
                "current_job": daemon.dispatcher.current_job if daemon.dispatcher else None,
                "first_seq": first or 0, "last_seq": last, "paused": daemon.paused,
                "watch_folders": [str(f) for f in daemon.config.watch_folders()],
                "storage_full": store.full,
                "bus": dict(daemon.bus.stats) if daemon.bus else {},
                "power": daemon.power_status(),
                "video": daemon.video.status() if daemon.video else None}

    def check_not_busy() -> None:
        limit = daemon.config.jobs.max_queued_requests
        waiting = store.read().execute(
            "SELECT COUNT(*) FROM jobs WHERE state = ? AND lane = ?",
            (JobState.QUEUED, int(Lane.INTERACTIVE))).fetchone()[0]
        if waiting >= limit:
            raise RequestError(ErrorCode.BUSY, f"{waiting} requests are already waiting "
                               f"(jobs.max_queued_requests={limit}); try again when one has "
                               "finished, or raise that limit")

    def summarize(request: Request) -> dict[str, Any]:
        """Queue a summary of a file (`path`) or of inline `text` in the interactive lane.

        Result: {"job": id} plus {"document": id} for a path. With `force` (default true) an
        unchanged file gets a job too; that job reuses the stored summary of the same bytes.
        When the file already has a queued job, that job's id is returned.
        """
        path, text = request.params.get("path"), request.params.get("text")
        stream = _bool_param(request, "stream", False)
        if (path is None) == (text is None):
            raise RequestError(ErrorCode.INVALID_PARAMS, "give exactly one of `path` and `text`")
        check_not_busy()
        if text is not None:
            if not isinstance(text, str) or not text.strip():
                raise RequestError(ErrorCode.INVALID_PARAMS, "`text` must be non-empty text")
            job_id = store.call(lambda tx: journal.enqueue(
                tx, JobKind.SUMMARIZE_TEXT, Lane.INTERACTIVE,
                payload={"text": text, "stream": stream}, cause=request.id))
            daemon.wake_dispatcher()
            return {"job": job_id}
        if not isinstance(path, str) or not os.path.isabs(path) or "\0" in path:
            raise RequestError(ErrorCode.INVALID_PARAMS,
                               f"`path` must be an absolute path, got {path!r}")
        try:
            info = FileInfo.of(Path(path))
        except OSError as exc:
            raise RequestError(ErrorCode.NOT_FOUND,
                               f"cannot read {path}: {exc.strerror}") from None
        if not os.path.isfile(path):
            raise RequestError(ErrorCode.INVALID_PARAMS,
                               f"`path` must name a regular file, and {path} is not one")
        force = _bool_param(request, "force", True)
        job_id = store.call(lambda tx: documents.submit_file(
            tx, info, lane=Lane.INTERACTIVE, cause=request.id, force=force,
            payload={"stream": stream}))
        daemon.wake_dispatcher()
        row = documents.get_by_path(store.read(), info.path)
        return {"job": job_id, "document": row["id"] if row else None}

    def ask(request: Request) -> dict[str, Any]:
        """Queue a free prompt to the resident model in the interactive lane.

        Params: {"prompt": str, "stream": bool (default false), "max_new_tokens": int
        (default model.max_new_tokens)}. Result: {"job": id}. The reply text is in the
        `job.done` result; with `stream`, `job.token` events carry it while it is generated.
        """
        prompt = request.params.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise RequestError(ErrorCode.INVALID_PARAMS, "`prompt` must be non-empty text")
        stream = _bool_param(request, "stream", False)
        check_not_busy()
        limit = request.params.get("max_new_tokens")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)
                                  or not 1 <= limit <= 4096):
            raise RequestError(ErrorCode.INVALID_PARAMS, f"`max_new_tokens` must be 1 to 4096, "
                               f"got {limit!r}")
        job_id = store.call(lambda tx: journal.enqueue(
            tx, JobKind.ASK, Lane.INTERACTIVE,
            payload={"prompt": prompt, "stream": stream, "max_new_tokens": limit},
            cause=request.id))
        daemon.wake_dispatcher()
        return {"job": job_id}

    def job(request: Request) -> dict[str, Any]:
        """Return one job by `id`, with its state, attempts, error and result."""
        found = journal.get(store.read(), _int_param(request, "id"))
        if found is None:
            raise RequestError(ErrorCode.NOT_FOUND, f"no job with id {request.params['id']}")
        return found

    def events(request: Request) -> dict[str, Any]:
        """Return stored events after sequence `since`, oldest first, in bounded pages.

        Params: {"since": int, "limit": int?, "topics": [str]?}. Result: {"events":
        [envelope], "last_seq": the highest sequence number this page examined, "more": bool}.
        """
        since = _int_param(request, "since", 0)
        page = daemon.config.bus.events_page_size
        limit = min(_int_param(request, "limit", page), page)
        if limit < 1:
            raise RequestError(ErrorCode.INVALID_PARAMS,
                               f"`limit` must be at least 1, got {limit}")
        topics = request.params.get("topics") or None
        if topics is not None and not (isinstance(topics, list)
                                       and all(isinstance(t, str) for t in topics)):
            raise RequestError(ErrorCode.INVALID_PARAMS, "`topics` must be a list of strings")
        rows = store.query("SELECT * FROM events WHERE seq > ? ORDER BY seq LIMIT ?",
                           (since, limit))
        out = [_envelope(row) for row in rows if topics is None or row["topic"] in topics]
        last = rows[-1]["seq"] if rows else since
        return {"events": out, "last_seq": last, "more": len(rows) == limit}

    def jobs(request: Request) -> dict[str, Any]:
        """List jobs newest first.

        Params (all optional): {"state": str or [str], "kind": str, "lane": str, "document":
        int, "before": job id to page backwards from, "limit": 1..500 (default 50)}. Result:
        {"jobs": [job], "more": bool}.
        """
        states = request.params.get("state")
        if isinstance(states, str):
            states = [states]
        if states is not None and not (isinstance(states, list) and
                                       all(s in set(JobState) for s in states)):
            raise RequestError(ErrorCode.INVALID_PARAMS, f"`state` must be one or more of "
                               f"{', '.join(JobState)}, got {states!r}")
        lane_name = request.params.get("lane")
        lanes = {lane.name.lower(): lane for lane in Lane}
        if lane_name is not None and lane_name not in lanes:
            raise RequestError(ErrorCode.INVALID_PARAMS, f"`lane` must be one of "
                               f"{', '.join(lanes)}, got {lane_name!r}")
        kind = request.params.get("kind")
        if kind is not None and not isinstance(kind, str):
            raise RequestError(ErrorCode.INVALID_PARAMS, f"`kind` must be a string, got {kind!r}")
        limit = _int_param(request, "limit", 50)
        if not 1 <= limit <= 500:
            raise RequestError(ErrorCode.INVALID_PARAMS, f"`limit` must be 1 to 500, got {limit}")
        document = request.params.get("document")
        before = request.params.get("before")
        for name, value in (("document", document), ("before", before)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise RequestError(ErrorCode.INVALID_PARAMS,
                                   f"`{name}` must be a whole number, got {value!r}")
        rows = journal.listing(store.read(), states=states, kind=kind,
                               lane=None if lane_name is None else lanes[lane_name],
                               document_id=document, before_id=before, limit=limit + 1)
        return {"jobs": rows[:limit], "more": len(rows) > limit}

    def cancel(request: Request) -> dict[str, Any]:
        """Cancel a queued or running job by `id`.

        Result: {"job": id, "state": "cancelled"} for a queued job, or {"job": id, "state":
        "cancelling"} for a running one; `job.cancelled` follows once it has stopped.
        """
        job_id = _int_param(request, "id")
        before = store.call(lambda tx: journal.cancel(tx, job_id, "cancelled by request"))
        if before is None:
            raise RequestError(ErrorCode.NOT_FOUND, f"no job with id {job_id}")
        if before == JobState.QUEUED:
            return {"job": job_id, "state": JobState.CANCELLED.value}
        if before == JobState.RUNNING and daemon.dispatcher and daemon.dispatcher.cancel(job_id):
            return {"job": job_id, "state": "cancelling"}
        if before == JobState.RUNNING and daemon.video and daemon.video.cancel(job_id):
            return {"job": job_id, "state": "cancelling"}
        raise RequestError(ErrorCode.CONFLICT, f"job {job_id} is {before}; only queued and "
                           "running jobs can be cancelled")

    def search(request: Request) -> dict[str, Any]:
        """Search summaries by full text.

        Params: {"query": str, "limit": 1..100 (default 20)}. Every word of the query must
        occur (FTS5 with the unicode61 tokenizer, so case and accents do not matter). Result:
        {"results": [{"document", "path", "job", "summary", "snippet", "created_at"}]}, best
        match first.
        """
        query = request.params.get("query")
        if not isinstance(query, str) or not query.split():
            raise RequestError(ErrorCode.INVALID_PARAMS, "`query` must be non-empty text")
        limit = _int_param(request, "limit", 20)
        if not 1 <= limit <= 100:
            raise RequestError(ErrorCode.INVALID_PARAMS, f"`limit` must be 1 to 100, got {limit}")
        # Each word becomes a quoted FTS5 string, so that user input is never FTS syntax.
        match = " ".join('"' + word.replace('"', '""') + '"' for word in query.split())
        rows = store.query(
            "SELECT s.document_id, d.path, s.job_id, s.text, s.created_at, "
            "snippet(summaries_fts, 0, '[', ']', '…', 12) AS snippet "
            "FROM summaries_fts JOIN summaries s ON s.rowid = summaries_fts.rowid "
            "LEFT JOIN documents d ON d.id = s.document_id "
            "WHERE summaries_fts MATCH ? ORDER BY summaries_fts.rank LIMIT ?", (match, limit))
        return {"results": [{"document": r["document_id"], "path": r["path"],
                             "job": r["job_id"], "summary": r["text"], "snippet": r["snippet"],
                             "created_at": r["created_at"]} for r in rows]}

    def plugin_param(request: Request) -> str | None:
        name = request.params.get("plugin")
        if name is None:
            return None
        known = [p["name"] for p in daemon.plugin_host.listing()] if daemon.plugin_host else []
        if not isinstance(name, str) or name not in known:
            raise RequestError(ErrorCode.NOT_FOUND, f"no plugin named {name!r}; installed: "
                               f"{', '.join(known) or 'none'}")
        return name

    def pause(request: Request) -> dict[str, Any]:
        """Pause the watchers (or only `plugin`) until `resume`.

        Result: {"paused": true, "plugins": [names whose state changed]}.
        """
        changed = daemon.set_paused(True, plugin_param(request))
        return {"paused": True, "plugins": changed}

    def resume(request: Request) -> dict[str, Any]:
        """Resume the watchers (or only `plugin`); a scan catches up with what changed."""
        changed = daemon.set_paused(False, plugin_param(request))
        return {"paused": False, "plugins": changed}

    def plugins(request: Request) -> dict[str, Any]:
        """List the installed plugins.

        Result: {"plugins": [{"name", "state", "failures", "last_error", "paused", "source",
        "needs_desktop"}]}.
        """
        return {"plugins": daemon.plugin_host.listing() if daemon.plugin_host else []}

    def reload(request: Request) -> dict[str, Any]:
        """Read the config file again and apply it.

        Result: {"applied": [keys], "restart_required": [keys]}: keys whose new values took
        effect, and keys that keep their old values until the daemon restarts.
        """
        try:
            return daemon.reload()
        except ConfigError as exc:
            raise RequestError(ErrorCode.INVALID_PARAMS, f"config not reloaded: {exc}") from None

    def resident_model() -> ModelHost:
        if daemon.model is None:
            error = daemon.dispatcher.model_error if daemon.dispatcher else None
            raise RequestError(ErrorCode.CONFLICT, f"no model is configured: {error}")
        return daemon.model

    def in_background(name: str, fn: Callable[[], Any]) -> None:
        # Loading or unloading takes seconds to minutes; the bus thread must not wait. The
        # outcome arrives as model.loaded, model.unloaded or model.failed.
        def run() -> None:
            try:
                fn()
            except ModelError as exc:
                logger.warning("%s of the model failed: %s", name, exc)
        threading.Thread(target=run, name=f"model-{name}", daemon=True).start()

    def model_load(request: Request) -> dict[str, Any]:
        """Load the model now, if it is not loaded. Result: {"model", "state"}."""
        model = resident_model()
        in_background("load", model.ensure_loaded)
        return {"model": model.name, "state": model.state.state}

    def model_unload(request: Request) -> dict[str, Any]:
        """Unload the model after the running generation, if any. Result: {"model", "state"}."""
        model = resident_model()
        in_background("unload", model.unload_now)
        return {"model": model.name, "state": model.state.state}

    def model_pin(request: Request) -> dict[str, Any]:
        """Pin (`pinned`: true, the default) or unpin the model.

        A pinned model is loaded now and stays loaded whatever its keep-alive. Result:
        {"model", "pinned"}.
        """
        model = resident_model()
        pinned = _bool_param(request, "pinned", True)
        model.pin(pinned)
        if pinned:
            in_background("load", model.ensure_loaded)
        return {"model": model.name, "pinned": pinned}

    def shutdown(request: Request) -> dict[str, Any]:
        """Ask the daemon to stop (staged shutdown, as after SIGTERM)."""
        daemon.request_stop()
        return {"stopping": True}

    return {Method.STATUS: status, Method.SUMMARIZE: summarize, Method.JOB: job,
            Method.ASK: ask, Method.JOBS: jobs, Method.CANCEL: cancel, Method.SEARCH: search,
            Method.PAUSE: pause, Method.RESUME: resume, Method.RELOAD: reload,
            Method.EVENTS: events, Method.SHUTDOWN: shutdown, Method.PLUGINS: plugins,
            Method.MODEL_LOAD: model_load, Method.MODEL_UNLOAD: model_unload,
            Method.MODEL_PIN: model_pin,
            **make_video_handlers(daemon)}


def _envelope(row: Any) -> dict[str, Any]:
    return {"v": PROTOCOL_VERSION, "seq": row["seq"], "id": row["id"], "cause": row["cause"],
            "ts": row["ts"], "topic": row["topic"], "body": json.loads(row["body"])}
