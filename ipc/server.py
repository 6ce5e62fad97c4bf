"""The bus server: one thread owns the PUB, ROUTER and internal sockets.

ZeroMQ sockets are not thread-safe, so other threads never touch these sockets. Committed
events reach this thread over an inproc PUSH/PULL pair, and requests are answered here. The
loop blocks in `poll` with no timeout, so an idle daemon has no periodic wake-ups.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq

from famulus.ipc.protocol import (
    ErrorCode,
    Event,
    ProtocolError,
    Request,
    decode_request,
    encode_reply,
)

logger = logging.getLogger(__name__)

Handler = Callable[[Request], Any]
LINGER_MS = 100
EVENTS_INPROC = "inproc://famulus-events"
CONTROL_INPROC = "inproc://famulus-control"


class RequestError(Exception):
    """Raised by a handler to send an error reply with a code from the catalogue."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def socket_path(endpoint: str) -> Path | None:
    return Path(endpoint[len("ipc://"):]) if endpoint.startswith("ipc://") else None


class BusServer:
    """Publishes events and answers requests until `stop` is called."""

    def __init__(self, events_endpoint: str, requests_endpoint: str,
                 handlers: dict[str, Handler], *, max_message_bytes: int) -> None:
        self.events_endpoint = events_endpoint
        self.requests_endpoint = requests_endpoint
        self.handlers = handlers
        self.max_message_bytes = max_message_bytes
        self.ctx = zmq.Context()
        self._local = threading.local()
        self._push_sockets: list[zmq.Socket[Any]] = []
        self._push_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.stats = {"requests": 0, "bad_requests": 0, "events": 0}

    def start(self) -> None:
        """Bind the sockets on the server thread and return once they are bound."""
        self._thread = threading.Thread(target=self._run, name="bus", daemon=True)
        self._thread.start()
        self._ready.wait(10)
        if self._error is not None:
            raise self._error

    def publish(self, events: list[Event]) -> None:
        """Hand committed events to the server thread (callable from any thread)."""
        sock = getattr(self._local, "push", None)
        if sock is None:
            sock = self.ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, LINGER_MS)
            sock.connect(EVENTS_INPROC)
            self._local.push = sock
            with self._push_lock:
                self._push_sockets.append(sock)
        for event in events:
            sock.send_multipart(event.frames())

    def stop(self, timeout: float = 2.0) -> None:
        if self._thread is None:
            return
        control = self.ctx.socket(zmq.PAIR)
        control.setsockopt(zmq.LINGER, LINGER_MS)
        control.connect(CONTROL_INPROC)
        control.send(b"stop")
        self._thread.join(timeout)
        control.close()
        with self._push_lock:
            for sock in self._push_sockets:
                sock.close()
        self.ctx.term()
        for endpoint in (self.events_endpoint, self.requests_endpoint):
            path = socket_path(endpoint)
            if path is not None:
                path.unlink(missing_ok=True)

    def _bind(self) -> tuple[zmq.Socket[Any], ...]:
        pub = self.ctx.socket(zmq.PUB)
        pub.setsockopt(zmq.SNDHWM, 10_000)
        router = self.ctx.socket(zmq.ROUTER)
        # Far larger frames disconnect the peer instead of filling memory; moderately
        # large ones get a `too_large` error reply from decode_request.
        router.setsockopt(zmq.MAXMSGSIZE, self.max_message_bytes * 4)
        router.setsockopt(zmq.ROUTER_MANDATORY, 0)
        pull = self.ctx.socket(zmq.PULL)
        control = self.ctx.socket(zmq.PAIR)
        sockets = (pub, router, pull, control)
        for sock in sockets:
            sock.setsockopt(zmq.LINGER, LINGER_MS)
        for endpoint in (self.events_endpoint, self.requests_endpoint):
            # The caller holds the instance lock, so a socket file left here is stale.
            path = socket_path(endpoint)
            if path is not None:
                path.unlink(missing_ok=True)
        pub.bind(self.events_endpoint)
        router.bind(self.requests_endpoint)
        pull.bind(EVENTS_INPROC)
        control.bind(CONTROL_INPROC)
        return sockets

    def _run(self) -> None:
        try:
            pub, router, pull, control = self._bind()
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        poller = zmq.Poller()
        for sock in (router, pull, control):
            poller.register(sock, zmq.POLLIN)
        try:
            while True:
                ready = dict(poller.poll())
                if control in ready:
                    break
                if pull in ready:
                    self._forward_events(pull, pub)
                if router in ready:
                    self._serve_one(router)
            # Events committed just before the stop still go out.
            self._forward_events(pull, pub)
        except Exception:
            logger.exception("bus loop failed; the bus is down")
        finally:
            for sock in (pub, router, pull, control):
                sock.close()

    def _forward_events(self, pull: zmq.Socket[Any], pub: zmq.Socket[Any]) -> None:
        while True:
            try:
                frames = pull.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            pub.send_multipart(frames)
            self.stats["events"] += 1

    def _serve_one(self, router: zmq.Socket[Any]) -> None:
        try:
            frames = router.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return
        self.stats["requests"] += 1
        identity, rest = frames[0], frames[1:]
        # A DEALER client may send an empty delimiter first (REQ-style); mirror it back.
        envelope = [identity] + ([b""] if rest and rest[0] == b"" else [])
        body = [f for f in rest if f != b""]
        if len(body) != 1:
            self.stats["bad_requests"] += 1
            logger.warning("dropped a request with %d payload frames (expected 1)", len(body))
            router.send_multipart(envelope + [encode_reply(None, error=(
                ErrorCode.BAD_REQUEST, f"expected one payload frame, got {len(body)}"))])
            return
        router.send_multipart(envelope + [self._reply(body[0])])

    def _reply(self, payload: bytes) -> bytes:
        try:
            request = decode_request(payload, self.max_message_bytes)
        except ProtocolError as exc:
            self.stats["bad_requests"] += 1
            logger.warning("rejected a request: code=%s %s", exc.code, exc)
            return encode_reply(exc.request_id, error=(exc.code, str(exc)))
        handler = self.handlers.get(request.method)
        if handler is None:
            return encode_reply(request.id, error=(
                ErrorCode.UNKNOWN_METHOD, f"method {request.method!r} is not served"))
        try:
            return encode_reply(request.id, result=handler(request))
        except RequestError as exc:
            return encode_reply(request.id, error=(exc.code, str(exc)))
        except Exception as exc:
            logger.exception("request failed: method=%s id=%s", request.method, request.id)
            return encode_reply(request.id, error=(ErrorCode.INTERNAL,
                                                   f"{type(exc).__name__}: {exc}"))
