"""Client library for the famulus bus: requests with timeouts and exact-topic subscriptions.

Installing famulus's core is enough to use this from another program::

    from famulus.ipc.client import Client, Subscriber
    with Client() as client:
        print(client.call("status"))
    with Subscriber(topics=["document.summarized"]) as sub:
        for event in sub.follow(since=0):
            print(event.body["summary"])
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio

from famulus.daemon.paths import user_paths
from famulus.ipc.protocol import (
    Event,
    Method,
    ProtocolError,
    decode_event,
    encode_request,
    loads,
)
from famulus.ipc.security import apply_client_curve

LINGER_MS = 100


class BusError(Exception):
    """The daemon replied with an error; `code` is from the protocol's error catalogue."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class DaemonUnavailable(Exception):
    """No reply came in time: the daemon is not running or is stuck."""


def require_socket_file(endpoint: str) -> None:
    """Raise DaemonUnavailable at once when an ipc:// endpoint's socket file is missing.

    ZeroMQ would connect lazily and wait for the full timeout. A missing file already means
    that no daemon is listening there.
    """
    if endpoint.startswith("ipc://") and not os.path.exists(endpoint[len("ipc://"):]):
        raise DaemonUnavailable(f"no daemon is listening: {endpoint[len('ipc://'):]} does "
                                "not exist; start one with `famulus run`")


def _own_reply(frames: list[bytes], rid: str) -> dict[str, Any] | None:
    """Return the reply in `frames` if it is the reply to request `rid`, else None."""
    try:
        reply = loads(frames[-1])
    except (ValueError, RecursionError):
        return None
    if not isinstance(reply, dict):
        return None
    if reply.get("id") is None and reply.get("ok") is False:
        # The server could not read the id (the request was too large or not JSON). Only
        # one call is in flight per socket, so the error is taken as its reply.
        return reply
    return reply if reply.get("id") == rid else None  # else a late reply to an earlier call


def _result(reply: dict[str, Any]) -> Any:
    if reply.get("ok"):
        return reply.get("result")
    error = reply.get("error") or {}
    raise BusError(str(error.get("code")), str(error.get("message")))


class Client:
    """Synchronous request client over a DEALER socket.

    A reply that arrives after its call timed out is discarded by its id, so it is never
    handed to the next call.
    """

    def __init__(self, endpoint: str | None = None, *, timeout_s: float = 10.0,
                 context: zmq.Context[Any] | None = None, curve_keys: Path | None = None
                 ) -> None:
        self.endpoint = endpoint or user_paths().requests_endpoint
        self.timeout_s = timeout_s
        self.curve_keys = curve_keys
        self._ctx = context or zmq.Context.instance()
        self._sock: zmq.Socket[Any] | None = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _socket(self) -> zmq.Socket[Any]:
        require_socket_file(self.endpoint)
        if self._sock is None:
            sock = self._ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, LINGER_MS)
            if self.curve_keys is not None:
                apply_client_curve(sock, self.curve_keys)
            sock.connect(self.endpoint)
            self._sock = sock
        return self._sock

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def call(self, method: str, params: dict[str, Any] | None = None,
             timeout_s: float | None = None) -> Any:
        """Send one request and return its result; raise BusError or DaemonUnavailable."""
        sock = self._socket()
        rid, payload = encode_request(method, params)
        sock.send_multipart([b"", payload])
        deadline = time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s)
        while True:
            remaining_ms = int((deadline - time.monotonic()) * 1000)
            if remaining_ms <= 0 or not sock.poll(remaining_ms):
                # Drop the socket: queued requests to a dead daemon must not be delivered
                # to the next one that starts.
                self.close()
                raise DaemonUnavailable(f"no reply to {method!r} from {self.endpoint} "
                                        "within the timeout; is `famulus run` running?")
            reply = _own_reply(sock.recv_multipart(), rid)
            if reply is not None:
                return _result(reply)


