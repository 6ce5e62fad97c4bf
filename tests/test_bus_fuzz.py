"""Random and malformed frames against a live daemon's request socket over real ipc.

The frames come from `random.Random(SEED)`, so a failure reproduces with the same seed. Each
message goes out on a DEALER socket, a REQ socket or a ROUTER socket connected to the
daemon's ROUTER, and must get exactly one well-formed reply, in order per socket. Afterwards
the daemon must still serve `status` and its memory must not have grown much.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import zmq

from famulus.ipc.protocol import ERROR_CODES, Method, catalogue
from tests.conftest import DaemonHome, pid_alive

SEED = 20241204
MESSAGES = 10_000
# Messages in flight per socket before the replies are read. A ROUTER drops replies to a
# peer whose queue already contains ZeroMQ's default high-water mark of 1,000 messages.
BATCH = 200
REPLY_TIMEOUT_S = 10.0
# The daemon replies to one request on an idle bus within milliseconds.
SINGLE_REPLY_TIMEOUT_S = 3.0
# The daemon's default `bus.max_message_bytes`: larger requests get `too_large`.
MAX_MESSAGE_BYTES = 1024 * 1024
# Measured on a 2-core AMD EPYC VM (Python 3.11.7, pyzmq 27.3, libzmq 4.3.5). The
# deep-nesting and lone-surrogate inputs were left out, because they stop the bus. The
# daemon's VmRSS grew by 1.2 to 1.6 MiB over the 10,000 messages, and by 2.5 MiB over
# 100,000. The bound leaves room for allocator noise and still catches a 3 KiB-per-message leak.
RSS_GROWTH_LIMIT_MIB = 30
ROUTER_PEER_ID = b"famulus-daemon"

METHODS = catalogue(Method)
# Parameters that each method must reject. Fuzzer.random_params adds random ones.
WRONG_PARAMS: dict[str, list[dict[str, Any]]] = {
    Method.STATUS: [{"verbose": True}, {"": None}],
    Method.SUMMARIZE: [{}, {"path": "relative/file.txt"}, {"path": 7}, {"text": ""},
                       {"text": "   \n"}, {"text": 5}, {"text": None},
                       {"path": "/no/such/file.txt"}, {"path": "/x", "text": "both"},
                       {"path": "/no/such/file.txt", "force": "yes"}, {"path": ""}],
    Method.JOB: [{}, {"id": "1"}, {"id": 1.5}, {"id": True}, {"id": None}, {"id": -1},
                 {"id": [1]}, {"id": 10**6}],
    Method.EVENTS: [{"since": "0"}, {"since": 1.5}, {"since": True}, {"limit": 0},
                    {"limit": -3}, {"limit": "5"}, {"topics": "job.done"},
                    {"topics": [1, 2]}, {"topics": [None]}, {"since": None}],
    # Every `shutdown` with object params would stop the daemon, whatever the params, so
    # only payloads that the daemon rejects before the handler are sent (see is_unsafe).
    Method.SHUTDOWN: [],
}


def is_unsafe(frames: list[bytes]) -> bool:
    """Tell whether a message could stop the daemon or queue model work.

    The rules follow protocol.md. The daemon rejects a payload over max_message_bytes before
    parsing it, and checks that `params` is an object before it looks at the method, so a
    `shutdown` whose params are not an object is safe to send. A `summarize` with exactly
    one of `path` and `text` could queue a job for the model, which would slow the test.
    """
    for frame in frames:
        if len(frame) > MAX_MESSAGE_BYTES:
            continue
        try:
            data = json.loads(frame)
        except ValueError:
            continue
        except RecursionError:
            # The daemon's parser may nest deeper than this thread's, so assume the worst.
            if b"shutdown" in frame or b"summarize" in frame:
                return True
            continue
        if not isinstance(data, dict):
            continue
        params = data.get("params", {})
        if not isinstance(params, dict):
            continue
        if data.get("method") == Method.SHUTDOWN:
            return True
        if data.get("method") == Method.SUMMARIZE and could_queue_job(params):
            return True
    return False


def could_queue_job(params: dict[str, Any]) -> bool:
    text, path = params.get("text"), params.get("path")
    if (text is None) == (path is None):
        return False  # both or neither: rejected with invalid_params
    if isinstance(text, str) and text.strip():
        return True
    return isinstance(path, str) and os.path.isabs(path) and os.path.exists(path)


class Fuzzer:
    """Makes random messages: lists of frames, from plain noise to nearly valid requests."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.frame_makers: list[tuple[Callable[[], bytes], int]] = [
            (self.random_bytes, 15), (self.truncated_json, 10), (self.garbled_json, 10),
            (self.wrong_types, 15), (self.huge_numbers, 8), (self.nested, 6),
            (self.unknown_method, 8), (self.wrong_params, 15), (self.valid_request, 12),
            (self.odd_encoding, 3), (self.too_large, 1)]

    def message(self) -> list[bytes]:
        """Return 0 to 5 payload frames, sometimes after an empty delimiter frame.

        ZeroMQ cannot send a message of no frames, so "0 payload frames" is a lone empty
        frame, which the daemon also treats as no payload.
        """
        count = self.rng.choices(range(6), weights=[4, 70, 10, 6, 5, 5])[0]
        makers, weights = zip(*self.frame_makers, strict=True)
        frames = [self.rng.choices(makers, weights)[0]() for _ in range(count)] or [b""]
        if self.rng.random() < 0.4:
            frames.insert(0, b"")
        return frames

    def random_string(self) -> str:
        alphabet = self.rng.choice([
            "abcdefghijklmnopqrstuvwxyz._",
            "\x00\x01\n\t\"\\/ ",
            "äöüßé漢字🙂\u200b\ufeff",
            # Lone surrogates: valid in JSON as \ud800-style escapes, but not in UTF-8.
            "".join(chr(c) for c in (0xD800, 0xDBFF, 0xDC00, 0xDFFF)),
        ])
        length = self.rng.choice([0, 1, 5, 20, 300])
        return "".join(self.rng.choice(alphabet) for _ in range(length))

    def random_number(self) -> int | float:
        return self.rng.choice([
            0, -1, 1, 2**31, 2**53 + 1, 2**63 - 1, 2**63, 2**64, -(2**63) - 1,
            10 ** self.rng.randint(19, 4000), -(10 ** self.rng.randint(19, 4000)),
            1e308, -1e308, 5e-324, -0.0, self.rng.uniform(-1e6, 1e6)])

    def random_value(self, depth: int = 0) -> Any:
        kinds = ["null", "bool", "number", "string"] + (["list", "object"] if depth < 3 else [])
        kind = self.rng.choice(kinds)
        if kind == "null":
            return None
        if kind == "bool":
            return self.rng.random() < 0.5
        if kind == "number":
            return self.random_number()
        if kind == "string":
            return self.random_string()
        if kind == "list":
            return [self.random_value(depth + 1) for _ in range(self.rng.randint(0, 4))]
        return {self.random_string(): self.random_value(depth + 1)
                for _ in range(self.rng.randint(0, 4))}

    def request(self, method: str | None = None, params: Any = None) -> dict[str, Any]:
        return {"v": 1, "id": f"fuzz-{self.rng.getrandbits(48):x}",
                "method": method or self.rng.choice(METHODS),
                "params": {} if params is None else params}

    @staticmethod
    def encode(obj: Any) -> bytes:
        # ensure_ascii escapes lone surrogates, so every object encodes.
        return json.dumps(obj).encode("utf-8")

    def random_bytes(self) -> bytes:
        return self.rng.randbytes(self.rng.choice([0, 1, 2, 7, 64, 512, 4096]))

    def truncated_json(self) -> bytes:
        payload = self.encode(self.request(params=self.random_params()))
        return payload[:self.rng.randrange(len(payload))]

    def garbled_json(self) -> bytes:
        payload = bytearray(self.encode(self.request(params=self.random_params())))
        for _ in range(self.rng.randint(1, 4)):
            position = self.rng.randrange(len(payload))
            action = self.rng.choice(["flip", "insert", "delete"])
            if action == "flip":
                payload[position] ^= 1 << self.rng.randrange(8)
            elif action == "insert":
                payload.insert(position, self.rng.randrange(256))
            elif len(payload) > 1:
                del payload[position]
        return bytes(payload)

    def wrong_types(self) -> bytes:
        request: dict[str, Any] = self.request(method=self.rng.choice(METHODS + ["status"] * 3))
        key = self.rng.choice(["v", "id", "method", "params"])
        if self.rng.random() < 0.2:
            del request[key]
        else:
            request[key] = self.random_value()
        if self.rng.random() < 0.2:
            return self.encode(self.random_value())  # not an object at all
        return self.encode(request)

    def huge_numbers(self) -> bytes:
        request = self.request(params={self.rng.choice(["since", "limit", "id", "force"]):
                                       self.random_number()})
        if self.rng.random() < 0.3:
            request["v"] = self.random_number()
        payload = self.encode(request)
        if self.rng.random() < 0.3:
            # Tokens Python's json module accepts although JSON has no such numbers.
            token = self.rng.choice([b"NaN", b"Infinity", b"-Infinity", b"1e999"])
            payload = payload.replace(b'"params": {', b'"params": {"since": ' + token + b", ")
        return payload

    def nested(self) -> bytes:
        depth = self.rng.choice([2, 10, 100, 500, 5_000, 100_000])
        opener, closer = self.rng.choice([(b"[", b"]"), (b'{"a":', b"}")])
        inner = opener * depth + b"1" + closer * depth
        if self.rng.random() < 0.5:
            return inner  # the whole payload
        request = self.encode(self.request(method=self.rng.choice(METHODS), params={"x": 0}))
        return request.replace(b'{"x": 0}', b'{"x": ' + inner + b"}")

    def unknown_method(self) -> bytes:
        method = self.rng.choice([self.random_string(), "STATUS", "status ", " status",
                                  "status\x00", "Status", "job.done", "__init__", ""])
        return self.encode(self.request(method=method, params=self.random_params()))

    def random_params(self) -> dict[str, Any]:
        keys = ["since", "limit", "topics", "id", "path", "text", "force", "verbose"]
        return {self.rng.choice(keys): self.random_value() for _ in range(self.rng.randint(0, 3))}

    def wrong_params(self) -> bytes:
        method = self.rng.choice(METHODS)
        if method == Method.SHUTDOWN:
            # Params that are not an object: the daemon must reject them before the handler.
            not_object = self.rng.choice([[], "now", 1, None, True, [{"force": True}]])
            return self.encode({"v": 1, "id": "fuzz-shutdown", "method": method,
                                "params": not_object})
        # Methods added after this table was written get random params only.
        table = WRONG_PARAMS.get(method, [])
        if table and self.rng.random() < 0.5:
            params = dict(self.rng.choice(table))
        else:
            params = self.random_params()
        return self.encode(self.request(method=method, params=params))

    def valid_request(self) -> bytes:
        method, params = self.rng.choice([
            (Method.STATUS, {}), (Method.EVENTS, {"since": self.rng.randint(0, 20)}),
            (Method.EVENTS, {"since": 0, "limit": self.rng.randint(1, 500),
                             "topics": ["daemon.started"]}),
            (Method.JOB, {"id": self.rng.randint(1, 1000)})])
        request = self.request(method=method, params=params)
        if self.rng.random() < 0.2:
            del request["params"]  # documented as meaning {}
        return self.encode(request)

    def odd_encoding(self) -> bytes:
        text = json.dumps(self.request(method=Method.STATUS), ensure_ascii=False)
        codec = self.rng.choice(["utf-16", "utf-32", "latin-1", "cp1252"])
        return text.encode(codec, errors="replace")

    def too_large(self) -> bytes:
        size = MAX_MESSAGE_BYTES + self.rng.randint(1, 2048)
        if self.rng.random() < 0.5:
            return self.rng.randbytes(size)
        return self.encode(self.request(method=Method.SUMMARIZE,
                                        params={"text": "x" * size, "path": "/both/given"}))


