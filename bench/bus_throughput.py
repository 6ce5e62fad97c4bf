"""Measure event throughput through the famulus bus and the `status` round trip.

1. Events per second, PUB to SUB over ipc, each with the receiver in its own process:
   a. famulus: a real Store in a temporary folder whose commits feed a real BusServer
      (`store.on_commit = server.publish`), events emitted `--batch` per transaction, and
      received by `famulus.ipc.client.Subscriber.recv`, which decodes each envelope.
   a2. famulus bus layer: the same BusServer and Subscriber, fed with ready Event objects
      (as the store hands them over after a commit). The event log's own cost is left out,
      so this is the PUB-to-SUB path itself.
   b. raw pyzmq: the same envelope bytes, sent as two frames by a plain PUB socket and
      received with `recv_multipart`, not decoded.
   c. raw pyzmq plus `json.loads` of each envelope on receipt.
   d. the Store alone, for reference: the same transactions with nothing published.
   The modes take turns within each repeat. At most `--window` batches are unacknowledged
   by the receiver, which keeps the PUB socket below its high-water mark of 10,000
   messages, so no event is dropped.
2. `status` round trip: p50 and p99 over `--calls` calls, after `--warmup` calls, against a
   live daemon in a temporary home, with famulus's own `Client`.

Run: .venv/bin/python bench/bus_throughput.py [--events 100000] [--batch 1000] [--repeats 3]
Needs the default model (`famulus model pull`): the daemon's config points at it, and the
round trips start once it has loaded. Linux or macOS (ipc:// sockets). Prints a JSON report.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any

import zmq

from famulus.daemon.demo import isolated_daemon
from famulus.daemon.model.registry import resolve
from famulus.daemon.paths import user_paths
from famulus.daemon.store import Store, Tx
from famulus.ipc.client import Client, Subscriber
from famulus.ipc.protocol import Event, Topic, new_id, now
from famulus.ipc.server import BusServer

PROBE_TOPIC = "bench.probe"
EVENT_TOPIC = Topic.JOB_PROGRESS
# The same high-water mark as famulus.ipc.server, so the raw runs queue as much.
PUB_SNDHWM = 10_000
WAIT_S = 30.0  # upper bound for any single wait: a probe, an acknowledgement, an event
MODEL_LOAD_TIMEOUT_S = 120.0


def progress_body(step: int, steps: int) -> dict[str, Any]:
    """Return the body of a `job.progress` event, the most frequent event of a real job."""
    return {"job": 1, "step": step, "steps": steps}


# --- receiver process -------------------------------------------------------------------


def receive(mode: str, events_endpoint: str, ack_endpoint: str, total: int,
            batch: int) -> None:
    """Count events of EVENT_TOPIC and acknowledge each full batch on `ack_endpoint`.

    Sends b"ready" on the first probe event, then the count after each batch. Stops after
    `total` events, or sends b"timeout" when no event arrives for WAIT_S seconds.
    """
    ctx = zmq.Context()
    ack = ctx.socket(zmq.PUSH)
    ack.setsockopt(zmq.LINGER, 1000)
    ack.connect(ack_endpoint)
    next_topic, close_reader = make_topic_reader(mode, ctx, events_endpoint)
    ready, count = False, 0
    while count < total:
        topic = next_topic()
        if topic is None:
            ack.send(b"timeout")
            break
        if topic == PROBE_TOPIC:
            if not ready:
                ack.send(b"ready")
                ready = True
            continue
        count += 1
        if count % batch == 0 or count == total:
            ack.send(str(count).encode())
    close_reader()
    ack.close()
    ctx.term()


def make_topic_reader(mode: str, ctx: zmq.Context[Any],
                      endpoint: str) -> tuple[Callable[[], str | None], Callable[[], None]]:
    """Return a function that receives one event in `mode` and returns its topic (None on
    timeout), and a function that closes the socket."""
    if mode in ("famulus", "famulus_bus"):
        # Only `recv` is used, which sends no requests: the requests endpoint is unused.
        sub = Subscriber(endpoint=endpoint, requests_endpoint=endpoint, context=ctx)

        def famulus_topic() -> str | None:
            event = sub.recv(timeout_s=WAIT_S)
            return None if event is None else event.topic
        return famulus_topic, sub.close

    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SUBSCRIBE, b"")
    sock.connect(endpoint)
    decode = mode == "raw_json"

    def raw_topic() -> str | None:
        if not sock.poll(int(WAIT_S * 1000)):
            return None
        topic, envelope = sock.recv_multipart()
        if decode:
            json.loads(envelope)
        return topic.decode()
    return raw_topic, sock.close


# --- publisher side ---------------------------------------------------------------------


class RawPublisher:
    """A plain PUB socket that sends prepared envelope frames."""

    def __init__(self, ctx: zmq.Context[Any], endpoint: str, frames: list[list[bytes]]) -> None:
        self.pub = ctx.socket(zmq.PUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        self.pub.setsockopt(zmq.SNDHWM, PUB_SNDHWM)
        self.pub.bind(endpoint)
        self.frames = frames

    def probe(self) -> None:
        self.pub.send_multipart([PROBE_TOPIC.encode(), b"{}"])

    def send_batch(self, start: int, count: int) -> None:
        for frames in self.frames[start:start + count]:
            self.pub.send_multipart(frames)

    def close(self) -> None:
        self.pub.close()


class FamulusPublisher:
    """A Store whose commits are published by a BusServer, wired as the daemon wires them."""

    def __init__(self, folder: Path, events_endpoint: str, total: int) -> None:
        self.store = Store(folder / "bench.db")
        self.server = BusServer(events_endpoint, f"ipc://{folder / 'requests.sock'}", {},
                                max_message_bytes=1024 * 1024)
        self.store.on_commit = self.server.publish
        self.server.start()
        self.total = total

    def probe(self) -> None:
        self.store.call(lambda tx: tx.emit(PROBE_TOPIC, {}))

    def send_batch(self, start: int, count: int) -> None:
        def emit_batch(tx: Tx) -> None:
            for step in range(start, start + count):
                tx.emit(EVENT_TOPIC, progress_body(step, self.total))
        # Not waited for: the writer thread commits while the next batch is queued.
        self.store.submit(emit_batch)

    def close(self) -> None:
        self.store.close()
        self.server.stop()


class BusPublisher:
    """A BusServer fed with ready events, as the store's writer thread feeds it."""

    def __init__(self, folder: Path, events_endpoint: str, total: int) -> None:
        self.server = BusServer(events_endpoint, f"ipc://{folder / 'requests.sock'}", {},
                                max_message_bytes=1024 * 1024)
        self.server.start()
        self.events = [prepared_event(step, total) for step in range(total)]

    def probe(self) -> None:
        self.server.publish([Event(seq=0, id=new_id(), cause=None, ts=now(),
                                   topic=PROBE_TOPIC, body={})])

    def send_batch(self, start: int, count: int) -> None:
        self.server.publish(self.events[start:start + count])

    def close(self) -> None:
        self.server.stop()


