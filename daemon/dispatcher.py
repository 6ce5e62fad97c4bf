"""The dispatcher: runs queued jobs one at a time, most urgent lane first.

It owns every interaction with the model host. It loads the model at start (so the model
is resident before the first document arrives), then sleeps on a condition until a job is
queued: an idle daemon has no polling loop here.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from famulus.daemon import documents, image_jobs, journal, plugin_jobs
from famulus.daemon.config import Config
from famulus.daemon.documents import DocState, FileInfo, Outcome
from famulus.daemon.extract import ExtractionError
from famulus.daemon.extract.image import is_image
from famulus.daemon.extract.sandbox import ExtractionSandbox
from famulus.daemon.grounding.policy import Action, ground, unchecked
from famulus.daemon.journal import MODEL_LANES, Job, JobKind
from famulus.daemon.model.catalog import ModelSpec
from famulus.daemon.model.registry import sha256_of
from famulus.daemon.model.summarize import (
    DEFAULT_PROMPTS,
    STRICT_PROMPTS,
    Budget,
    DegenerateOutput,
    EmptySummary,
    Prompts,
    Summarizer,
    generate_clean,
)
from famulus.daemon.model.supervisor import (
    GenerationStopped,
    HostCrashed,
    HostTimeout,
    LoadFailed,
    ModelError,
    ModelHost,
)
from famulus.daemon.store import StorageFull, Store, Tx
from famulus.ipc.protocol import Topic

logger = logging.getLogger(__name__)

# How often a write is tried again while the disk is full, in seconds. Only then does the
# dispatcher wake up without a reason.
STORAGE_RETRY_S = 5.0


class PermanentFailure(Exception):
    """A job failed for a reason that a retry cannot fix; `code` is machine-readable."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class Dispatcher:
    def __init__(self, config: Config, store: Store, model: ModelHost | None,
                 model_name: str, model_error: str | None = None,
                 model_spec: ModelSpec | None = None) -> None:
        self.config = config
        self.store = store
        self.model = model
        self.model_name = model_name
        self.model_error = model_error
        # Generation settings: the model's own ([models.NAME] over [model]) when resolved.
        self.generation: ModelSpec | Any = model_spec or config.model
        self.current_job: int | None = None
        # The jobs in progress: the outer one and, while it yields between two chunks, the
        # more urgent ones run inside it (see _yield_to_urgent).
        self._running: list[int] = []
        # The vision model for image documents; set by image_jobs.attach before start.
        self.vision: image_jobs.VisionModel | None = None
        # Lanes whose jobs stay queued for now: the folder backlog while on battery.
        self.deferred_lanes: frozenset[journal.Lane] = frozenset()
        self._cancel_job: int | None = None
        self._wake = threading.Condition()
        self._pending_wake = False
        self._stopping = threading.Event()
        self.extractor = ExtractionSandbox(timeout_s=config.extract.timeout_s,
                                           memory_bytes=config.extract.max_memory_bytes)
        self._thread = threading.Thread(target=self._run, name="dispatcher", daemon=True)

    # -- control ----------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        """Tell the dispatcher that a job may be waiting (call after the commit)."""
        with self._wake:
            self._pending_wake = True
            self._wake.notify()

    def cancel(self, job_id: int) -> bool:
        """Stop the running job `job_id`; return False when it is not a running job."""
        if job_id not in self._running:
            return False
        self._cancel_job = job_id
        # A job paused for a more urgent one stops at its next chunk; only the innermost
        # job is generating now.
        if self.model is not None and self._running[-1] == job_id:
            self.model.cancel()
        if self.vision is not None and self.vision.host is not None:
            self.vision.host.cancel()
        return True

    def stop(self, timeout: float) -> None:
        self._stopping.set()
        if self.model is not None:
            self.model.cancel()
        vision_host = self.vision.host if self.vision is not None else None
        if vision_host is not None:
            vision_host.cancel()
        self.wake()
        self._thread.join(timeout)
        if self._thread.is_alive():
            busy = f"job={self.current_job}" if self.current_job else "loading the model"
            logger.warning("dispatcher still busy after %.1f s (%s)", timeout, busy)
        self.extractor.close()
        if vision_host is not None:
            vision_host.stop()

    # -- loop -------------------------------------------------------------------------------

    def _run(self) -> None:
        if not self._load_model():
            return
        while not self._stopping.is_set():
            with self._wake:
                self._pending_wake = False
            try:
                job = self.store.call(partial(journal.claim_next,
                                              skip_lanes=self.deferred_lanes))
            except StorageFull:
                self._stopping.wait(STORAGE_RETRY_S)  # the store has logged why
                continue
            except Exception:
                logger.exception("claiming the next job failed")
                job = None
            if job is None:
                with self._wake:
                    while not self._pending_wake and not self._stopping.is_set():
                        self._wake.wait()
                continue
            self._run_guarded(job)
            self._log_backlog()

    def _run_guarded(self, job: Job) -> None:
        outer = self.current_job
        self.current_job = job.id
        self._running.append(job.id)
        try:
            self._run_job(job)
        except StorageFull:
            self._requeue_when_writable(job)
        except Exception as exc:
            # A bug must cost one job, not the dispatcher thread.
            logger.exception("job failed with an internal error: job=%d", job.id)
            failure = PermanentFailure("internal", f"internal error: {type(exc).__name__}: "
                                       f"{exc}")
            self._finish(job, partial(self._fail_permanently, job=job, exc=failure))
        finally:
            self._running.pop()
            self.current_job = outer

    def _yield_to_urgent(self, job: Job) -> None:
        """Run queued jobs of more urgent lanes now, between two chunks of `job`.

        One generation runs at a time, so an interactive request waits at most for the chunk
        in progress of a long background document, not for the whole document.
        """
        urgent_lanes = tuple(lane for lane in MODEL_LANES if lane < job.lane)
        while urgent_lanes and not self._stopping.is_set():
            urgent = self.store.call(partial(journal.claim_next, lanes=urgent_lanes,
                                             skip_lanes=self.deferred_lanes))
            if urgent is None:
                return
            logger.info("job %d pauses between chunks for more urgent job %d", job.id,
                        urgent.id)
            self._run_guarded(urgent)

    def _requeue_when_writable(self, job: Job) -> None:
        """Queue a job again once its result could not be recorded for lack of disk space.

        The job stays `running` in the database meanwhile, so a restart also queues it again.
        """
        while not self._stopping.is_set():
            try:
                self.store.call(lambda tx: journal.requeue(tx, job, "disk full",
                                                           count_attempt=False))
            except StorageFull:
                self._stopping.wait(STORAGE_RETRY_S)
                continue
            logger.info("job queued again after the disk was full: job=%d", job.id)
            return

    def _log_backlog(self) -> None:
        """Log the queue depth after each job, so a long backlog shows its progress."""
        waiting = journal.counts(self.store.read()).get(journal.JobState.QUEUED, 0)
        if waiting:
            logger.info("backlog: %d job(s) queued", waiting)

    def _load_model(self) -> bool:
        if self.model is None:
            self._emit(Topic.MODEL_FAILED, {"model": self.model_name, "error": self.model_error})
            logger.error("no model: %s. Documents wait in the queue.", self.model_error)
            self._stopping.wait()
            return False
        # The model host announces model.loading, model.loaded and model.failed itself, for
        # this first load and for every reload after an idle unload or a crash.
        try:
            self.model.ensure_loaded()
        except ModelError as exc:
            self.model_error = str(exc)
            if self._stopping.is_set():
                return False
            logger.error("model %s failed to load: %s. Documents wait in the queue.",
                         self.model_name, exc)
            # TODO: retry the load when the model's config changes. `reload` reports model
            # keys as needing a restart, so today only a restart retries it.
            self._stopping.wait()
            return False
        return True

    def _emit(self, topic: str, body: dict[str, Any], cause: str | None = None) -> None:
        self.store.submit(lambda tx: tx.emit(topic, body, cause))

    def _finish(self, job: Job, fn: Any) -> None:
        self.store.call(fn)

    # -- jobs -------------------------------------------------------------------------------

    def _run_job(self, job: Job) -> None:
        logger.info("job started: job=%d kind=%s attempt=%d", job.id, job.kind, job.attempts)
        try:
            if job.kind == JobKind.SUMMARIZE_DOCUMENT:
                self._summarize_document(job)
            elif job.kind == JobKind.SUMMARIZE_TEXT:
                self._summarize_text(job)
            elif job.kind == JobKind.ASK:
                self._ask(job)
            elif job.kind == JobKind.CLIPBOARD_ACTION:
                plugin_jobs.run_clipboard_action(self, job)
            elif job.kind == JobKind.DIGEST:
                plugin_jobs.run_digest(self, job)
            else:
                raise PermanentFailure("unknown_kind", f"unknown job kind {job.kind!r}")
        except DegenerateOutput as exc:
            failure = PermanentFailure("degenerate_output", str(exc))
            logger.warning("job failed: job=%d reason=%s", job.id, exc)
            self._finish(job, partial(self._fail_permanently, job=job, exc=failure))
        except PermanentFailure as exc:
            logger.warning("job failed: job=%d reason=%s", job.id, exc)
            self._finish(job, partial(self._fail_permanently, job=job, exc=exc))
        except (ModelError, EmptySummary) as exc:
            if self._cancel_job == job.id:
                logger.info("job cancelled while running: job=%d", job.id)
                self._finish(job, partial(self._cancelled, job=job))
            else:
                self._retry_or_fail(job, exc)
        finally:
            if self._cancel_job == job.id:
                self._cancel_job = None

    def _cancelled(self, tx: Tx, job: Job) -> None:
        reason = "cancelled by request"
        if job.document_id is not None:
            # Settled as skipped: the watcher does not queue it again until the file changes.
            documents.settle(tx, job, DocState.SKIPPED, info=None, sha256=None, reason=reason,
                             reason_code="cancelled")
        journal.mark_cancelled(tx, job, reason)

    def _retry_or_fail(self, job: Job, exc: Exception) -> None:
        if self._stopping.is_set():
            logger.info("job interrupted by shutdown, queued again: job=%d", job.id)
            self._finish(job, lambda tx: journal.requeue(tx, job, None, count_attempt=False))
            return
        permanent = isinstance(exc, LoadFailed)
        attempts = self.config.jobs.max_attempts
        crashed = isinstance(exc, (HostCrashed, HostTimeout))
        if crashed:
            # A job that crashes the host may well be the cause: retry it once, not more.
            attempts = min(attempts, 2)
        if not permanent and job.attempts < attempts:
            logger.warning("job failed, will retry: job=%d attempt=%d error=%s", job.id,
                           job.attempts, exc)
            self._finish(job, lambda tx: journal.requeue(tx, job, str(exc)))
            return
        reason = "the model host crashed" if crashed else "summary failed"
        failure = PermanentFailure("model_error", f"{reason} after {job.attempts} "
                                   f"attempt(s): {exc}")
        logger.error("job failed: job=%d error=%s", job.id, exc)
        self._finish(job, lambda tx: self._fail_permanently(tx, job, failure))

    def _fail_permanently(self, tx: Tx, job: Job, exc: PermanentFailure) -> None:
        if job.document_id is None:
            journal.fail(tx, job, str(exc))
            return
        row = tx.execute("SELECT path FROM documents WHERE id = ?", (job.document_id,)).fetchone()
        info = _file_info(Path(row["path"]))
        documents.settle(tx, job, DocState.FAILED, info=info, sha256=None, reason=str(exc),
                         reason_code=exc.code)
        tx.emit(Topic.DOCUMENT_FAILED, {"document": job.document_id, "path": row["path"],
                                        "job": job.id, "reason_code": exc.code,
                                        "reason": str(exc)}, job.cause)
        journal.fail(tx, job, str(exc))

    def _summarize_document(self, job: Job) -> None:
        row = self.store.query("SELECT * FROM documents WHERE id = ?", (job.document_id,))[0]
        path = Path(row["path"])
        info = _file_info(path)
        if info is None:
            self._finish(job, lambda tx: self._vanished(tx, job, str(path)))
            return
        if info.size == 0:
            self._finish(job, lambda tx: self._skip(tx, job, info, "empty file"))
            return
        if info.size > self.config.watch.max_file_bytes:
            raise PermanentFailure("too_large", f"{path} has {info.size} bytes, more than "
                                   f"watch.max_file_bytes={self.config.watch.max_file_bytes}; "
                                   "raise that limit to summarize it")
        sha256 = sha256_of(path)
        if row["sha256"] == sha256 and row["state"] == DocState.SUMMARIZED:
            self._finish(job, lambda tx: self._unchanged(tx, job, info))
            return
        if is_image(path):
            image_jobs.describe_document(self, job, info, sha256)
            return
        earlier = documents.summary_for_content(self.store.read(), sha256, self.model_name)
        if earlier is not None:
            logger.info("same content summarized before, reusing it: job=%d document=%d",
                        job.id, job.document_id)
            reused = Outcome.from_row(earlier)
            self._finish(job, lambda tx: self._store_summary(
                tx, job, info, sha256, fmt=row["format"], outcome=reused,
                reused_from=earlier["document_id"]))
            return
        try:
            extracted = self.extractor.extract(path, max_bytes=self.config.watch.max_file_bytes)
        except ExtractionError as exc:
            if exc.permanent:
                raise PermanentFailure(exc.reason, str(exc)) from exc
            raise ModelError(str(exc)) from exc  # temporary: retried like a model failure
        outcome = self._write_summary(job, extracted.text)
        self._finish(job, lambda tx: self._store_summary(
            tx, job, info, sha256, fmt=extracted.format, outcome=outcome, reused_from=None))

    def _summarize_text(self, job: Job) -> None:
        text = str(job.payload.get("text", "")).strip()
        if not text:
            raise PermanentFailure("no_text", "the text to summarize is empty")
        outcome = self._write_summary(job, text)

        def store(tx: Tx) -> None:
            documents.save_summary(tx, job, sha256=None, model=self.model_name,
                                   outcome=outcome)
            journal.finish(tx, job, {"summary": outcome.text, "chunks": outcome.chunks,
                                     "model": self.model_name, "device": outcome.device,
                                     **outcome.grounding_fields()})
        self._finish(job, store)

    def _ask(self, job: Job) -> None:
        assert self.model is not None
        prompt = str(job.payload.get("prompt", "")).strip()
        if not prompt:
            raise PermanentFailure("no_text", "the prompt is empty")
        cfg = self.generation
        if self._cancel_job == job.id:
            raise GenerationStopped("generation cancelled by request")
        stream = self._token_stream(job)
        text, replies = generate_clean(
            self.model, [{"role": "user", "content": prompt}],
            max_new_tokens=int(job.payload.get("max_new_tokens") or cfg.max_new_tokens),
            repetition_penalty=cfg.repetition_penalty, timeout_s=cfg.generation_timeout_s,
            on_token=stream.add if stream else None)
        if stream:
            stream.flush()
        result = {"text": text, "tokens": sum(int(r["tokens"]) for r in replies),
                  "generation_s": round(sum(float(r["generation_s"]) for r in replies), 3),
                  "model": self.model_name, "device": self._device()}
        self._finish(job, lambda tx: journal.finish(tx, job, result))

    def _token_stream(self, job: Job) -> TokenStream | None:
        if not job.payload.get("stream"):
            return None
        return TokenStream(lambda body: self._emit(Topic.JOB_TOKEN, {"job": job.id, **body},
                                                   job.cause))

    def _write_summary(self, job: Job, source: str) -> Outcome:
        """Summarize `source`, then check the summary against it and apply the policy."""
        result = self._summarizer(job).summarize(source)
        totals = {"tokens": result.generated_tokens, "seconds": result.generation_s}

        def regenerate() -> str:
            logger.info("summary names facts the source lacks; trying stricter prompts: "
                        "job=%d", job.id)
            retry = self._summarizer(job, STRICT_PROMPTS).summarize(source)
            totals["tokens"] += retry.generated_tokens
            totals["seconds"] += retry.generation_s
            return retry.text

        cfg = self.config.grounding
        if cfg.enabled:
            checked = ground(source, result.text, regenerate,
                             action=Action(cfg.on_unsupported), retry=cfg.retry,
                             extractive_sentences=cfg.extractive_sentences)
        else:
            checked = unchecked(source, result.text)
        if checked.unsupported:
            logger.info("grounding: job=%d path=%s unsupported_claims=%d", job.id,
                        checked.path, len(checked.unsupported))
        return Outcome(text=checked.text, device=self._device(), chunks=result.chunks,
                       generated_tokens=totals["tokens"],
                       generation_s=round(totals["seconds"], 3), grounding=str(checked.path),
                       grounded=checked.grounded, unsupported=checked.unsupported)

    def _summarizer(self, job: Job, prompts: Prompts = DEFAULT_PROMPTS) -> Summarizer:
        assert self.model is not None
        cfg = self.generation
        budget = Budget(max_prompt_tokens=self._prompt_budget(),
                        max_new_tokens=cfg.max_new_tokens,
                        repetition_penalty=cfg.repetition_penalty,
                        timeout_s=cfg.generation_timeout_s)

        stream = self._token_stream(job)

        def progress(done: int, total: int) -> None:
            self._yield_to_urgent(job)
            # A cancel that arrives between two generations takes effect before the next.
            if self._cancel_job == job.id:
                raise GenerationStopped("generation cancelled by request")
            # A shutdown that began while the text was being extracted must not start a
            # generation that outlasts it: the job goes back to the queue instead.
            if self._stopping.is_set():
                raise GenerationStopped("the daemon is stopping")
            self._emit(Topic.JOB_PROGRESS, {"job": job.id, "step": done, "steps": total},
                       job.cause)
        return Summarizer(self.model, budget, progress, prompts,
                          on_token=stream.add if stream else None)

    def _prompt_budget(self) -> int:
        cfg = self.generation
        if self._device() == "NPU":
            return min(cfg.max_prompt_tokens, cfg.npu_max_prompt_len)
        return cfg.max_prompt_tokens

    def _device(self) -> str:
        return (self.model.state.device if self.model else None) or "unknown"

    # -- outcomes (run on the writer thread) -----------------------------------------------

    def _store_summary(self, tx: Tx, job: Job, info: FileInfo, sha256: str, *, fmt: str | None,
                       outcome: Outcome, reused_from: int | None, model: str | None = None
                       ) -> None:
        model = model or self.model_name
        documents.save_summary(tx, job, sha256=sha256, model=model, outcome=outcome)
        documents.settle(tx, job, DocState.SUMMARIZED, info=info, sha256=sha256, fmt=fmt)
        body = {"document": job.document_id, "path": info.path, "job": job.id,
                "kind": "image" if fmt == "image" else "text",
                "summary": outcome.text, "model": model, "device": outcome.device,
                "chunks": outcome.chunks, "sha256": sha256, "reused_from": reused_from,
                "generated_tokens": outcome.generated_tokens,
                "generation_s": outcome.generation_s, **outcome.grounding_fields()}
        tx.emit(Topic.DOCUMENT_SUMMARIZED, body, job.cause)
        journal.finish(tx, job, {"document": job.document_id, "chunks": outcome.chunks,
                                 "reused_from": reused_from, "summary": outcome.text,
                                 **outcome.grounding_fields()})

    def _skip(self, tx: Tx, job: Job, info: FileInfo, reason: str) -> None:
        documents.settle(tx, job, DocState.SKIPPED, info=info, sha256=None, reason=reason,
                         reason_code="empty")
        tx.emit(Topic.DOCUMENT_SKIPPED, {"document": job.document_id, "path": info.path,
                                         "job": job.id, "reason_code": "empty",
                                         "reason": reason}, job.cause)
        journal.finish(tx, job, {"skipped": reason})

    def _unchanged(self, tx: Tx, job: Job, info: FileInfo) -> None:
        # Only the timestamps moved (a touch, or a save with identical bytes).
        documents.settle(tx, job, DocState.SUMMARIZED, info=info, sha256=None)
        journal.finish(tx, job, {"unchanged": True})

    def _vanished(self, tx: Tx, job: Job, path: str) -> None:
        documents.mark_removed(tx, path, job.cause)
        journal.finish(tx, job, {"removed": True})


class TokenStream:
    """Batches streamed text pieces into `job.token` events, about ten per second at most.

    Every event is a committed write to the event log, so one event per word would cost one
    disk sync per word.
    """

    INTERVAL_S = 0.1

    def __init__(self, emit: Callable[[dict[str, Any]], None]) -> None:
        self._emit = emit
        self._pieces: list[str] = []
        # The first piece goes out at once, because time to first token is what a user waits for.
        self._last = time.monotonic() - self.INTERVAL_S
        self._index = 0

    def add(self, piece: str) -> None:
        self._pieces.append(piece)
        if time.monotonic() - self._last >= self.INTERVAL_S:
            self.flush()

    def flush(self) -> None:
        if not self._pieces:
            return
        self._emit({"index": self._index, "text": "".join(self._pieces)})
        self._pieces.clear()
        self._index += 1
        self._last = time.monotonic()


def _file_info(path: Path) -> FileInfo | None:
    try:
        return FileInfo.of(path)
    except OSError:
        return None
