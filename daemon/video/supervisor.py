"""The daemon's side of video generation: the worker endpoint and the video job dispatcher.

One thread owns the worker sockets (an ipc:// ROUTER in the runtime folder, and optionally a
TCP ROUTER with CURVE for remote workers). It claims queued jobs of the video lane only, hands
each to an idle worker, one job per worker, and relays progress as `job.progress` events. When
video jobs wait and no worker is idle, it starts a local worker process (`famulus worker`, by
subprocess, never by fork). Heartbeats run both ways: a worker that exits or goes silent
loses its job, which is queued again until `video.max_attempts` attempts have failed.

Other threads talk to this one through a command queue and a wake-up pipe that the poller
watches, because ZeroMQ sockets are not thread-safe. With no worker and no lease in progress,
the thread blocks in `poll` with no timeout, so an idle daemon has no wake-ups here.
"""

from __future__ import annotations

import logging
import os
import queue
import re
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import platformdirs
import zmq

from famulus.daemon import journal
from famulus.daemon.config import Config, ConfigError
from famulus.daemon.journal import Job, JobState, Lane
from famulus.daemon.model.supervisor import ModelError, ModelHost
from famulus.daemon.store import Store, Tx
from famulus.daemon.video.protocol import (
    MAX_FRAME_BYTES,
    WORKER_SOCKET_NAME,
    Failure,
    Msg,
    WorkerProtocolError,
    decode,
    encode,
)
from famulus.ipc.protocol import Topic
from famulus.ipc.security import CurveServer, check_tcp_endpoint

logger = logging.getLogger(__name__)

LINGER_MS = 100
VIDEO_LANES = (Lane.VIDEO,)
# A started worker that has not sent `hello` within this time is killed.
LAUNCH_TIMEOUT_S = 120.0


def worker_endpoint(runtime_dir: Path) -> str:
    return f"ipc://{runtime_dir / WORKER_SOCKET_NAME}"


def output_folder(config: Config) -> Path:
    configured = config.video.output_dir
    if configured:
        return Path(os.path.expandvars(configured)).expanduser()
    return Path(platformdirs.user_videos_dir()) / "famulus"


@dataclass
class WorkerRecord:
    identity: bytes
    router: zmq.Socket[Any]
    name: str
    host: str
    pid: int | None
    device: str
    proc: subprocess.Popen[bytes] | None  # set for the workers this daemon started
    last_seen: float
    state: str = "idle"  # idle, reserved (waiting for the lease), busy, leaving
    job: Job | None = None

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "host": self.host, "pid": self.pid, "device": self.device,
                "local": self.proc is not None, "state": self.state,
                "job": self.job.id if self.job else None}


@dataclass
class Launch:
    proc: subprocess.Popen[bytes]
    started: float
    name: str


@dataclass
class Lease:
    """The model host's accelerator while video jobs run on a local worker."""

    state: str = "free"  # free, acquiring, held, releasing
    jobs: list[int] = field(default_factory=list)