def prepared_event(step: int, total: int) -> Event:
    return Event(seq=step + 1, id=new_id(), cause=None, ts=now(), topic=EVENT_TOPIC,
                 body=progress_body(step, total))


def prepared_frames(total: int) -> list[list[bytes]]:
    """Build `total` envelopes exactly as famulus publishes them (Event.frames)."""
    return [Event(seq=step + 1, id=new_id(), cause=None, ts=now(), topic=EVENT_TOPIC,
                  body=progress_body(step, total)).frames() for step in range(total)]


def wait_ack(pull: zmq.Socket[Any]) -> bytes:
    if not pull.poll(int(WAIT_S * 1000)):
        raise RuntimeError(f"timed out after {WAIT_S:.0f} s waiting for the receiver's "
                           "acknowledgement")
    message = pull.recv()
    if message == b"timeout":
        raise RuntimeError(f"the receiver timed out after {WAIT_S:.0f} s without an event")
    return message


Publisher = RawPublisher | FamulusPublisher | BusPublisher


def wait_subscribed(publisher: Publisher, pull: zmq.Socket[Any]) -> None:
    """Send probe events until the receiver has one: then its subscription is active."""
    deadline = time.monotonic() + WAIT_S
    while not pull.poll(50):
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {WAIT_S:.0f} s waiting for the receiver to "
                               "get a probe event; is its subscription failing?")
        publisher.probe()
    if wait_ack(pull) != b"ready":
        raise RuntimeError("the receiver acknowledged events before it was ready")


