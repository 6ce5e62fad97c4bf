"""Messages between the daemon and its video workers, on the worker endpoint.

The daemon binds a ROUTER socket (`worker.sock` in the runtime folder, and optionally a TCP
endpoint with CURVE); each worker connects a DEALER socket. Every message is a multipart
ZeroMQ message whose first frame is a UTF-8 JSON object with `v` (the protocol version) and
`type`. Only `done` carries a second frame: the MP4 file's bytes, so a worker on another host
needs no shared folder.

Worker to daemon: `hello` (first message), `progress`, `done`, `failed`, `heartbeat`, `bye`
(it exits after its idle timeout). Daemon to worker: `welcome` (the reply to `hello`), `job`,
`cancel`, `heartbeat`, `exit`.
"""

from __future__ import annotations

import json
from typing import Any

WORKER_PROTOCOL_VERSION = 1
WORKER_SOCKET_NAME = "worker.sock"
# A finished video travels as one frame; larger frames disconnect the peer.
MAX_FRAME_BYTES = 2 * 1024**3


class Msg:
    """Values of the `type` field."""

    HELLO = "hello"
    WELCOME = "welcome"
    JOB = "job"
    PROGRESS = "progress"
    DONE = "done"
    FAILED = "failed"
    CANCEL = "cancel"
    HEARTBEAT = "heartbeat"
    BYE = "bye"
    EXIT = "exit"


class Failure:
    """Values of `kind` in a `failed` message."""

    CANCELLED = "cancelled"  # stopped by a cancel before the VAE decode; no file written
    OUT_OF_MEMORY = "out_of_memory"  # the worker exits after it, so the next job gets a fresh one
    INVALID = "invalid"  # the parameters do not suit the model (frame count, size, audio)
    LOAD_FAILED = "load_failed"  # the pipeline could not be loaded; the worker exits
    ERROR = "error"  # any other exception


class WorkerProtocolError(Exception):
    """A frame from the other side is not a valid worker message."""


def encode(message_type: str, /, **fields: Any) -> bytes:
    return json.dumps({"v": WORKER_PROTOCOL_VERSION, "type": message_type, **fields},
                      separators=(",", ":")).encode("utf-8")


def decode(frame: bytes) -> dict[str, Any]:
    """Decode one JSON frame; raise WorkerProtocolError for anything but a known message."""
    try:
        data = json.loads(frame)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise WorkerProtocolError(f"not UTF-8 JSON: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("type"), str):
        raise WorkerProtocolError("expected a JSON object with a string `type`")
    if data.get("v") != WORKER_PROTOCOL_VERSION:
        raise WorkerProtocolError(f"worker protocol version {data.get('v')!r} is not "
                                  f"supported; use {WORKER_PROTOCOL_VERSION}")
    return data