class VideoSupervisor:
    def __init__(self, config: Config, store: Store, runtime_dir: Path,
                 model: ModelHost | None, keys_folder: Path | None) -> None:
        self.config = config
        self.store = store
        self.model = model
        self.endpoint = worker_endpoint(runtime_dir)
        self.keys_folder = keys_folder
        self.ctx = zmq.Context()
        self._curve: CurveServer | None = None
        self._commands: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._wake_r, self._wake_w = os.pipe()
        self._lock = threading.Lock()
        self._workers: dict[bytes, WorkerRecord] = {}
        self._launches: dict[str, Launch] = {}
        self._running: set[int] = set()
        self._lease = Lease()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._launch_count = 0

    # -- control (any thread) ---------------------------------------------------------------

    def start(self) -> None:
        """Bind the worker endpoints on the supervisor thread; return once they are bound."""
        cfg = self.config.video
        if cfg.tcp_endpoint:
            check_tcp_endpoint(cfg.tcp_endpoint, curve_enabled=cfg.curve)
            if cfg.curve:
                if self.keys_folder is None:
                    raise ConfigError("video.curve needs a key folder")
                self._curve = CurveServer(self.ctx, self.keys_folder)
        self._thread = threading.Thread(target=self._run, name="video", daemon=True)
        self._thread.start()
        self._ready.wait(10)
        if self._error is not None:
            if self._curve is not None:
                self._curve.stop()
            raise self._error

    def wake(self) -> None:
        """Tell the supervisor that a video job may be waiting."""
        self._post("wake", None)

    def cancel(self, job_id: int) -> bool:
        """Stop the running video job `job_id`; return False when it is not running here."""
        with self._lock:
            if job_id not in self._running:
                return False
        self._post("cancel", job_id)
        return True

    def status(self) -> dict[str, Any]:
        with self._lock:
            workers = [w.describe() for w in self._workers.values()]
            starting = len(self._launches)
            lease = self._lease.state
        return {"endpoint": self.endpoint, "tcp_endpoint": self.config.video.tcp_endpoint or None,
                "workers": workers, "starting": starting, "lease": lease}

    def stop(self, timeout: float) -> None:
        if self._thread is None:
            return
        self._post("stop", timeout)
        self._thread.join(timeout + 1)
        if self._thread.is_alive():
            logger.warning("video supervisor still busy after %.1f s", timeout)
            return
        if self._curve is not None:
            self._curve.stop()
        self.ctx.term()
        os.close(self._wake_r)
        os.close(self._wake_w)
        Path(self.endpoint[len("ipc://"):]).unlink(missing_ok=True)

    def _post(self, command: str, arg: Any) -> None:
        self._commands.put((command, arg))
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass  # stopped already

    # -- the loop ---------------------------------------------------------------------------

    def _bind(self) -> list[zmq.Socket[Any]]:
        routers = []
        endpoints = [(self.endpoint, False)]
        if self.config.video.tcp_endpoint:
            endpoints.append((self.config.video.tcp_endpoint, True))
        for endpoint, tcp in endpoints:
            router = self.ctx.socket(zmq.ROUTER)
            router.setsockopt(zmq.LINGER, LINGER_MS)
            router.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES)
            if tcp and self._curve is not None:
                self._curve.apply(router)
            if not tcp:
                # The caller holds the instance lock, so a socket file left here is stale.
                Path(endpoint[len("ipc://"):]).unlink(missing_ok=True)
            router.bind(endpoint)
            routers.append(router)
        return routers

    def _run(self) -> None:
        try:
            routers = self._bind()
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        logger.info("video worker endpoint ready: %s%s", self.endpoint,
                    f" and {self.config.video.tcp_endpoint}" if len(routers) > 1 else "")
        poller = zmq.Poller()
        for router in routers:
            poller.register(router, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        last_beat = time.monotonic()
        try:
            while not self._stopping:
                busy = self._workers or self._launches or self._lease.state != "free"
                timeout = int(self.config.video.heartbeat_s * 1000) if busy else None
                ready = dict(poller.poll(timeout))
                if self._wake_r in ready:
                    os.read(self._wake_r, 4096)
                    self._run_commands()
                for router in routers:
                    if router in ready:
                        self._receive_all(router)
                if time.monotonic() - last_beat >= self.config.video.heartbeat_s:
                    self._heartbeat()
                    last_beat = time.monotonic()
                self._guarded(self._check_processes)
                if not self._stopping:
                    self._guarded(self._dispatch)
        except Exception:
            logger.exception("video supervisor loop failed; video jobs stay queued")
        finally:
            for router in routers:
                router.close()

    def _guarded(self, step: Any) -> None:
        # One bad message or job must not take the loop down.
        try:
            step()
        except Exception:
            logger.exception("video supervisor step failed: %s", step.__name__)

    def _run_commands(self) -> None:
        while True:
            try:
                command, arg = self._commands.get_nowait()
            except queue.Empty:
                return
            if command == "cancel":
                self._guarded(lambda arg=arg: self._cancel(arg))
            elif command == "leased":
                self._guarded(lambda arg=arg: self._on_leased(arg))
            elif command == "released":
                with self._lock:
                    self._lease.state = "free"
            elif command == "stop":
                self._shutdown(float(arg))

    def _receive_all(self, router: zmq.Socket[Any]) -> None:
        while True:
            try:
                frames = router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                self._on_message(router, frames)
            except WorkerProtocolError as exc:
                logger.warning("ignored an invalid message from a video worker: %s", exc)
            except Exception:
                logger.exception("handling a video worker message failed")

    # -- messages from workers --------------------------------------------------------------

    def _on_message(self, router: zmq.Socket[Any], frames: list[bytes]) -> None:
        if len(frames) < 2:
            raise WorkerProtocolError(f"message has {len(frames)} frames")
        identity, message = frames[0], decode(frames[1])
        kind = message["type"]
        worker = self._workers.get(identity)
        if kind == Msg.HELLO:
            self._on_hello(router, identity, message)
            return
        if worker is None:
            # A worker this daemon dropped (lost by heartbeat, or from before a restart).
            router.send_multipart([identity, encode(Msg.EXIT, reason="unknown worker; "
                                                    "start it again to reconnect")])
            return
        worker.last_seen = time.monotonic()
        job = worker.job
        if kind == Msg.PROGRESS and job is not None and message.get("job") == job.id:
            self._emit(Topic.JOB_PROGRESS, {"job": job.id, "step": message.get("step"),
                                            "steps": message.get("steps")}, job.cause)
        elif kind == Msg.DONE and job is not None and message.get("job") == job.id:
            data = frames[2] if len(frames) > 2 else b""
            self._job_ended(worker)
            self._finish(job, worker, message, data)
        elif kind == Msg.FAILED and job is not None and message.get("job") == job.id:
            self._job_ended(worker)
            self._on_failed(job, worker, message)
        elif kind == Msg.BYE:
            self._drop(worker, f"exited: {message.get('reason')}", lost=False)

    def _on_hello(self, router: zmq.Socket[Any], identity: bytes,
                  message: dict[str, Any]) -> None:
        cfg = self.config.video
        if self._stopping:
            router.send_multipart([identity, encode(Msg.EXIT, reason="the daemon is stopping")])
            return
        launch = self._launches.pop(str(message.get("launch_id")), None)
        pid = message.get("pid")
        worker = WorkerRecord(
            identity=identity, router=router, name=str(message.get("name") or "worker"),
            host=str(message.get("host") or "?"), pid=pid if isinstance(pid, int) else None,
            device=str(message.get("device") or "?"), proc=launch.proc if launch else None,
            last_seen=time.monotonic())
        with self._lock:
            self._workers[identity] = worker
        router.send_multipart([identity, encode(
            Msg.WELCOME, heartbeat_s=cfg.heartbeat_s, heartbeat_timeout_s=cfg.heartbeat_timeout_s,
            idle_timeout_s=cfg.idle_timeout_s)])
        logger.info("video worker connected: name=%s host=%s pid=%s device=%s local=%s",
                    worker.name, worker.host, worker.pid, worker.device, launch is not None)
        self._emit(Topic.VIDEO_WORKER, {"action": "connected", **worker.describe()})

    def _job_ended(self, worker: WorkerRecord) -> None:
        job = worker.job
        with self._lock:
            if job is not None:
                self._running.discard(job.id)
            worker.job = None
            if worker.state == "busy":
                worker.state = "idle"

    def _finish(self, job: Job, worker: WorkerRecord, message: dict[str, Any],
                data: bytes) -> None:
        try:
            path = self._save(job, data)
        except OSError as exc:
            error = (f"cannot write the video to {output_folder(self.config)}: {exc}; set "
                     "video.output_dir to a writable folder")
            logger.error("job failed: job=%d %s", job.id, error)
            self.store.call(lambda tx: journal.fail(tx, job, error))
            return
        result = {"path": str(path), "frames": message.get("frames"),
                  "width": message.get("width"), "height": message.get("height"),
                  "fps": message.get("fps"), "audio": message.get("audio"),
                  "bytes": len(data), "seed": message.get("seed"),
                  "seconds": message.get("seconds"),
                  "device": message.get("device"), "pipeline": message.get("pipeline"),
                  "worker": worker.name, "worker_pid": worker.pid}

        def store(tx: Tx) -> None:
            tx.emit(Topic.VIDEO_DONE, {"job": job.id, **result}, job.cause)
            journal.finish(tx, job, result)
        self.store.call(store)
        logger.info("video done: job=%d path=%s seconds=%s worker=%s", job.id, path,
                    message.get("seconds"), worker.name)

    def _save(self, job: Job, data: bytes) -> Path:
        """Write the MP4 under a hidden name, then rename it: readers never see half a file."""
        if not data:
            raise OSError("the worker sent an empty file")
        folder = output_folder(self.config)
        folder.mkdir(parents=True, exist_ok=True)
        slug = re.sub(r"[^a-z0-9]+", "-", str(job.payload.get("prompt", "")).lower())
        stem = f"famulus-{job.id}-{slug.strip('-')[:40] or 'video'}"
        target = folder / f"{stem}.mp4"
        counter = 1
        while target.exists():
            counter += 1
            target = folder / f"{stem}-{counter}.mp4"
        partial = folder / f".{target.name}.partial"
        try:
            partial.write_bytes(data)
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)
        return target

    def _on_failed(self, job: Job, worker: WorkerRecord, message: dict[str, Any]) -> None:
        kind, text = message.get("kind"), str(message.get("message"))
        if kind == Failure.CANCELLED:
            logger.info("video job cancelled: job=%d", job.id)
            self.store.call(lambda tx: journal.mark_cancelled(tx, job, "cancelled by request"))
            return
        if kind in (Failure.OUT_OF_MEMORY, Failure.LOAD_FAILED):
            # The worker exits after these, so the next job starts on a fresh process.
            worker.state = "leaving"
        logger.warning("video job failed: job=%d kind=%s %s", job.id, kind, text)
        self.store.call(lambda tx: journal.fail(tx, job, text))

    # -- dispatch ----------------------------------------------------------------------------

    def _dispatch(self) -> None:
        if self._lease.state in ("acquiring", "releasing"):
            return
        # A read first: claiming is a write transaction, and this runs on every heartbeat.
        if not self._queued():
            self._wind_down()
            return
        idle = [w for w in self._workers.values() if w.state == "idle"]
        if not idle:
            if self._can_launch():
                self._launch()
            return
        # Remote workers first: they exist to take load off this machine.
        worker = sorted(idle, key=lambda w: w.proc is not None)[0]
        needs_lease = (worker.proc is not None and self.config.video.lease != "none"
                       and self.model is not None)
        job = self.store.call(lambda tx: journal.claim_next(tx, VIDEO_LANES))
        if job is None:
            self._wind_down()
            return
        with self._lock:
            self._running.add(job.id)
            worker.job = job
            if needs_lease and self._lease.state == "free":
                worker.state = "reserved"
                self._lease.state = "acquiring"
                self._lease.jobs.append(job.id)
                threading.Thread(target=self._acquire_lease, args=(job,), name="video-lease",
                                 daemon=True).start()
                return
            worker.state = "busy"
        self._send_job(worker, job)

    def _send_job(self, worker: WorkerRecord, job: Job) -> None:
        payload = job.payload
        worker.router.send_multipart([worker.identity, encode(
            Msg.JOB, job=job.id, prompt=payload["prompt"], frames=payload["frames"],
            width=payload["width"], height=payload["height"], fps=payload["fps"],
            steps=payload["steps"], seed=payload.get("seed"), audio=payload.get("audio", False))])
        logger.info("video job sent: job=%d worker=%s attempt=%d", job.id, worker.name,
                    job.attempts)

    def _queued(self) -> int:
        row = self.store.read().execute(
            "SELECT COUNT(*) FROM jobs WHERE state = ? AND lane = ?",
            (JobState.QUEUED, int(Lane.VIDEO))).fetchone()
        return int(row[0])

    def _can_launch(self) -> bool:
        # One local worker at a time: it owns this machine's GPU.
        local = any(w.proc is not None for w in self._workers.values())
        return self.config.video.start_local_worker and not local and not self._launches

    def _launch(self) -> None:
        cfg = self.config.video
        self._launch_count += 1
        launch_id = uuid.uuid4().hex
        name = f"local-{self._launch_count}"
        command = [sys.executable, "-m", "famulus.daemon.cli", "worker", "--connect",
                   self.endpoint, "--model-dir", cfg.model_dir, "--device", cfg.device,
                   "--idle-timeout-s", str(cfg.idle_timeout_s), "--name", name,
                   "--launch-id", launch_id]
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                close_fds=True)
        with self._lock:
            self._launches[launch_id] = Launch(proc, time.monotonic(), name)
        logger.info("video worker started: name=%s pid=%d device=%s", name, proc.pid,
                    cfg.device)
        self._emit(Topic.VIDEO_WORKER, {"action": "started", "name": name, "pid": proc.pid,
                                        "device": cfg.device, "local": True})

    def _wind_down(self) -> None:
        """With no video job left, end the lease: the local worker exits, the model reloads."""
        if self._lease.state != "held" or self._running:
            return
        local = [w for w in self._workers.values() if w.proc is not None]
        for worker in local:
            if worker.state == "idle":
                worker.state = "leaving"
                worker.router.send_multipart([worker.identity, encode(
                    Msg.EXIT, reason="no more video jobs; the model host takes the device")])
        if not local and not self._launches:
            self._lease.state = "releasing"
            threading.Thread(target=self._release_lease, name="video-lease",
                             daemon=True).start()

    # -- the accelerator lease (on its own thread: unloading and loading take time) ----------

    def _acquire_lease(self, job: Job) -> None:
        assert self.model is not None
        policy = self.config.video.lease
        device = self.model.state.device
        # Waits until the model request in flight, if any, has finished.
        self.model.hold()
        if policy == "unload":
            self.model.unload()
            logger.info("model host unloaded for video: job=%d device=%s", job.id, device)
        self._emit(Topic.MODEL_LEASE, {"action": "unload" if policy == "unload" else "hold",
                                       "policy": policy, "job": job.id, "device": device},
                   job.cause)
        self._post("leased", job.id)

    def _release_lease(self) -> None:
        assert self.model is not None
        policy = self.config.video.lease
        self.model.release()
        body: dict[str, Any] = {"action": "reload" if policy == "unload" else "release",
                                "policy": policy, "job": None}
        if policy == "unload":
            try:
                state = self.model.ensure_loaded()
                body.update(device=state.device, load_s=state.load_s)
            except ModelError as exc:
                logger.error("model host failed to reload after video jobs: %s", exc)
                body.update(device=None, error=str(exc))
        self._emit(Topic.MODEL_LEASE, body)
        self._post("released", None)

    def _on_leased(self, job_id: int) -> None:
        with self._lock:
            self._lease.state = "held"
        worker = next((w for w in self._workers.values()
                       if w.job is not None and w.job.id == job_id), None)
        if worker is None or worker.state != "reserved":
            return  # cancelled or lost meanwhile
        worker.state = "busy"
        assert worker.job is not None
        self._send_job(worker, worker.job)

    # -- cancel, heartbeats, lost workers ---------------------------------------------------

    def _cancel(self, job_id: int) -> None:
        worker = next((w for w in self._workers.values()
                       if w.job is not None and w.job.id == job_id), None)
        if worker is None or worker.job is None:
            return
        if worker.state == "reserved":
            job = worker.job
            self._job_ended(worker)
            worker.state = "idle"
            self.store.call(lambda tx: journal.mark_cancelled(tx, job, "cancelled by request"))
            return
        worker.router.send_multipart([worker.identity, encode(Msg.CANCEL, job=job_id)])

    def _heartbeat(self) -> None:
        now = time.monotonic()
        for worker in list(self._workers.values()):
            silent = now - worker.last_seen
            if silent > self.config.video.heartbeat_timeout_s:
                self._drop(worker, f"no heartbeat for {silent:.0f} s", lost=True)
                continue
            worker.router.send_multipart([worker.identity, encode(Msg.HEARTBEAT)])

    def _check_processes(self) -> None:
        for worker in list(self._workers.values()):
            if worker.proc is not None and worker.proc.poll() is not None:
                code = worker.proc.returncode
                lost = worker.state != "leaving" or worker.job is not None
                self._drop(worker, f"process exited with code {code}", lost=lost)
        for launch_id, launch in list(self._launches.items()):
            code = launch.proc.poll()
            waited = time.monotonic() - launch.started
            if code is None and waited < LAUNCH_TIMEOUT_S:
                continue
            if code is None:
                launch.proc.kill()
                launch.proc.wait(5)
            with self._lock:
                del self._launches[launch_id]
            reason = (f"exited with code {code}" if code is not None
                      else f"did not connect within {LAUNCH_TIMEOUT_S:.0f} s")
            self._launch_failed(launch, reason)

    def _launch_failed(self, launch: Launch, reason: str) -> None:
        """Fail the oldest queued video job, so that a broken install does not loop."""
        message = (f"the local video worker (pid {launch.proc.pid}) {reason} before it "
                   "connected; see the daemon's log for its error")
        logger.error("%s", message)
        self._emit(Topic.VIDEO_WORKER, {"action": "failed", "name": launch.name,
                                        "pid": launch.proc.pid, "error": message})
        job = self.store.call(lambda tx: journal.claim_next(tx, VIDEO_LANES))
        if job is not None:
            self.store.call(lambda tx: journal.fail(tx, job, message))

    def _drop(self, worker: WorkerRecord, reason: str, *, lost: bool) -> None:
        """Forget a worker; queue its job again (or fail it after max_attempts attempts)."""
        job = worker.job
        with self._lock:
            self._workers.pop(worker.identity, None)
            if job is not None:
                self._running.discard(job.id)
        if worker.proc is not None and worker.proc.poll() is None and lost:
            worker.proc.kill()
        if worker.proc is not None:
            try:
                worker.proc.wait(5)
            except subprocess.TimeoutExpired:
                logger.warning("video worker pid=%s did not exit after kill", worker.pid)
        if not lost:
            logger.info("video worker left: name=%s %s", worker.name, reason)
        else:
            logger.warning("video worker lost: name=%s pid=%s %s", worker.name, worker.pid,
                           reason)
            worker.router.send_multipart([worker.identity, encode(Msg.EXIT, reason=reason)])
        self._emit(Topic.VIDEO_WORKER, {"action": "lost" if lost else "exited",
                                        **worker.describe(), "reason": reason})
        if job is not None:
            self._retry_or_fail(job, f"the video worker {worker.name} {reason}")

    def _retry_or_fail(self, job: Job, reason: str) -> None:
        if self._stopping:
            self.store.call(lambda tx: journal.requeue(tx, job, None, count_attempt=False))
            return
        if job.attempts < self.config.video.max_attempts:
            logger.warning("video job will be retried on a fresh worker: job=%d attempt=%d %s",
                           job.id, job.attempts, reason)
            self.store.call(lambda tx: journal.requeue(tx, job, reason))
            return
        error = f"video job failed after {job.attempts} attempt(s): {reason}"
        logger.error("job failed: job=%d %s", job.id, error)
        self.store.call(lambda tx: journal.fail(tx, job, error))

    # -- shutdown ---------------------------------------------------------------------------

    def _shutdown(self, timeout: float) -> None:
        self._stopping = True
        deadline = time.monotonic() + timeout * 0.8
        for worker in list(self._workers.values()):
            worker.router.send_multipart([worker.identity, encode(
                Msg.EXIT, reason="the daemon is stopping")])
            if worker.job is not None:
                job = worker.job
                self.store.call(lambda tx, job=job: journal.requeue(tx, job, None,
                                                                    count_attempt=False))
        if self.model is not None and self._lease.state != "free":
            self.model.release()
        procs = [w.proc for w in self._workers.values() if w.proc is not None]
        procs += [launch.proc for launch in self._launches.values()]
        for proc in procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.warning("video worker pid=%d did not exit in time; killing it", proc.pid)
                proc.kill()
                proc.wait(5)
        with self._lock:
            self._workers.clear()
            self._launches.clear()
            self._running.clear()

    def _emit(self, topic: str, body: dict[str, Any], cause: str | None = None) -> None:
        self.store.submit(lambda tx: tx.emit(topic, body, cause))