def pump(publisher: Publisher, pull: zmq.Socket[Any], total: int,
         batch: int, window: int) -> float:
    """Send `total` events in batches, with at most `window` batches unacknowledged.

    Returns the seconds from the first send to the receiver's acknowledgement of the last.
    """
    sent = acked = 0
    started = time.perf_counter()
    while acked < total:
        while sent < total and sent - acked < window * batch:
            count = min(batch, total - sent)
            publisher.send_batch(sent, count)
            sent += count
        acked = int(wait_ack(pull))
    return time.perf_counter() - started


def run_throughput(mode: str, total: int, batch: int, window: int) -> dict[str, Any]:
    """Measure one mode with a fresh receiver process, publisher and sockets."""
    frames = prepared_frames(total) if mode in ("raw", "raw_json") else []
    with tempfile.TemporaryDirectory(prefix="famulus-bus-bench-") as tmp:
        folder = Path(tmp)
        events_endpoint = f"ipc://{folder / 'events.sock'}"
        ack_endpoint = f"ipc://{folder / 'ack.sock'}"
        ctx = zmq.Context()
        pull = ctx.socket(zmq.PULL)
        pull.setsockopt(zmq.LINGER, 0)
        pull.bind(ack_endpoint)
        publisher: Publisher
        if mode == "famulus":
            publisher = FamulusPublisher(folder, events_endpoint, total)
        elif mode == "famulus_bus":
            publisher = BusPublisher(folder, events_endpoint, total)
        else:
            publisher = RawPublisher(ctx, events_endpoint, frames)
        # spawn: a forked child would inherit the parent's ZeroMQ and SQLite threads.
        receiver = multiprocessing.get_context("spawn").Process(
            target=receive, args=(mode, events_endpoint, ack_endpoint, total, batch))
        receiver.start()
        try:
            wait_subscribed(publisher, pull)
            seconds = pump(publisher, pull, total, batch, window)
        finally:
            receiver.join(WAIT_S)
            if receiver.is_alive():
                receiver.terminate()
            publisher.close()
            pull.close()
            ctx.term()
    return {"events": total, "seconds": round(seconds, 3),
            "events_per_s": round(total / seconds)}


def run_store_only(total: int, batch: int) -> dict[str, Any]:
    """Measure the Store's commit rate for the same transactions, with no bus attached."""
    with tempfile.TemporaryDirectory(prefix="famulus-store-bench-") as tmp:
        store = Store(Path(tmp) / "bench.db")

        def emit_batch(start: int, count: int) -> Callable[[Tx], None]:
            def emit(tx: Tx) -> None:
                for step in range(start, start + count):
                    tx.emit(EVENT_TOPIC, progress_body(step, total))
            return emit
        started = time.perf_counter()
        futures = [store.submit(emit_batch(start, min(batch, total - start)))
                   for start in range(0, total, batch)]
        for future in futures:
            future.result(timeout=WAIT_S)
        seconds = time.perf_counter() - started
        store.close()
    return {"events": total, "seconds": round(seconds, 3),
            "events_per_s": round(total / seconds)}


MODES = ("famulus", "famulus_bus", "raw", "raw_json", "store_only")