class Subscriber:
    """Receives events on a SUB socket, delivering only exact topic matches."""

    def __init__(self, topics: list[str] | None = None, *, endpoint: str | None = None,
                 requests_endpoint: str | None = None,
                 context: zmq.Context[Any] | None = None, curve_keys: Path | None = None
                 ) -> None:
        paths = user_paths() if endpoint is None or requests_endpoint is None else None
        self.endpoint = endpoint or (paths.events_endpoint if paths else "")
        self.requests_endpoint = requests_endpoint or (paths.requests_endpoint if paths else "")
        self.topics = set(topics or [])
        self._ctx = context or zmq.Context.instance()
        require_socket_file(self.endpoint)
        self._sock = self._ctx.socket(zmq.SUB)
        self._sock.setsockopt(zmq.LINGER, LINGER_MS)
        self.curve_keys = curve_keys
        if curve_keys is not None:
            apply_client_curve(self._sock, curve_keys)
        for topic in self.topics or {""}:
            self._sock.setsockopt(zmq.SUBSCRIBE, topic.encode("utf-8"))
        self._sock.connect(self.endpoint)

    def __enter__(self) -> Subscriber:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._sock.close()

    def _wanted(self, event: Event) -> bool:
        # ZeroMQ matches by prefix ("job" also matches "jobstats"); compare exactly here.
        return not self.topics or event.topic in self.topics

    def recv(self, timeout_s: float | None = None) -> Event | None:
        """Return the next wanted event, or None when `timeout_s` passes without one."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            frames = self._recv_frames(deadline)
            if frames is None:
                return None
            try:
                event = decode_event(frames)
            except ProtocolError:
                continue
            if self._wanted(event):
                return event

    def _recv_frames(self, deadline: float | None) -> list[bytes] | None:
        # A queued message is taken without a poll first: one system call less per event.
        try:
            return self._sock.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            pass
        wait_ms = None if deadline is None else max(0, int((deadline - time.monotonic()) * 1000))
        if not self._sock.poll(wait_ms):
            return None
        return self._sock.recv_multipart()

    def follow(self, since: int = 0, *, idle_timeout_s: float | None = None,
               client: Client | None = None) -> Iterator[Event]:
        """Yield stored events after `since`, then live ones, with no gap and no duplicate.

        The SUB socket is already connected, so live events queue up while the replay runs;
        sequence numbers remove the overlap. A gap in the live numbers (dropped by a
        high-water mark) is filled from the log. With `idle_timeout_s`, stop when no event
        arrives for that long.
        """
        # Receive every topic while following, so that a jump in the numbers is a real gap
        # and not just events of other topics. The exact filter still applies below.
        self._sock.setsockopt(zmq.SUBSCRIBE, b"")
        own_client = client is None
        client = client or Client(self.requests_endpoint, curve_keys=self.curve_keys)
        last = since
        try:
            for event in self._replay(client, last):
                last = event.seq
                if self._wanted(event):
                    yield event
            while True:
                event = self._recv_any(idle_timeout_s)
                if event is None:
                    return
                if event.seq <= last:
                    continue
                if event.seq > last + 1:
                    for missed in self._replay(client, last, until=event.seq):
                        last = missed.seq
                        if self._wanted(missed):
                            yield missed
                last = event.seq
                if self._wanted(event):
                    yield event
        finally:
            if own_client:
                client.close()

    def _recv_any(self, timeout_s: float | None) -> Event | None:
        while True:
            deadline = None if timeout_s is None else time.monotonic() + timeout_s
            frames = self._recv_frames(deadline)
            if frames is None:
                return None
            try:
                return decode_event(frames)
            except ProtocolError:
                continue

    def _replay(self, client: Client, since: int, until: int | None = None) -> Iterator[Event]:
        while True:
            page = client.call(Method.EVENTS, {"since": since,
                                               "topics": sorted(self.topics) or None})
            for data in page["events"]:
                event = Event.from_envelope(data)
                if until is not None and event.seq >= until:
                    return
                since = event.seq
                yield event
            since = max(since, int(page["last_seq"]))
            if not page["more"]:
                return


class AsyncClient:
    """Asyncio request client over a DEALER socket, with the same rules as `Client`.

    Calls on one client are serialized by a lock, because a reply is matched to the one call
    in flight. A late reply to a timed-out call is discarded by its id.
    """

    def __init__(self, endpoint: str | None = None, *, timeout_s: float = 10.0,
                 curve_keys: Path | None = None) -> None:
        self.endpoint = endpoint or user_paths().requests_endpoint
        self.timeout_s = timeout_s
        self.curve_keys = curve_keys
        self._ctx = zmq.asyncio.Context.instance()
        self._sock: Any = None
        self._lock: Any = None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    async def call(self, method: str, params: dict[str, Any] | None = None,
                   timeout_s: float | None = None) -> Any:
        """Send one request and return its result; raise BusError or DaemonUnavailable."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            require_socket_file(self.endpoint)
            if self._sock is None:
                self._sock = self._ctx.socket(zmq.DEALER)
                self._sock.setsockopt(zmq.LINGER, LINGER_MS)
                if self.curve_keys is not None:
                    apply_client_curve(self._sock, self.curve_keys)
                self._sock.connect(self.endpoint)
            rid, payload = encode_request(method, params)
            await self._sock.send_multipart([b"", payload])
            limit = self.timeout_s if timeout_s is None else timeout_s
            try:
                return await asyncio.wait_for(self._reply(rid), limit)
            except TimeoutError:
                self.close()
                raise DaemonUnavailable(f"no reply to {method!r} from {self.endpoint} within "
                                        f"{limit:.1f} s; is `famulus run` running?") from None

    async def _reply(self, rid: str) -> Any:
        while True:
            reply = _own_reply(await self._sock.recv_multipart(), rid)
            if reply is not None:
                return _result(reply)


