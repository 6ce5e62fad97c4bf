"""The bus server: one thread owns the PUB, ROUTER and internal sockets.

ZeroMQ sockets are not thread-safe, so other threads never touch these sockets. Committed
events reach this thread through a queue, with an inproc PUSH/PULL pair as its doorbell, and
requests get their replies here. The loop blocks in `poll` with no timeout, so an idle daemon
has no periodic wake-ups.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
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
from famulus.ipc.security import CurveServer, check_tcp_endpoint

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


SNDHWM = 10_000


def _drain(xpub: zmq.Socket[Any]) -> None:
    """Discard the subscription messages an XPUB socket receives; nothing uses them."""
    while True:
        try:
            xpub.recv(zmq.NOBLOCK)
        except zmq.Again:
            return


def socket_path(endpoint: str) -> Path | None:
    return Path(endpoint[len("ipc://"):]) if endpoint.startswith("ipc://") else None


@dataclass(frozen=True)
class TcpEndpoints:
    """The optional TCP pair: separate sockets, so that CURVE never applies to ipc://."""

    events: str
    requests: str
    keys_folder: Path | None  # CURVE keys; None serves TCP without encryption (loopback only)


class BusServer:
    """Publishes events and replies to requests until `stop` is called."""

    def __init__(self, events_endpoint: str, requests_endpoint: str,
                 handlers: dict[str, Handler], *, max_message_bytes: int,
                 tcp: TcpEndpoints | None = None) -> None:
        self.events_endpoint = events_endpoint
        self.requests_endpoint = requests_endpoint
        self.handlers = handlers
        self.max_message_bytes = max_message_bytes
        self.tcp = tcp
        self.ctx = zmq.Context()
        self._curve: CurveServer | None = None
        self._local = threading.local()
        self._push_sockets: list[zmq.Socket[Any]] = []
        self._push_lock = threading.Lock()
        # Batches of committed events for the server thread. Only the doorbell goes through
        # ZeroMQ: an inproc message per event cost more than the publishing itself.
        self._outbox: deque[list[Event]] = deque()
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.stats = {"requests": 0, "bad_requests": 0, "events": 0, "events_dropped": 0}

    def start(self) -> None:
        """Bind the sockets on the server thread and return once they are bound."""
        if self.tcp is not None:
            for endpoint in (self.tcp.events, self.tcp.requests):
                check_tcp_endpoint(endpoint, curve_enabled=self.tcp.keys_folder is not None)
            if self.tcp.keys_folder is not None:
                self._curve = CurveServer(self.ctx, self.tcp.keys_folder)
        self._thread = threading.Thread(target=self._run, name="bus", daemon=True)
        self._thread.start()
        self._ready.wait(10)
        if self._error is not None:
            if self._curve is not None:
                self._curve.stop()
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
        if events:
            self._outbox.append(events)
            sock.send(b"")

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
        # The authenticator's sockets live in this context: term() would wait for them.
        if self._curve is not None:
            self._curve.stop()
        self.ctx.term()
        for endpoint in (self.events_endpoint, self.requests_endpoint):
            path = socket_path(endpoint)
            if path is not None:
                path.unlink(missing_ok=True)

    def _pair(self, events: str, requests: str, *, curve: bool = False
              ) -> tuple[zmq.Socket[Any], zmq.Socket[Any]]:
        # XPUB instead of PUB only to learn about drops: with XPUB_NODROP a send to a full
        # subscriber fails instead of vanishing (see _send_event).
        pub = self.ctx.socket(zmq.XPUB)
        pub.setsockopt(zmq.SNDHWM, SNDHWM)
        pub.setsockopt(zmq.XPUB_NODROP, 1)
        router = self.ctx.socket(zmq.ROUTER)
        # Far larger frames disconnect the peer instead of filling memory; moderately
        # large ones get a `too_large` error reply from decode_request.
        router.setsockopt(zmq.MAXMSGSIZE, self.max_message_bytes * 4)
        router.setsockopt(zmq.ROUTER_MANDATORY, 0)
        for sock in (pub, router):
            sock.setsockopt(zmq.LINGER, LINGER_MS)
            if curve and self._curve is not None:
                self._curve.apply(sock)
        for endpoint in (events, requests):
            # The caller holds the instance lock, so a socket file left here is stale.
            path = socket_path(endpoint)
            if path is not None:
                path.unlink(missing_ok=True)
        pub.bind(events)
        router.bind(requests)
        return pub, router

    def _bind(self) -> tuple[list[zmq.Socket[Any]], list[zmq.Socket[Any]], zmq.Socket[Any],
                             zmq.Socket[Any]]:
        pull = self.ctx.socket(zmq.PULL)
        control = self.ctx.socket(zmq.PAIR)
        for sock in (pull, control):
            sock.setsockopt(zmq.LINGER, LINGER_MS)
        pull.bind(EVENTS_INPROC)
        control.bind(CONTROL_INPROC)
        pairs = [self._pair(self.events_endpoint, self.requests_endpoint)]
        if self.tcp is not None:
            pairs.append(self._pair(self.tcp.events, self.tcp.requests, curve=True))
            logger.info("bus also on TCP: events=%s requests=%s curve=%s", self.tcp.events,
                        self.tcp.requests, self._curve is not None)
        return [p for p, _ in pairs], [r for _, r in pairs], pull, control

    def _run(self) -> None:
        try:
            pubs, routers, pull, control = self._bind()
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        poller = zmq.Poller()
        for sock in (*pubs, *routers, pull, control):
            poller.register(sock, zmq.POLLIN)
        try:
            while True:
                ready = dict(poller.poll())
                if control in ready:
                    break
                for pub in pubs:
                    if pub in ready:
                        _drain(pub)
                if pull in ready:
                    self._forward_events(pull, pubs)
                for router in routers:
                    if router in ready:
                        self._serve_guarded(router)
            # Events committed just before the stop still go out.
            self._forward_events(pull, pubs)
        except Exception:
            logger.exception("bus loop failed; the bus is down")
        finally:
            for sock in (*pubs, *routers, pull, control):
                sock.close()

    def _forward_events(self, pull: zmq.Socket[Any], pubs: list[zmq.Socket[Any]]) -> None:
        # Doorbells first, then the queue: a batch queued after this drain rings again.
        while True:
            try:
                pull.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
        sent = 0
        while self._outbox:
            for event in self._outbox.popleft():
                topic, envelope = event.frames()
                for pub in pubs:
                    try:
                        # The common case without a helper call: the event is in the queue.
                        pub.send(topic, zmq.SNDMORE | zmq.NOBLOCK)
                        pub.send(envelope, zmq.NOBLOCK)
                    except zmq.Again:
                        self._send_event(pub, [topic, envelope])
                sent += 1
        self.stats["events"] += sent

    def _send_event(self, pub: zmq.Socket[Any], frames: list[bytes]) -> None:
        """Publish without ever blocking; count the event when a slow subscriber misses it.

        With XPUB_NODROP the send fails as a whole when any subscriber's queue is full. It is
        then sent again in lossy mode, which reaches every subscriber with room and drops it
        only for the full ones. Those subscribers see a gap in `seq` and can fill it.
        """
        try:
            pub.send_multipart(frames, zmq.NOBLOCK)
            return
        except zmq.Again:
            pass
        self.stats["events_dropped"] += 1
        pub.setsockopt(zmq.XPUB_NODROP, 0)
        try:
            pub.send_multipart(frames, zmq.NOBLOCK)
        except zmq.Again:
            pass
        finally:
            pub.setsockopt(zmq.XPUB_NODROP, 1)

    def _serve_guarded(self, router: zmq.Socket[Any]) -> None:
        # One bad message must never take the bus down: the loop is the daemon's only
        # publisher, and the store's writer waits on it.
        try:
            self._serve_one(router)
        except zmq.ZMQError:
            logger.exception("bus socket error while serving a request")
        except Exception:
            logger.exception("serving a request failed; the request was dropped")

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
