"""The daemon's side of the model host: starts it, talks to it, restarts it after a crash.

A native crash in an accelerator driver or a compile kills only the host process. Requests
that were in flight fail with `HostCrashed`, the next request starts a fresh host after a
backoff, and the caller decides whether to retry the job.

It also owns residency: every load, unload and failure is reported through `on_event`, and a
residency thread unloads the model after its keep-alive without requests (on mains power the
default keeps it loaded). That thread sleeps on a condition until the deadline, so an idle
daemon does not wake up for it.
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
# While a load runs, `model.loading` is repeated this often with the elapsed time, so that a
# first NPU compile of several minutes shows progress.
LOAD_PROGRESS_S = 10.0

EventSink = Callable[[str, dict[str, Any]], None]


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
    pinned: bool = False
    keep_alive_s: float | None = None  # None: stays loaded
    loading_device: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"state": self.state, "device": self.device, "name": self.model,
                "load_s": self.load_s, "error": self.error,
                "device_errors": dict(self.device_errors), "restarts": self.restarts,
                "pid": self.pid, "pinned": self.pinned, "keep_alive_s": self.keep_alive_s}


class ModelHost:
    """Client of one model host process; `request` calls are thread-safe."""

    def __init__(self, load_params: dict[str, Any], *, backoff_s: float = 1.0,
                 python: str = sys.executable, name: str | None = None,
                 on_event: EventSink | None = None, keep_alive_s: float = 0.0,
                 battery_keep_alive_s: float = 0.0, env: dict[str, str] | None = None,
                 progress_s: float = LOAD_PROGRESS_S) -> None:
        self.load_params = load_params
        self.name = name or str(load_params.get("path"))
        self.state = ModelState(model=self.name)
        self._on_event = on_event or (lambda topic, body: None)
        self._env = env
        self._progress_s = progress_s
        # 0 on mains means: stay loaded. On battery 0 means: unload right after each request.
        self._keep_alive_s = keep_alive_s
        self._battery_keep_alive_s = battery_keep_alive_s
        self._on_battery = False
        self._last_used = time.monotonic()
        self._residency: threading.Thread | None = None
        self._python = python
        self._backoff_s = backoff_s
        self._next_start = 0.0
        # _start_lock serializes starting and loading, which can take minutes; _io_lock
        # guards only stdin writes and the pending table, so cancel and crash handling never
        # wait for a load.
        self._start_lock = threading.Lock()
        self._io_lock = threading.Lock()
        self._proc: subprocess.Popen[str] | None = None
        # Request id -> (the host process it was sent to, its future). The reader of a process
        # that exits fails only that process's requests, because a replacement may already
        # have requests in flight.
        self._pending: dict[int, tuple[subprocess.Popen[str], Future[dict[str, Any]]]] = {}
        self._streams: dict[int, Callable[[str], None]] = {}
        self._next_id = 0
        self._consecutive_crashes = 0
        self._stopping = False
        # The accelerator lease (see hold): requests wait while `_held`; `_active` counts the
        # requests in flight.
        self._gate = threading.Condition()
        self._held = False
        self._active = 0
        # Set by the residency thread while it unloads an idle model.
        self._unloading = False

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
            if self._residency is None:
                self._residency = threading.Thread(target=self._residency_loop,
                                                   name="model-residency", daemon=True)
                self._residency.start()
            return self._load_with_fallback()

    def _spawn(self) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [self._python, "-m", "famulus.daemon.model.host"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, encoding="utf-8",
            bufsize=1, close_fds=True, env=self._env,
        )
        with self._io_lock:
            self._proc = proc
            self.state.pid = proc.pid
        assert proc.stdout is not None
        threading.Thread(target=self._read, args=(proc, proc.stdout),
                         name="model-host-reader", daemon=True).start()
        logger.info("model host started: pid=%d", proc.pid)
        return proc

    def _load_with_fallback(self) -> subprocess.Popen[str]:
        """Start a host and load the model, moving to the next device when one kills it.

        A driver or compiler that crashes the host, or hangs past load_timeout_s, is recorded
        against the device it was loading, and a fresh host tries the devices after it.
        """
        devices = list(self.load_params["devices"])
        errors: dict[str, str] = {}
        self.state.state, self.state.device, self.state.error = "loading", None, None
        self.state.device_errors = errors
        self._on_event("model.loading", {"model": self.name, "devices": devices})
        started = time.monotonic()
        while True:
            proc = self._spawn()
            self.state.loading_device = None
            try:
                reply = self._load(proc, devices, errors, started)
            except (HostCrashed, HostTimeout) as exc:
                device = self.state.loading_device
                if device is None or self._stopping:
                    self._fail_load(str(exc), errors)
                    raise
                failure = "hung" if isinstance(exc, HostTimeout) else "crashed"
                errors[device] = f"the model host {failure} while loading on it: {exc}"
                logger.error("model load on %s killed the host (%s); trying the next device",
                             device, exc)
                with self._io_lock:
                    if self._proc is proc:
                        self._proc = None
                        self.state.pid = None
                # The crash is the device's fault: no backoff before the next device.
                self._consecutive_crashes = 0
                self._next_start = 0.0
                devices = devices[devices.index(device) + 1:]
                if not devices:
                    message = "the model loaded on no device: " + "; ".join(
                        f"{d}: {e}" for d, e in errors.items())
                    self._fail_load(message, errors)
                    raise LoadFailed(message) from exc
                continue
            except LoadFailed as exc:
                # The host lists only the devices it tried; earlier hosts may have crashed.
                message = "the model loaded on no device: " + "; ".join(
                    f"{d}: {e}" for d, e in errors.items())
                self._fail_load(message, errors)
                raise LoadFailed(message) from exc
            except ModelError as exc:
                self._fail_load(str(exc), errors)
                raise
            errors.update(reply["errors"])
            self.state.state, self.state.device = "loaded", reply["device"]
            self.state.load_s = reply["load_s"]
            self.state.loading_device = None
            self._consecutive_crashes = 0
            with self._gate:
                # The keep-alive counts from the load, and the residency thread learns of it.
                self._last_used = time.monotonic()
                self._gate.notify_all()
            self._on_event("model.loaded", {
                "model": self.name, "device": reply["device"], "load_s": reply["load_s"],
                "total_s": round(time.monotonic() - started, 3),
                "device_errors": dict(errors)})
            logger.info("model loaded: model=%s device=%s load_s=%s", self.name,
                        reply["device"], reply["load_s"])
            return proc

    def _fail_load(self, message: str, errors: dict[str, str]) -> None:
        self.state.state, self.state.error = "failed", message
        self.state.loading_device = None
        self._on_event("model.failed", {"model": self.name, "error": message,
                                        "device_errors": dict(errors)})

    def _load(self, proc: subprocess.Popen[str], devices: list[str], errors: dict[str, str],
              started: float) -> dict[str, Any]:
        timeout = float(self.load_params["load_timeout_s"]) * max(1, len(devices))

        def on_progress(piece: str) -> None:
            # The host names each device as it starts on it, and each failure as it happens,
            # so that both survive a crash of the host on a later device.
            kind, _, rest = piece.partition(":")
            if kind == "trying":
                self.state.loading_device = rest
            elif kind == "error":
                device, _, error = rest.partition(":")
                errors[device] = error

        def tick() -> None:
            self._on_event("model.loading", {
                "model": self.name, "device": self.state.loading_device,
                "elapsed_s": round(time.monotonic() - started, 1)})

        return self._send(proc, {"op": "load", **self.load_params, "devices": devices},
                          timeout, on_progress, tick=tick,
                          per_device_timeout=float(self.load_params["load_timeout_s"]))

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
            entry = self._pending.pop(rid, None)
            self._streams.pop(rid, None)
            if entry is not None:
                entry[1].set_result(reply)
        code = proc.wait()
        with self._io_lock:
            pending = {rid: future for rid, (owner, future) in self._pending.items()
                       if owner is proc}
            for rid in pending:
                del self._pending[rid]
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
              on_stream: Callable[[str], None] | None = None, *,
              tick: Callable[[], None] | None = None,
              per_device_timeout: float | None = None) -> dict[str, Any]:
        future: Future[dict[str, Any]] = Future()
        with self._io_lock:
            self._next_id += 1
            rid = self._next_id
            self._pending[rid] = (proc, future)
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
            reply = self._wait(future, timeout, tick, per_device_timeout)
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

    def _wait(self, future: Future[dict[str, Any]], timeout: float,
              tick: Callable[[], None] | None, per_device_timeout: float | None
              ) -> dict[str, Any]:
        if tick is None:
            return future.result(timeout=timeout)
        deadline = time.monotonic() + timeout
        device, device_since = self.state.loading_device, time.monotonic()
        while True:
            now = time.monotonic()
            if self.state.loading_device != device:
                device, device_since = self.state.loading_device, now
            limit = deadline
            if per_device_timeout is not None:
                limit = min(limit, device_since + per_device_timeout)
            if now >= limit:
                raise FutureTimeout()
            try:
                return future.result(timeout=min(self._progress_s, limit - now))
            except FutureTimeout:
                if time.monotonic() < limit:
                    tick()

    def request(self, message: dict[str, Any], timeout: float,
                on_stream: Callable[[str], None] | None = None) -> dict[str, Any]:
        """Send one request, starting (and loading) the host first when needed.

        While the host is held for a video job (see `hold`), the request waits.
        """
        with self._gate:
            while (self._held or self._unloading) and not self._stopping:
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
                self._last_used = time.monotonic()
                self._gate.notify_all()

    # -- accelerator lease -------------------------------------------------------------------

    def hold(self) -> None:
        """Make new requests wait, then wait until the requests in flight have finished."""
        with self._gate:
            self._held = True
            while self._active and not self._stopping:
                self._gate.wait()

    def unload(self, timeout: float = 10.0, reason: str = "lease") -> None:
        """Stop the host process to free its device memory; call `hold` first.

        The next request after `release` starts and loads a fresh host.
        """
        with self._start_lock:
            with self._io_lock:
                proc = self._proc
                # Cleared here, so the reader thread does not count the exit as a crash.
                self._proc = None
                self.state.pid = None
            if proc is None:
                return
            device = self.state.device
            _close_process(proc, timeout)
            self.state.state = "unloaded"
            self.state.device = None
        idle_s = round(time.monotonic() - self._last_used, 1)
        self._on_event("model.unloaded", {"model": self.name, "device": device,
                                          "reason": reason, "idle_s": idle_s})
        logger.info("model unloaded: model=%s reason=%s idle_s=%.1f", self.name, reason, idle_s)

    def unload_now(self, reason: str = "request") -> None:
        """Unload after the request in flight, if any, has finished."""
        self.hold()
        try:
            self.unload(reason=reason)
        finally:
            self.release()

    # -- residency ---------------------------------------------------------------------------

    def keep_alive(self) -> float | None:
        """Seconds the model stays loaded after its last request; None: indefinitely."""
        if self._on_battery:
            return self._battery_keep_alive_s
        return self._keep_alive_s or None

    def set_on_battery(self, on_battery: bool) -> None:
        with self._gate:
            self._on_battery = on_battery
            self.state.keep_alive_s = self.keep_alive()
            self._gate.notify_all()

    def pin(self, pinned: bool) -> None:
        """Keep the model loaded regardless of the keep-alive (until unpinned)."""
        with self._gate:
            self.state.pinned = pinned
            self._gate.notify_all()

    def _residency_loop(self) -> None:
        with self._gate:
            self.state.keep_alive_s = self.keep_alive()
            while not self._stopping:
                limit = self.keep_alive()
                idle = (not self._active and not self._held and not self._unloading
                        and not self.state.pinned and self.state.state == "loaded")
                if limit is None or not idle:
                    self._gate.wait()
                    continue
                remaining = self._last_used + limit - time.monotonic()
                if remaining > 0:
                    self._gate.wait(remaining)
                    continue
                self._unloading = True
                self._gate.release()
                try:
                    self.unload(reason="idle")
                except Exception:
                    logger.exception("idle unload of model %s failed", self.name)
                finally:
                    self._gate.acquire()
                    self._unloading = False
                    self._gate.notify_all()

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
                 on_token: Callable[[str], None] | None = None,
                 no_repeat_ngram_size: int = 0) -> dict[str, Any]:
        """Generate a reply; `on_token` receives the text pieces as they are produced."""
        # The host enforces timeout_s itself; the extra margin covers a host that hangs in
        # native code and must be killed instead.
        return self.request({"op": "generate", "messages": messages,
                             "max_new_tokens": max_new_tokens,
                             "repetition_penalty": repetition_penalty,
                             "no_repeat_ngram_size": no_repeat_ngram_size,
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
