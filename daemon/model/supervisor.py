"""The daemon's side of the model host: starts it, talks to it, restarts it after a crash.

A native crash in an accelerator driver or a compile kills only the host process. Requests
that were in flight fail with `HostCrashed`, the next request starts a fresh host after a
backoff, and the caller decides whether to retry the job.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import IO, Any

logger = logging.getLogger(__name__)

MAX_BACKOFF_S = 60.0


class ModelError(Exception):
    """A model request failed. `temporary` is true when a retry may succeed."""

    temporary = True


class HostCrashed(ModelError):
    """The model host process exited while a request was in flight."""


class HostTimeout(ModelError):
    """The model host did not reply in time and was killed."""


class GenerationStopped(ModelError):
    """A generation was cancelled or hit its wall-clock limit."""


class LoadFailed(ModelError):
    """The model could not be loaded on any configured device."""

    temporary = False


@dataclass
class ModelState:
    """The daemon's record of the host's state, as shown by `status`."""

    state: str = "stopped"  # stopped, loading, loaded, failed
    device: str | None = None
    model: str | None = None
    load_s: float | None = None
    error: str | None = None
    device_errors: dict[str, str] = field(default_factory=dict)
    restarts: int = 0
    pid: int | None = None


class ModelHost:
    """Client of one model host process; `request` calls are thread-safe."""

    def __init__(self, load_params: dict[str, Any], *, backoff_s: float = 1.0,
                 python: str = sys.executable) -> None:
        self.load_params = load_params
        self.state = ModelState(model=str(load_params.get("path")))
        self._python = python
        self._backoff_s = backoff_s
        self._next_start = 0.0
        # _start_lock serializes starting and loading, which can take minutes; _io_lock
        # guards only stdin writes and the pending table, so cancel and crash handling never
        # wait for a load.
        self._start_lock = threading.Lock()
        self._io_lock = threading.Lock()
        self._proc: subprocess.Popen[str] | None = None
        self._pending: dict[int, Future[dict[str, Any]]] = {}
        self._streams: dict[int, Callable[[str], None]] = {}
        self._next_id = 0
        self._consecutive_crashes = 0
        self._stopping = False
        # The accelerator lease (see hold): requests wait while `_held`; `_active` counts the
        # requests in flight.
        self._gate = threading.Condition()
        self._held = False
        self._active = 0

    # -- process management -------------------------------------------------------------

    def _ensure_started(self) -> subprocess.Popen[str]:
        with self._start_lock:
            if self._proc is not None and self._proc.poll() is None:
                return self._proc
            if self._stopping:
                raise HostCrashed("the model host is stopping")
            wait = self._next_start - time.monotonic()
            if wait > 0:
                # Backoff after a crash. The caller is the dispatcher, which has nothing
                # else to run meanwhile because every job needs the model.
                logger.info("model host restart in %.1f s", wait)
                time.sleep(wait)
            proc = subprocess.Popen(
                [self._python, "-m", "famulus.daemon.model.host"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, encoding="utf-8",
                bufsize=1, close_fds=True,
            )
            self._proc = proc
            self.state.pid = proc.pid
            assert proc.stdout is not None
            threading.Thread(target=self._read, args=(proc, proc.stdout),
                             name="model-host-reader", daemon=True).start()
            logger.info("model host started: pid=%d", proc.pid)
            self._load(proc)
            return proc

    def _load(self, proc: subprocess.Popen[str]) -> None:
        self.state.state, self.state.device, self.state.error = "loading", None, None
        timeout = float(self.load_params["load_timeout_s"]) * max(
            1, len(self.load_params["devices"]))
        try:
            reply = self._send(proc, {"op": "load", **self.load_params}, timeout)
        except ModelError as exc:
            self.state.state, self.state.error = "failed", str(exc)
            raise
        self.state.state, self.state.device = "loaded", reply["device"]
        self.state.load_s, self.state.device_errors = reply["load_s"], reply["errors"]
        self._consecutive_crashes = 0

    def _read(self, proc: subprocess.Popen[str], stream: IO[str]) -> None:
        for line in stream:
            try:
                reply = json.loads(line)
                rid = int(reply["id"])
            except (ValueError, KeyError, TypeError):
                logger.warning("model host sent a malformed reply line; ignored")
                continue
            if "stream" in reply:
                self._stream_piece(rid, str(reply["stream"]))
                continue
            future = self._pending.pop(rid, None)
            self._streams.pop(rid, None)
            if future is not None:
                future.set_result(reply)
        code = proc.wait()
        with self._io_lock:
            pending, self._pending = self._pending, {}
            if self._proc is proc:
                self._proc = None
                self.state.pid = None
                if not self._stopping:
                    self._record_crash(code)
        for future in pending.values():
            future.set_exception(HostCrashed(f"model host exited with code {code}"))

    def _stream_piece(self, rid: int, piece: str) -> None:
        callback = self._streams.get(rid)
        if callback is None:
            return
        try:
            callback(piece)
        except Exception:
            # A failing consumer must not stop the reader thread that serves every request.
            logger.exception("stream consumer failed: request=%d", rid)

    def _record_crash(self, code: int) -> None:
        self._consecutive_crashes += 1
        self.state.restarts += 1
        if self.state.state != "failed":
            self.state.state = "stopped"
        delay = min(MAX_BACKOFF_S, self._backoff_s * 2 ** (self._consecutive_crashes - 1))
        self._next_start = time.monotonic() + delay
        logger.error("model host exited unexpectedly: code=%s restarts=%d next_start_in=%.1fs",
                     code, self.state.restarts, delay)

    # -- requests --------------------------------------------------------------------------

    def _send(self, proc: subprocess.Popen[str], message: dict[str, Any], timeout: float,
              on_stream: Callable[[str], None] | None = None) -> dict[str, Any]:
        future: Future[dict[str, Any]] = Future()
        with self._io_lock:
            self._next_id += 1
            rid = self._next_id
            self._pending[rid] = future
            if on_stream is not None:
                self._streams[rid] = on_stream
            try:
                assert proc.stdin is not None
                proc.stdin.write(json.dumps({"id": rid, **message}) + "\n")
                proc.stdin.flush()
            except OSError as exc:
                self._pending.pop(rid, None)
                raise HostCrashed(f"model host is gone: {exc}") from exc
        try:
            reply = future.result(timeout=timeout)
        except FutureTimeout:
            self._pending.pop(rid, None)
            self._streams.pop(rid, None)
            logger.error("model host did not reply in %.0f s to op=%s; killing it",
                         timeout, message.get("op"))
            proc.kill()
            raise HostTimeout(f"model host did not reply within {timeout:.0f} s") from None
        if reply.get("ok"):
            return reply
        kind, error = reply.get("kind", "internal"), str(reply.get("error"))
        if kind in ("cancelled", "timeout"):
            raise GenerationStopped(error)
        if kind == "load_failed":
            raise LoadFailed(error)
        raise ModelError(error)

    def request(self, message: dict[str, Any], timeout: float,
                on_stream: Callable[[str], None] | None = None) -> dict[str, Any]:
        """Send one request, starting (and loading) the host first when needed.

        While the host is held for a video job (see `hold`), the request waits.
        """
        with self._gate:
            while self._held and not self._stopping:
                self._gate.wait()
            if self._stopping:
                raise HostCrashed("the model host is stopping")
            self._active += 1
        try:
            proc = self._ensure_started()
            return self._send(proc, message, timeout, on_stream)
        finally:
            with self._gate:
                self._active -= 1
                self._gate.notify_all()

    # -- accelerator lease -------------------------------------------------------------------

    def hold(self) -> None:
        """Make new requests wait, then wait until the requests in flight have finished."""
        with self._gate:
            self._held = True
            while self._active and not self._stopping:
                self._gate.wait()

    def unload(self, timeout: float = 10.0) -> None:
        """Stop the host process to free its device memory; call `hold` first.

        The next request after `release` starts and loads a fresh host.
        """
        with self._io_lock:
            proc = self._proc
            # Cleared here, so the reader thread does not count the exit as a crash.
            self._proc = None
            self.state.pid = None
        if proc is not None:
            _close_process(proc, timeout)
        self.state.state = "unloaded"
        self.state.device = None

    def release(self) -> None:
        """Let requests run again after `hold`."""
        with self._gate:
            self._held = False
            self._gate.notify_all()

    def ensure_loaded(self) -> ModelState:
        self._ensure_started()
        return self.state

    def count_tokens(self, prompts: list[list[dict[str, str]]]) -> list[int]:
        return [int(n) for n in self.request({"op": "count", "prompts": prompts}, 60.0)["counts"]]

    def generate(self, messages: list[dict[str, str]], *, max_new_tokens: int,
                 repetition_penalty: float, timeout_s: float,
                 on_token: Callable[[str], None] | None = None) -> dict[str, Any]:
        """Generate a reply; `on_token` receives the text pieces as they are produced."""
        # The host enforces timeout_s itself; the extra margin covers a host that hangs in
        # native code and must be killed instead.
        return self.request({"op": "generate", "messages": messages,
                             "max_new_tokens": max_new_tokens,
                             "repetition_penalty": repetition_penalty,
                             "timeout_s": timeout_s, "stream": on_token is not None},
                            timeout_s + 30.0, on_token)

    def describe(self, image: dict[str, Any], prompt: str, *, max_new_tokens: int,
                 repetition_penalty: float, timeout_s: float,
                 on_token: Callable[[str], None] | None = None) -> dict[str, Any]:
        """Generate text about one image with a vision model (a host loaded with kind vlm).

        `image` has `pixels` (base64 RGB samples, HWC) and `shape` ([height, width, 3]).
        """
        return self.request({"op": "describe", "pixels": image["pixels"],
                             "shape": image["shape"], "prompt": prompt,
                             "max_new_tokens": max_new_tokens,
                             "repetition_penalty": repetition_penalty,
                             "timeout_s": timeout_s, "stream": on_token is not None},
                            timeout_s + 30.0, on_token)

    def cancel(self) -> None:
        """Stop the running generation, if any; the generate call raises GenerationStopped."""
        with self._io_lock:
            proc = self._proc
            if proc is None or proc.stdin is None:
                return
            try:
                proc.stdin.write(json.dumps({"op": "cancel"}) + "\n")
                proc.stdin.flush()
            except OSError:
                pass

    def stop(self, timeout: float = 2.0) -> None:
        """Close the host's stdin (it exits at once) and kill it if it lingers."""
        with self._io_lock:
            self._stopping = True
            proc = self._proc
        with self._gate:
            self._gate.notify_all()
        if proc is None:
            return
        _close_process(proc, timeout)
        self.state.state = "stopped"


def _close_process(proc: subprocess.Popen[str], timeout: float) -> None:
    """Close the host's stdin (it exits at once) and kill it if it lingers."""
    try:
        if proc.stdin is not None:
            proc.stdin.close()
    except OSError:
        pass
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        logger.warning("model host pid=%d did not exit in %.1f s; killing it", proc.pid,
                       timeout)
        proc.kill()
        proc.wait(timeout)
