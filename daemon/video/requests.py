"""The `video.submit` request: checks the parameters and queues a job in the video lane."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from famulus.daemon import journal
from famulus.daemon.journal import JobKind, Lane
from famulus.ipc.protocol import ErrorCode, Method, Request
from famulus.ipc.server import Handler, RequestError

if TYPE_CHECKING:
    from famulus.daemon.lifecycle import Daemon

# LTX-Video's usual output: 704x480, 121 frames (about 5 s at 24 fps).
DEFAULTS = {"frames": 121, "width": 704, "height": 480, "fps": 24, "steps": 40}


def _bounded_int(request: Request, name: str, low: int, high: int, limit_key: str) -> int:
    value = request.params.get(name, DEFAULTS.get(name))
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(ErrorCode.INVALID_PARAMS,
                           f"`{name}` must be a whole number, got {value!r}")
    if not low <= value <= high:
        hint = f" (raise {limit_key} to allow more)" if limit_key and value > high else ""
        raise RequestError(ErrorCode.INVALID_PARAMS,
                           f"`{name}` must be from {low} to {high}, got {value}{hint}")
    return value


def make_video_handlers(daemon: Daemon) -> dict[str, Handler]:
    def submit(request: Request) -> dict[str, Any]:
        """Queue a video job in the video lane.

        Params: {"prompt": str, "frames", "width", "height", "fps", "steps": int (see
        DEFAULTS), "seed": int or null, "audio": bool (default false)}. Result: {"job": id}.
        The MP4's path comes in the `video.done` event and the job's result.
        """
        cfg = daemon.config.video
        if not cfg.model_dir and not cfg.tcp_endpoint:
            raise RequestError(ErrorCode.INVALID_PARAMS, "video is not set up: set "
                               "video.model_dir to a diffusers LTX-Video pipeline folder (or "
                               "video.tcp_endpoint for remote workers) and restart famulus")
        prompt = request.params.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise RequestError(ErrorCode.INVALID_PARAMS, "`prompt` must be non-empty text")
        payload: dict[str, Any] = {
            "prompt": prompt,
            "frames": _bounded_int(request, "frames", 1, cfg.max_frames, "video.max_frames"),
            "width": _bounded_int(request, "width", 8, cfg.max_width_px, "video.max_width_px"),
            "height": _bounded_int(request, "height", 8, cfg.max_height_px,
                                   "video.max_height_px"),
            "fps": _bounded_int(request, "fps", 1, 120, ""),
            "steps": _bounded_int(request, "steps", 1, cfg.max_steps, "video.max_steps"),
        }
        seed = request.params.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)
                                 or not 0 <= seed < 2**63):
            raise RequestError(ErrorCode.INVALID_PARAMS,
                               f"`seed` must be a whole number from 0 to 2**63-1 or null, "
                               f"got {seed!r}")
        audio = request.params.get("audio", False)
        if not isinstance(audio, bool):
            raise RequestError(ErrorCode.INVALID_PARAMS,
                               f"`audio` must be true or false, got {audio!r}")
        payload.update(seed=seed, audio=audio)
        job_id = daemon.store.call(lambda tx: journal.enqueue(
            tx, JobKind.VIDEO, Lane.VIDEO, payload=payload, cause=request.id))
        if daemon.video is not None:
            daemon.video.wake()
        return {"job": job_id}

    return {Method.VIDEO_SUBMIT: submit}
