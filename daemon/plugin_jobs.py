"""Jobs that plugins submit: clipboard actions and digests. Run by the dispatcher.

A clipboard action stores its output in `clipboard_results` with the hash and length of the
clipboard text, never the text itself, and clears the job's payload (which carried the text)
in the same transaction.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from famulus.daemon import journal
from famulus.daemon.journal import Job
from famulus.daemon.model.summarize import generate_clean
from famulus.daemon.store import Tx
from famulus.ipc.protocol import Topic, now

if TYPE_CHECKING:
    from famulus.daemon.dispatcher import Dispatcher

logger = logging.getLogger(__name__)

# Token headroom left for the chat template around a clipboard prompt.
TEMPLATE_TOKENS = 32


def run_clipboard_action(d: Dispatcher, job: Job) -> None:
    from famulus.daemon.dispatcher import PermanentFailure

    assert d.model is not None
    payload = job.payload
    text = str(payload.get("text", ""))
    action = str(payload.get("action", ""))
    if not text.strip():
        raise PermanentFailure("no_text", "the clipboard text of this job is empty or purged")
    instruction = str(payload.get("prompt", "")).replace(
        "{language}", str(payload.get("language", "")))
    content, truncated = _fit(d, instruction, text)
    cfg = d.generation
    output, _ = generate_clean(d.model, [{"role": "user", "content": content}],
                               max_new_tokens=cfg.max_new_tokens,
                               repetition_penalty=cfg.repetition_penalty,
                               timeout_s=cfg.generation_timeout_s)
    sha256 = str(payload.get("sha256", ""))
    keep = int(payload.get("max_results") or 0)

    def store(tx: Tx) -> None:
        cur = tx.execute(
            "INSERT INTO clipboard_results (job_id, action, sha256, chars, text, model, "
            "created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (job.id, action, sha256, len(text), output, d.model_name, now()))
        result_id = int(cur.lastrowid or 0)
        if keep > 0:
            tx.execute("DELETE FROM clipboard_results WHERE id <= ?", (result_id - keep,))
        tx.execute("UPDATE jobs SET payload = '{}' WHERE id = ?", (job.id,))
        tx.emit(Topic.CLIPBOARD_RESULT, {
            "job": job.id, "result": result_id, "action": action, "text": output,
            "chars": len(text), "sha256": sha256, "truncated": truncated,
            "model": d.model_name, "device": d._device()}, job.cause)
        journal.finish(tx, job, {"clipboard_result": result_id, "action": action})
    d._finish(job, store)


def _fit(d: Dispatcher, instruction: str, text: str) -> tuple[str, bool]:
    """Join the instruction and the text, cutting the text to fit the prompt budget."""
    assert d.model is not None
    budget = d._prompt_budget() - TEMPLATE_TOKENS
    content = f"{instruction}\n\n{text}"
    tokens = d.model.count_tokens([[{"role": "user", "content": content}]])[0]
    if tokens <= budget:
        return content, False
    # Characters per token vary little within one text, so one proportional cut fits.
    keep = int(len(text) * budget / tokens * 0.9)
    return f"{instruction}\n\n{text[:keep]}", True


def run_digest(d: Dispatcher, job: Job) -> None:
    """Summarize the summaries of the last period, write them as Markdown, publish them."""
    payload = job.payload
    until = now()
    since = until - float(payload.get("period_s") or 86400)
    limit = int(payload.get("max_summaries") or 50)
    rows = d.store.query(
        "SELECT s.text, s.created_at, d.path FROM summaries s "
        "JOIN documents d ON d.id = s.document_id "
        "WHERE s.created_at >= ? AND s.created_at < ? ORDER BY s.created_at LIMIT ?",
        (since, until, limit))
    body: dict[str, Any] = {"job": job.id, "since": since, "until": until,
                            "summaries": len(rows), "digest": None, "path": None}
    if rows:
        source = "\n\n".join(f"{Path(r['path']).name}: {r['text']}" for r in rows)
        outcome = d._write_summary(job, source)
        body["digest"] = outcome.text
        folder = str(payload.get("folder") or "")
        if folder:
            body["path"] = str(_write_markdown(Path(folder).expanduser(), outcome.text, rows,
                                               since, until))

    def store(tx: Tx) -> None:
        tx.emit(Topic.DIGEST_READY, body, job.cause)
        journal.finish(tx, job, {"summaries": len(rows), "path": body["path"]})
    d._finish(job, store)
    logger.info("digest ready: job=%d summaries=%d path=%s", job.id, len(rows), body["path"])


def _write_markdown(folder: Path, digest: str, rows: list[Any], since: float,
                    until: float) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    stamp = datetime.fromtimestamp(until).strftime("%Y-%m-%d-%H%M%S")
    path = folder / f"digest-{stamp}.md"
    start = datetime.fromtimestamp(since).strftime("%Y-%m-%d %H:%M")
    end = datetime.fromtimestamp(until).strftime("%Y-%m-%d %H:%M")
    lines = [f"# Digest {start} to {end}", "", digest, "", "## Documents", ""]
    for row in rows:
        at = time.strftime("%H:%M", time.localtime(row["created_at"]))
        lines += [f"### {Path(row['path']).name} ({at})", "", row["text"], ""]
    # Written under a temporary name first, so a reader never sees half a file.
    partial = path.with_suffix(".md.partial")
    partial.write_text("\n".join(lines), encoding="utf-8")
    partial.replace(path)
    return path