def measure_throughput(args: argparse.Namespace) -> dict[str, Any]:
    # The modes take turns within each repeat, so a burst of load from other programs on a
    # shared machine lowers one run of each mode rather than every run of one mode.
    rates: dict[str, list[int]] = {mode: [] for mode in MODES}
    for _ in range(args.repeats):
        for mode in MODES:
            if mode == "store_only":
                run = run_store_only(args.events, args.batch)
            else:
                run = run_throughput(mode, args.events, args.batch, args.window)
            rates[mode].append(run["events_per_s"])
    report: dict[str, Any] = {
        mode: {"events_per_s_median": round(statistics.median(runs)), "events_per_s_runs": runs}
        for mode, runs in rates.items()}
    raw = report["raw"]["events_per_s_median"]
    report["ratio_to_raw"] = {mode: round(report[mode]["events_per_s_median"] / raw, 3)
                              for mode in ("famulus", "famulus_bus", "raw_json")}
    envelope = prepared_frames(1)[0][1]
    report["envelope_bytes"] = len(envelope)
    report["batch"] = args.batch
    report["window_batches"] = args.window
    return report


# --- status round trip ------------------------------------------------------------------


def wait_model_settled(client: Client) -> str:
    """Wait until the model has loaded or failed, so that loading does not skew timings."""
    deadline = time.monotonic() + MODEL_LOAD_TIMEOUT_S
    while (state := client.call("status")["model"]["state"]) not in ("loaded", "failed"):
        if time.monotonic() > deadline:
            raise RuntimeError(f"the model did not load within {MODEL_LOAD_TIMEOUT_S:.0f} s")
        time.sleep(0.2)
    return str(state)


def time_status_calls(client: Client, calls: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        client.call("status")
    durations = []
    for _ in range(calls):
        started = time.perf_counter()
        client.call("status")
        durations.append(time.perf_counter() - started)
    return durations


def percentile(values: list[float], fraction: float) -> float:
    """Return the nearest-rank percentile of `values`."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(fraction * len(ordered)) - 1))]


def measure_status(calls: int, warmup: int) -> dict[str, Any]:
    model = resolve(user_paths().models_dir, "smollm2-135m-instruct", "")
    with isolated_daemon(model, prefix="famulus-bench-", quiet_stderr=True) as daemon, \
            Client(daemon.requests_endpoint) as client:
        model_state = wait_model_settled(client)
        durations = time_status_calls(client, calls, warmup)
    ms = [d * 1000 for d in durations]
    return {"calls": calls, "warmup_calls": warmup, "model_state": model_state,
            "p50_ms": round(percentile(ms, 0.50), 3), "p90_ms": round(percentile(ms, 0.90), 3),
            "p99_ms": round(percentile(ms, 0.99), 3), "max_ms": round(max(ms), 3),
            "mean_ms": round(statistics.fmean(ms), 3)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=100_000, help="events per run")
    parser.add_argument("--batch", type=int, default=1_000,
                        help="events per transaction (famulus) or per burst (raw)")
    parser.add_argument("--window", type=int, default=4,
                        help="batches sent ahead of the receiver's acknowledgement; keep "
                        "window * batch below 10,000 so the PUB socket drops nothing")
    parser.add_argument("--repeats", type=int, default=3, help="runs per throughput mode")
    parser.add_argument("--calls", type=int, default=2_000, help="timed `status` calls")
    parser.add_argument("--warmup", type=int, default=100, help="untimed `status` calls first")
    args = parser.parse_args()
    if args.window * args.batch >= PUB_SNDHWM:
        parser.error(f"--window * --batch must stay below {PUB_SNDHWM}")
    report = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "python": platform.python_version(), "pyzmq": zmq.__version__,
                    "libzmq": zmq.zmq_version(), "famulus": version("famulus")},
        "throughput": measure_throughput(args),
        "status_round_trip": measure_status(args.calls, args.warmup),
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