@dataclass
class Peer:
    """One client socket, with the messages whose replies it still expects, oldest first."""

    name: str
    sock: zmq.Socket[Any]
    route: list[bytes]  # frames prepended to every message (a ROUTER's destination)
    pending: list[list[bytes]] = field(default_factory=list)


@dataclass
class Tally:
    sent: int = 0
    skipped: int = 0
    codes: Counter[str] = field(default_factory=Counter)


def expected_reply_id(frames: list[bytes]) -> str | None:
    """Return the `id` the reply must carry: that of a lone readable payload, else None."""
    payloads = [f for f in frames if f]
    if len(payloads) != 1 or len(payloads[0]) > MAX_MESSAGE_BYTES:
        return None
    try:
        data = json.loads(payloads[0])
    except (ValueError, RecursionError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("id"), str):
        return None
    return data["id"]


def check_reply(peer: Peer, sent: list[bytes], reply: list[bytes]) -> str:
    """Check one reply against the message it replies to; return its code, or "ok"."""
    if peer.name == "req":
        expected_envelope: list[bytes] = []  # the REQ socket removes its own delimiter
    else:
        expected_envelope = peer.route + ([b""] if sent[0] == b"" else [])
    assert reply[:-1] == expected_envelope, f"{peer.name}: envelope {reply[:-1]!r} for {sent!r}"
    data = json.loads(reply[-1])
    assert isinstance(data, dict), reply
    assert data.get("v") == 1, data
    assert data.get("id") == expected_reply_id(sent), (data, short(sent))
    if data.get("ok") is True:
        assert "result" in data, data
        return "ok"
    assert data.get("ok") is False, data
    code = data["error"]["code"]
    assert code in ERROR_CODES, data
    assert isinstance(data["error"]["message"], str), data
    return code


