"""Image documents (png, jpg, jpeg, webp): described by the vision model. Run by the dispatcher.

The image is decoded and scaled down in the extraction child process, whose time and memory
limits also cover image decoders. The vision model runs in a second model host, started on
the first image. Its description is stored as the document's summary. Grounding does not
apply because an image has no source text to check the description against.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from famulus.daemon import documents, journal
from famulus.daemon.config import Config
from famulus.daemon.documents import DocState, FileInfo, Outcome
from famulus.daemon.extract import ExtractionError
from famulus.daemon.grounding.policy import GroundingPath
from famulus.daemon.journal import Job
from famulus.daemon.model import catalog
from famulus.daemon.model.catalog import ModelSpec
from famulus.daemon.model.hygiene import clean
from famulus.daemon.model.registry import ModelNotFound, read_registry
from famulus.daemon.model.summarize import EmptySummary
from famulus.daemon.model.supervisor import (
    GenerationStopped,
    LoadFailed,
    ModelError,
    ModelHost,
)
from famulus.daemon.model.validate import check_model
from famulus.daemon.paths import UserPaths
from famulus.daemon.store import Store, Tx
from famulus.ipc.protocol import Topic

if TYPE_CHECKING:
    from famulus.daemon.dispatcher import Dispatcher

logger = logging.getLogger(__name__)

DESCRIBE_PROMPT = ("Describe this image in two or three sentences: what it shows, and any "
                   "text that is written in it.")
NO_VISION_MODEL = "no_vision_model"
NO_VISION_MODEL_REASON = ("no vision model configured; set model.vision to a registered vision "
                          "model (or model.vision_path to its OpenVINO IR folder) and restart "
                          "famulus to describe this image")


@dataclass
class VisionModel:
    """The configured vision model: its host (None when the model was not found) and name."""

    name: str
    host: ModelHost | None
    error: str | None = None


def attach(dispatcher: Dispatcher, config: Config, paths: UserPaths) -> None:
    """Give the dispatcher the configured vision model, and queue images that waited for one.

    Call before the dispatcher starts. The model host process starts on the first image.
    """
    vision = build_vision_model(config, paths, dispatcher.store)
    dispatcher.vision = vision
    if vision is None:
        return
    queued = dispatcher.store.call(queue_skipped_images)
    if queued:
        logger.info("vision model configured: %d image(s) skipped earlier queued again", queued)


def build_vision_model(config: Config, paths: UserPaths, store: Store) -> VisionModel | None:
    """Return the configured vision model, or None when `model.vision` and its path are empty."""
    cfg = config.model
    if not cfg.vision and not cfg.vision_path:
        return None
    # Descriptions record the model by name, or by folder name when a path is configured.
    name = Path(cfg.vision_path).name if cfg.vision_path else cfg.vision
    try:
        if cfg.vision_path:
            path = _resolve(paths.models_dir, cfg.vision, cfg.vision_path)
            check_model(path, "vlm")
            spec = ModelSpec(name=name, path=path, kind="vlm", format="openvino",
                             **_model_values(config))
        else:
            # A registered name: its [models.NAME] table applies, as for the text model.
            try:
                spec = catalog.spec(config, paths.models_dir, cfg.vision)
            except ModelNotFound as exc:
                raise ModelNotFound(f"vision model (model.vision): {exc}. Register it with "
                                    f"`famulus model import SRC --kind vlm --name "
                                    f"{cfg.vision}`, or set model.vision_path to its "
                                    "OpenVINO IR folder") from exc
            if spec.kind != "vlm":
                raise ModelNotFound(f"model.vision names {cfg.vision!r}, which is a {spec.kind} "
                                    "model; import a vision model with `famulus model import "
                                    "SRC --kind vlm` and name that one")
    except ModelNotFound as exc:
        logger.error("vision model not found: %s", exc)
        return VisionModel(name=name, host=None, error=str(exc))

    def emit(topic: str, body: dict[str, Any]) -> None:
        # The kind field separates the model.* events of the vision host from the text model's.
        store.submit(lambda tx: tx.emit(topic, {**body, "kind": "vlm"}))

    host = ModelHost(spec.load_params(paths.cache_dir), name=name,
                     backoff_s=config.jobs.restart_backoff_s, on_event=emit,
                     keep_alive_s=spec.keep_alive_s,
                     battery_keep_alive_s=spec.battery_keep_alive_s)
    return VisionModel(name=name, host=host)


def _model_values(config: Config) -> dict[str, Any]:
    """Collect the [model] and [power] settings of a ModelSpec for a model given by path."""
    fields = [f.name for f in dataclasses.fields(ModelSpec)
              if f.name not in ("name", "path", "kind", "format")]
    values = {f: getattr(config.model, f) for f in fields if f != "battery_keep_alive_s"}
    return {**values, "battery_keep_alive_s": config.power.battery_keep_alive_s}


def _resolve(models_dir: Path, name: str, path: str) -> Path:
    if path:
        target = Path(path).expanduser()
        if not target.is_dir():
            raise ModelNotFound(f"model.vision_path {target} is not a folder; set it to the "
                                "OpenVINO IR folder of a vision model, or clear it to use "
                                "model.vision")
        return target
    entry = read_registry(models_dir).get(name)
    if entry is None:
        raise ModelNotFound(f"vision model {name!r} (model.vision) is not registered in "
                            f"{models_dir}; register it with `famulus model import SRC --name "
                            f"{name}`, or set model.vision_path to its OpenVINO IR folder")
    target = Path(entry["path"])
    if not target.is_dir():
        raise ModelNotFound(f"vision model {name!r} is registered at {target}, which is not a "
                            "folder; import it again with `famulus model import`")
    return target


def queue_skipped_images(tx: Tx) -> int:
    """Queue again every image recorded as skipped for lack of a vision model; return how many."""
    rows = tx.execute("SELECT path FROM documents WHERE state = ? AND reason_code = ?",
                      (DocState.SKIPPED, NO_VISION_MODEL)).fetchall()
    queued = 0
    for row in rows:
        try:
            info = FileInfo.of(Path(row["path"]))
        except OSError:
            continue  # the file is gone; the folder watcher records the removal
        if documents.submit_file(tx, info, force=True) is not None:
            queued += 1
    return queued


def describe_document(dispatcher: Dispatcher, job: Job, info: FileInfo, sha256: str) -> None:
    """Describe the image of a document job and store the description as its summary."""
    from famulus.daemon.dispatcher import PermanentFailure

    vision = dispatcher.vision
    if vision is None:
        dispatcher._finish(job, lambda tx: _skip_without_model(tx, job, info))
        return
    if vision.host is None:
        raise PermanentFailure("model_error", f"the vision model could not be loaded: "
                               f"{vision.error}")
    earlier = documents.summary_for_content(dispatcher.store.read(), sha256, vision.name)
    if earlier is not None:
        logger.info("same image described before, reusing it: job=%d document=%d", job.id,
                    job.document_id)
        reused = Outcome.from_row(earlier)
        dispatcher._finish(job, lambda tx: dispatcher._store_summary(
            tx, job, info, sha256, fmt="image", outcome=reused,
            reused_from=earlier["document_id"], model=vision.name))
        return

    cfg = dispatcher.config
    try:
        image = dispatcher.extractor.decode_image(
            Path(info.path), max_bytes=cfg.watch.max_file_bytes,
            max_side_px=cfg.model.vision_max_side_px, max_pixels=cfg.model.vision_max_pixels)
    except ExtractionError as exc:
        if exc.permanent:
            raise PermanentFailure(exc.reason, str(exc)) from exc
        raise ModelError(str(exc)) from exc  # temporary: retried like a model failure
    logger.info("image decoded: job=%d format=%s source=%sx%s scaled=%sx%s", job.id,
                image["format"], *image["source_size"], image["shape"][1], image["shape"][0])

    _ensure_loaded(dispatcher, vision, vision.host)
    if dispatcher._cancel_job == job.id:
        raise GenerationStopped("generation cancelled by request")
    stream = dispatcher._token_stream(job)
    reply = vision.host.describe(
        image, DESCRIBE_PROMPT, max_new_tokens=cfg.model.max_new_tokens,
        repetition_penalty=cfg.model.repetition_penalty,
        timeout_s=cfg.model.generation_timeout_s, on_token=stream.add if stream else None)
    if stream:
        stream.flush()
    text = clean(str(reply["text"]))
    if not text:
        raise EmptySummary("the vision model returned an empty description")
    outcome = Outcome(text=text, device=vision.host.state.device or "unknown", chunks=1,
                      generated_tokens=int(reply["tokens"]),
                      generation_s=float(reply["generation_s"]),
                      grounding=str(GroundingPath.NOT_APPLICABLE), grounded=None,
                      unsupported=[])
    dispatcher._finish(job, lambda tx: dispatcher._store_summary(
        tx, job, info, sha256, fmt="image", outcome=outcome, reused_from=None,
        model=vision.name))


def _ensure_loaded(dispatcher: Dispatcher, vision: VisionModel, host: ModelHost) -> None:
    """Start and load the vision model host if it is not running.

    The host itself announces model.loading, model.loaded and model.failed (with kind vlm),
    here and for a reload after an idle unload.
    """
    if host.state.state == "loaded" and host.state.pid is not None:
        return
    if host.state.state == "failed":
        # Loading again would fail the same way; a restart after a config change retries.
        raise LoadFailed(f"the vision model {vision.name} failed to load: {host.state.error}")
    try:
        host.ensure_loaded()
    except ModelError as exc:
        logger.error("vision model %s failed to load: %s", vision.name, exc)
        raise


def _skip_without_model(tx: Tx, job: Job, info: FileInfo) -> None:
    documents.settle(tx, job, DocState.SKIPPED, info=info, sha256=None,
                     reason=NO_VISION_MODEL_REASON, reason_code=NO_VISION_MODEL, fmt="image")
    tx.emit(Topic.DOCUMENT_SKIPPED, {"document": job.document_id, "path": info.path,
                                     "job": job.id, "reason_code": NO_VISION_MODEL,
                                     "reason": NO_VISION_MODEL_REASON}, job.cause)
    journal.finish(tx, job, {"skipped": NO_VISION_MODEL_REASON})