class AsyncSubscriber:
    """Asyncio event subscriber with exact topic matching and gap-free `follow`."""

    def __init__(self, topics: list[str] | None = None, *, endpoint: str | None = None,
                 requests_endpoint: str | None = None, curve_keys: Path | None = None) -> None:
        paths = user_paths() if endpoint is None or requests_endpoint is None else None
        self.endpoint = endpoint or (paths.events_endpoint if paths else "")
        self.requests_endpoint = requests_endpoint or (paths.requests_endpoint if paths else "")
        self.topics = set(topics or [])
        self.curve_keys = curve_keys
        require_socket_file(self.endpoint)
        self._sock = zmq.asyncio.Context.instance().socket(zmq.SUB)
        self._sock.setsockopt(zmq.LINGER, LINGER_MS)
        if curve_keys is not None:
            apply_client_curve(self._sock, curve_keys)
        # Every topic is received so that gaps in `seq` are real; the filter is exact below.
        self._sock.setsockopt(zmq.SUBSCRIBE, b"")
        self._sock.connect(self.endpoint)

    async def __aenter__(self) -> AsyncSubscriber:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._sock.close()

    def _wanted(self, event: Event) -> bool:
        return not self.topics or event.topic in self.topics

    async def _next(self, timeout_s: float | None) -> Event | None:
        while True:
            try:
                frames = await asyncio.wait_for(self._sock.recv_multipart(), timeout_s)
            except TimeoutError:
                return None
            try:
                return decode_event(frames)
            except ProtocolError:
                continue

    async def recv(self, timeout_s: float | None = None) -> Event | None:
        """Return the next wanted event, or None when `timeout_s` passes without one."""
        while True:
            event = await self._next(timeout_s)
            if event is None or self._wanted(event):
                return event

    async def follow(self, since: int = 0, *, idle_timeout_s: float | None = None,
                     client: AsyncClient | None = None) -> AsyncIterator[Event]:
        """Yield stored events after `since`, then live ones, with no gap and no duplicate."""
        own_client = client is None
        client = client or AsyncClient(self.requests_endpoint, curve_keys=self.curve_keys)
        last = since
        try:
            async for event in self._replay(client, last, None):
                last = event.seq
                if self._wanted(event):
                    yield event
            while True:
                event = await self._next(idle_timeout_s)
                if event is None:
                    return
                if event.seq <= last:
                    continue
                if event.seq > last + 1:
                    async for missed in self._replay(client, last, event.seq):
                        last = missed.seq
                        if self._wanted(missed):
                            yield missed
                last = event.seq
                if self._wanted(event):
                    yield event
        finally:
            if own_client:
                client.close()

    async def _replay(self, client: AsyncClient, since: int, until: int | None
                      ) -> AsyncIterator[Event]:
        while True:
            page = await client.call(Method.EVENTS, {"since": since,
                                                     "topics": sorted(self.topics) or None})
            for data in page["events"]:
                event = Event.from_envelope(data)
                if until is not None and event.seq >= until:
                    return
                since = event.seq
                yield event
            since = max(since, int(page["last_seq"]))
            if not page["more"]:
                return