def drain(peer: Peer, tally: Tally, daemon_home: DaemonHome) -> None:
    """Read the replies to every pending message of `peer`, in the order sent."""
    deadline = time.monotonic() + REPLY_TIMEOUT_S
    while peer.pending:
        remaining_ms = int((deadline - time.monotonic()) * 1000)
        if remaining_ms <= 0 or not peer.sock.poll(remaining_ms):
            raise AssertionError(
                f"{peer.name}: no reply within {REPLY_TIMEOUT_S:.0f} s to {len(peer.pending)} "
                f"messages; the oldest unanswered: {short(peer.pending[0])}; "
                f"daemon log: {logged_errors(daemon_home)}")
        reply = peer.sock.recv_multipart()
        tally.codes[check_reply(peer, peer.pending.pop(0), reply)] += 1


def logged_errors(daemon_home: DaemonHome) -> list[str]:
    """Return the daemon log's last lines that name an error."""
    lines = daemon_home.stderr().splitlines()
    return [line for line in lines if "Error" in line or "failed" in line][-5:]


def short(frames: list[bytes]) -> list[bytes]:
    return [f[:120] + (b"..." if len(f) > 120 else b"") for f in frames]


def open_peers(ctx: zmq.Context[Any], endpoint: str) -> list[Peer]:
    peers = []
    for name, kind in (("dealer", zmq.DEALER), ("req", zmq.REQ)):
        sock = ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(endpoint)
        peers.append(Peer(name, sock, []))
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.setsockopt(zmq.ROUTER_MANDATORY, 1)
    router.setsockopt(zmq.CONNECT_ROUTING_ID, ROUTER_PEER_ID)
    router.connect(endpoint)
    peers.append(Peer("router", router, [ROUTER_PEER_ID]))
    return peers


def wait_router_connected(peer: Peer) -> None:
    """Send a status request once the ROUTER's connection to the daemon is up."""
    deadline = time.monotonic() + REPLY_TIMEOUT_S
    request = Fuzzer.encode({"v": 1, "id": "router-hello", "method": "status"})
    while True:
        try:
            peer.sock.send_multipart(peer.route + [request])
            peer.pending.append([request])
            return
        except zmq.ZMQError as exc:
            # ROUTER_MANDATORY raises EHOSTUNREACH until the handshake is done; ZeroMQ
            # sends no other signal for it, so retry briefly.
            if exc.errno != zmq.EHOSTUNREACH or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def send_messages(peers: list[Peer], fuzzer: Fuzzer, count: int, tally: Tally,
                  daemon_home: DaemonHome) -> None:
    """Send `count` safe messages from random peers, reading replies after each batch."""
    target = tally.sent + count
    while tally.sent < target:
        frames = fuzzer.message()
        if is_unsafe(frames):
            tally.skipped += 1
            continue
        peer = fuzzer.rng.choices(peers, weights=[60, 15, 25])[0]
        peer.sock.send_multipart(peer.route + frames)
        peer.pending.append(frames)
        tally.sent += 1
        if peer.name == "req":
            drain(peer, tally, daemon_home)  # a REQ socket must read before it sends
        if tally.sent % BATCH == 0 or tally.sent == target:
            for other in peers:
                drain(other, tally, daemon_home)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS line in /proc/{pid}/status")


def test_random_frames_leave_daemon_serving(daemon_home: DaemonHome) -> None:
    # Wait for the model so that its loading does not add to the daemon's memory growth.
    daemon_home.start(wait_model=True)
    assert daemon_home.proc is not None
    pid = daemon_home.proc.pid
    endpoint = f"ipc://{daemon_home.runtime / 'requests.sock'}"
    ctx = zmq.Context()
    peers = open_peers(ctx, endpoint)
    # A frame over 4 * max_message_bytes makes ZeroMQ drop the connection without a reply.
    oversized = ctx.socket(zmq.DEALER)
    oversized.setsockopt(zmq.LINGER, 0)
    oversized.connect(endpoint)
    oversized.send(b"x" * (4 * MAX_MESSAGE_BYTES + 1))
    try:
        wait_router_connected(peers[2])
        warmup = Tally()
        send_messages(peers, Fuzzer(random.Random(SEED - 1)), 500, warmup, daemon_home)
        rss_before = rss_mib(pid)

        tally = Tally()
        send_messages(peers, Fuzzer(random.Random(SEED)), MESSAGES, tally, daemon_home)
        rss_after = rss_mib(pid)
        # A reply to the oversized frame, had one been sent, would have arrived long ago.
        unexpected_reply = oversized.poll(0)
    finally:
        for peer in peers:
            peer.sock.close()
        oversized.close()
        ctx.term()

    print(f"\nfuzz: sent={tally.sent} skipped={tally.skipped} codes={dict(tally.codes)} "
          f"rss_mib={rss_before:.1f}->{rss_after:.1f}")
    assert tally.sent == MESSAGES
    assert sum(tally.codes.values()) == tally.sent
    assert not unexpected_reply
    assert pid_alive(pid)
    assert daemon_home.status()["state"] == "running"
    assert rss_after - rss_before < RSS_GROWTH_LIMIT_MIB


def send_one(daemon_home: DaemonHome, payload: bytes) -> dict[str, Any] | None:
    """Send one payload on a fresh DEALER and return the decoded reply, or None."""
    ctx: zmq.Context[Any] = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"ipc://{daemon_home.runtime / 'requests.sock'}")
    try:
        sock.send(payload)
        if not sock.poll(int(SINGLE_REPLY_TIMEOUT_S * 1000)):
            return None
        return json.loads(sock.recv_multipart()[-1])
    finally:
        sock.close()


# Payloads the fuzzer found mishandled. Each gets its own daemon, because some of them
# stop the daemon's bus thread, after which no request is served.
FOUND_PAYLOADS = {
    "deep_nesting": b"[" * 100_000,
    "surrogate_id": rb'{"v": 1, "id": "\ud800", "method": "status"}',
    "surrogate_path": rb'{"v": 1, "id": "p", "method": "summarize", "params": '
                      rb'{"path": "/no/such/\udc80"}}',
    "huge_since": b'{"v": 1, "id": "s", "method": "events", "params": {"since": '
                  + str(2**64).encode() + b"}}",
    "huge_job_id": b'{"v": 1, "id": "j", "method": "job", "params": {"id": '
                   + str(2**63).encode() + b"}}",
    "nul_in_path": rb'{"v": 1, "id": "n", "method": "summarize", "params": '
                   rb'{"path": "/tmp/a\u0000b"}}',
    "directory_path": rb'{"v": 1, "id": "d", "method": "summarize", "params": '
                      rb'{"path": "/tmp"}}',
}


@pytest.mark.parametrize("payload", FOUND_PAYLOADS.values(), ids=FOUND_PAYLOADS.keys())
def test_found_payload_gets_proper_reply(daemon_home: DaemonHome, payload: bytes) -> None:
    daemon_home.start(wait_model=False)
    reply = send_one(daemon_home, payload)
    assert reply is not None, f"no reply; daemon log: {logged_errors(daemon_home)}"
    # `internal` means that a handler failed unexpectedly. A too large number or an
    # unreadable path is the client's mistake, or (for `since`) just an empty page.
    assert reply["ok"] or reply["error"]["code"] != "internal", reply
    assert daemon_home.status()["state"] == "running"
