"""The video worker program (`famulus worker`): runs diffusers LTX pipelines for the daemon.

The daemon starts it on demand as a separate process, or it runs on another host and connects
over TCP with CURVE. It connects a DEALER socket to the daemon's worker endpoint, sends
`hello`, loads the pipeline on a background thread and runs one job at a time there. The main
thread owns the socket: it relays progress, replies to heartbeats, handles cancels, and exits
after the idle timeout so that the GPU memory is returned.

torch and diffusers are imported only inside the functions that run the pipeline, so the
daemon can import this module (for the command line) without loading them.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import re
import socket
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
import zmq.utils.monitor

from famulus.daemon.video.protocol import (
    MAX_FRAME_BYTES,
    Failure,
    Msg,
    WorkerProtocolError,
    decode,
    encode,
)
from famulus.ipc.security import CLIENT_KEYS_COMMAND, apply_client_curve

logger = logging.getLogger(__name__)

LINGER_MS = 1000
# Test seam: JSON such as {"step_delay_s": 0.5, "oom_at_step": 2, "match": "slow"}.
# `step_delay_s` slows each denoising step, so that a test can cancel or kill mid-job.
# `oom_at_step` raises torch.OutOfMemoryError after that step, as a GPU without enough memory
# would. With `match`, the faults apply only to jobs whose prompt contains that text.
FAULTS_ENV = "FAMULUS_WORKER_FAULTS"


class WorkerError(Exception):
    """The worker cannot start or cannot load its pipeline. The message states the fix."""


class JobCancelled(Exception):
    """Raised from the step callback, so that the pipeline stops before the VAE decode."""


class JobFailed(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class WorkerOptions:
    connect: str
    model_dir: str
    device: str
    name: str
    idle_timeout_s: float | None = None  # None: use the daemon's value from `welcome`
    keys_folder: Path | None = None  # CURVE keys, for tcp:// endpoints
    launch_id: str | None = None  # set by the daemon for the workers it starts
    connect_timeout_s: float = 15.0


def default_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


# -- the pipeline thread --------------------------------------------------------------------


class PipelineRunner:
    """Loads the pipeline once and runs jobs; lives on its own thread."""

    def __init__(self, options: WorkerOptions, outbox: queue.Queue[list[bytes]]) -> None:
        self.options = options
        self.outbox = outbox
        self.jobs: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.cancel = threading.Event()
        self.busy = threading.Event()
        self.fatal = threading.Event()  # set after an out-of-memory or load failure
        self.faults: dict[str, Any] = json.loads(os.environ.get(FAULTS_ENV) or "{}")
        self._pipe: Any = None
        self._load_error: str | None = None
        self.device = options.device

    def run(self) -> None:
        self._load()
        while True:
            job = self.jobs.get()
            if job is None:
                return
            try:
                self._run_job(job)
            finally:
                self.busy.clear()

    def _load(self) -> None:
        started = time.monotonic()
        try:
            self._pipe = load_pipeline(self.options.model_dir, self.options.device)
        except Exception as exc:
            logger.exception("loading the video pipeline failed: model_dir=%s",
                             self.options.model_dir)
            self._load_error = str(exc)
            return
        logger.info("video pipeline loaded: class=%s device=%s load_s=%.2f",
                    type(self._pipe).__name__, self.device, time.monotonic() - started)

    def _send(self, message_type: str, /, *extra_frames: bytes, **fields: Any) -> None:
        self.outbox.put([encode(message_type, **fields), *extra_frames])

    def _run_job(self, job: dict[str, Any]) -> None:
        job_id = job["job"]
        self.cancel.clear()
        started = time.monotonic()
        try:
            if self._pipe is None:
                raise JobFailed(Failure.LOAD_FAILED, f"the video pipeline in "
                                f"{self.options.model_dir} could not be loaded: "
                                f"{self._load_error}")
            path = self._generate(job)
        except JobCancelled:
            logger.info("job cancelled before the decode: job=%s", job_id)
            self._send(Msg.FAILED, job=job_id, kind=Failure.CANCELLED,
                       message="cancelled by request")
            return
        except JobFailed as exc:
            logger.warning("job failed: job=%s kind=%s %s", job_id, exc.kind, exc)
            if exc.kind == Failure.LOAD_FAILED:
                self.fatal.set()
            self._send(Msg.FAILED, job=job_id, kind=exc.kind, message=str(exc))
            return
        except Exception as exc:
            if _is_out_of_memory(exc):
                message = out_of_memory_message(exc, self.device)
                logger.error("job failed: job=%s %s", job_id, message)
                self.fatal.set()
                self._send(Msg.FAILED, job=job_id, kind=Failure.OUT_OF_MEMORY, message=message)
                return
            logger.exception("job failed: job=%s", job_id)
            self._send(Msg.FAILED, job=job_id, kind=Failure.ERROR,
                       message=f"{type(exc).__name__}: {exc}")
            return
        try:
            data = path.read_bytes()
        finally:
            path.unlink(missing_ok=True)
            path.parent.rmdir()
        seconds = round(time.monotonic() - started, 3)
        self._send(Msg.DONE, data, job=job_id, frames=job["frames"], width=job["width"],
                   height=job["height"], fps=job["fps"], audio=bool(job.get("audio")),
                   seconds=seconds, device=self.device, bytes=len(data), seed=job["seed"],
                   pipeline=type(self._pipe).__name__)

    def _generate(self, job: dict[str, Any]) -> Path:
        import torch

        pipe = self._pipe
        check_job(pipe, job)
        steps = int(job["steps"])
        faults = self.faults if str(self.faults.get("match", "")) in job["prompt"] else {}
        delay = float(faults.get("step_delay_s", 0))
        oom_at = faults.get("oom_at_step")

        def on_step_end(_pipe: Any, index: int, _timestep: Any,
                        tensors: dict[str, Any]) -> dict[str, Any]:
            done = index + 1
            self._send(Msg.PROGRESS, job=job["job"], step=done, steps=steps)
            if oom_at is not None and done >= int(oom_at):
                raise torch.OutOfMemoryError(
                    "CUDA out of memory. Tried to allocate 3.50 GiB. (injected by "
                    f"{FAULTS_ENV})")
            if delay:
                self.cancel.wait(delay)
            # The interrupt flag of the LTX pipelines still decodes the latents, so a cancel
            # raises here instead: the pipeline stops before the VAE decode.
            if self.cancel.is_set():
                raise JobCancelled()
            return tensors

        generator = torch.Generator(device="cpu")
        seed = job.get("seed")
        # Without a seed, draw one and report it, so that the video can be made again.
        job["seed"] = int(seed) if seed is not None else generator.seed()
        generator.manual_seed(job["seed"])
        kwargs: dict[str, Any] = {
            "prompt": job["prompt"], "width": int(job["width"]), "height": int(job["height"]),
            "num_frames": int(job["frames"]), "num_inference_steps": steps,
            "generator": generator, "output_type": "np", "callback_on_step_end": on_step_end,
        }
        waveform, rate = None, None
        if supports_audio(pipe):
            # LTX-2 generates the sound with the picture; the frame rate times them both.
            kwargs["frame_rate"] = float(job["fps"])
            output = pipe(**kwargs)
            if job.get("audio"):
                waveform = output.audio[0]
                rate = int(pipe.vocoder.config.output_sampling_rate)
        else:
            output = pipe(**kwargs)
        frames = output.frames[0]
        folder = Path(tempfile.mkdtemp(prefix="famulus-worker-"))
        path = folder / f"job-{job['job']}.mp4"
        write_mp4(path, frames, int(job["fps"]), waveform, rate)
        return path


def load_pipeline(model_dir: str, device: str) -> Any:
    """Load the diffusers pipeline named in `model_dir`/model_index.json onto `device`."""
    import torch
    from diffusers import DiffusionPipeline

    folder = Path(model_dir).expanduser()
    if not model_dir:
        raise WorkerError("no video model is configured; set video.model_dir (or pass "
                          "--model-dir) to a diffusers LTX-Video pipeline folder")
    if not (folder / "model_index.json").is_file():
        raise WorkerError(f"video model folder {str(folder)!r} has no model_index.json; set "
                          "video.model_dir (or --model-dir) to a diffusers LTX-Video pipeline "
                          "folder, saved with save_pretrained or downloaded with "
                          "`hf download Lightricks/LTX-Video --local-dir DIR`")
    if device == "cuda" and not torch.cuda.is_available():
        raise WorkerError("no CUDA device is available to torch; set video.device = \"cpu\" "
                          "(or --device cpu) to run on the CPU, which is very slow")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    pipe = DiffusionPipeline.from_pretrained(str(folder), dtype=dtype)
    if not type(pipe).__name__.startswith("LTX"):
        raise WorkerError(f"{folder} contains a {type(pipe).__name__}, not an LTX-Video "
                          "pipeline (LTXPipeline or LTX2Pipeline)")
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def supports_audio(pipe: Any) -> bool:
    return getattr(pipe, "vocoder", None) is not None


def check_job(pipe: Any, job: dict[str, Any]) -> None:
    """Raise JobFailed(INVALID) when the size or frame count does not suit the model."""
    spatial = int(getattr(pipe, "vae_spatial_compression_ratio", 32))
    temporal = int(getattr(pipe, "vae_temporal_compression_ratio", 8))
    problems = []
    for name in ("width", "height"):
        if int(job[name]) % spatial:
            problems.append(f"{name} {job[name]} is not a multiple of {spatial}")
    if (int(job["frames"]) - 1) % temporal:
        problems.append(f"frames {job['frames']} is not {temporal}·k+1 (for example "
                        f"{temporal * 4 + 1} or {temporal * 8 + 1})")
    if job.get("audio") and not supports_audio(pipe):
        problems.append(f"the model ({type(pipe).__name__}) makes no audio; drop --audio or "
                        "use an LTX-2 model")
    if problems:
        raise JobFailed(Failure.INVALID, "this model cannot make that video: "
                        + "; ".join(problems))


def write_mp4(path: Path, frames: Any, fps: int, audio: Any = None,
              sample_rate: int | None = None) -> None:
    """Encode float frames in [0, 1] (frames, height, width, 3) as H.264, with AAC audio."""
    from diffusers.utils import encode_video

    encode_video(frames, fps, str(path), audio=audio, audio_sample_rate=sample_rate)


def _is_out_of_memory(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.OutOfMemoryError)


def out_of_memory_message(exc: BaseException, device: str) -> str:
    """Build the job's error text: how much memory the step wanted and how much was free."""
    match = re.search(r"Tried to allocate ([\d.]+ [KMGT]?i?B)", str(exc))
    needed = match.group(1) if match else "more than was free"
    free = _free_memory(device)
    where = "GPU" if device == "cuda" else "CPU"
    return (f"too large for this {where}: needed about {needed}, free {free}; request fewer "
            "frames, a smaller size or fewer steps")


def _free_memory(device: str) -> str:
    try:
        if device == "cuda":
            import torch

            free = torch.cuda.mem_get_info()[0]
        else:
            meminfo = Path("/proc/meminfo").read_text()
            found = re.search(r"MemAvailable:\s+(\d+) kB", meminfo)
            if found is None:
                return "unknown"
            free = int(found.group(1)) * 1024
    except Exception:
        return "unknown"
    return f"{free / 1024**3:.2f} GiB"


# -- the socket thread ----------------------------------------------------------------------


class Worker:
    def __init__(self, options: WorkerOptions) -> None:
        self.options = options
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, LINGER_MS)
        self.sock.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES)
        self.outbox: queue.Queue[list[bytes]] = queue.Queue()
        self.runner = PipelineRunner(options, self.outbox)
        self.job: int | None = None
        self.heartbeat_s = 1.0
        self.heartbeat_timeout_s = 10.0
        self.idle_timeout_s = options.idle_timeout_s

    def run(self) -> int:
        try:
            self._connect()
            self._handshake()
        except WorkerError as exc:
            logger.error("%s", exc)
            self._close()
            return 1
        thread = threading.Thread(target=self.runner.run, name="pipeline", daemon=True)
        thread.start()
        try:
            return self._loop()
        finally:
            self.runner.cancel.set()
            self.runner.jobs.put(None)
            self._close()

    def _connect(self) -> None:
        endpoint = self.options.connect
        if endpoint.startswith("tcp://") and self.options.keys_folder is not None:
            apply_client_curve(self.sock, self.options.keys_folder)
        self.sock.connect(endpoint)

    def _handshake(self) -> None:
        monitor = self.sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_AUTH
                                               | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL)
        try:
            self.sock.send(encode(Msg.HELLO, name=self.options.name, pid=os.getpid(),
                                  host=socket.gethostname(), device=self.options.device,
                                  launch_id=self.options.launch_id))
            poller = zmq.Poller()
            poller.register(self.sock, zmq.POLLIN)
            poller.register(monitor, zmq.POLLIN)
            deadline = time.monotonic() + self.options.connect_timeout_s
            while (left := deadline - time.monotonic()) > 0:
                ready = dict(poller.poll(int(left * 1000) + 1))
                if monitor in ready:
                    event = zmq.utils.monitor.recv_monitor_message(monitor)
                    raise WorkerError(
                        f"the daemon at {self.options.connect} rejected this worker's key "
                        f"(handshake event {event['event']!s}); authorize client.key on the "
                        "daemon's host with `famulus keys authorize FILE --name NAME` and "
                        "restart the daemon, or create keys with "
                        f"`{CLIENT_KEYS_COMMAND}`")
                if self.sock in ready:
                    message = decode(self.sock.recv_multipart()[0])
                    if message["type"] == Msg.WELCOME:
                        self._welcome(message)
                        return
                    if message["type"] == Msg.EXIT:
                        raise WorkerError(f"the daemon turned this worker away: "
                                          f"{message.get('reason')}")
            raise WorkerError(f"no reply from a famulus daemon at {self.options.connect} "
                              f"within {self.options.connect_timeout_s:.0f} s; check that it "
                              "runs with a worker endpoint there")
        except WorkerProtocolError as exc:
            raise WorkerError(f"the daemon sent an invalid message: {exc}") from None
        finally:
            self.sock.disable_monitor()
            monitor.close(0)

    def _welcome(self, message: dict[str, Any]) -> None:
        self.heartbeat_s = float(message.get("heartbeat_s", self.heartbeat_s))
        self.heartbeat_timeout_s = float(message.get("heartbeat_timeout_s",
                                                     self.heartbeat_timeout_s))
        if self.idle_timeout_s is None:
            self.idle_timeout_s = float(message.get("idle_timeout_s", 60.0))
        logger.info("connected to the daemon at %s: name=%s device=%s idle_timeout_s=%s",
                    self.options.connect, self.options.name, self.options.device,
                    self.idle_timeout_s)

    def _loop(self) -> int:
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        heard = sent = idle_since = time.monotonic()
        while True:
            # Short polls while a job runs, so that progress goes out at once.
            timeout = 0.05 if self.job is not None else self.heartbeat_s
            ready = dict(poller.poll(int(timeout * 1000)))
            now = time.monotonic()
            if self.sock in ready:
                while self.sock.poll(0):
                    heard = now
                    if self._on_message(self.sock.recv_multipart()):
                        return 0
            if self._flush_outbox():
                idle_since = time.monotonic()
            if self.runner.fatal.is_set() and self.job is None:
                logger.info("worker exits so that the next job gets a fresh process")
                self.sock.send(encode(Msg.BYE, reason="recycled"))
                return 0
            if now - sent >= self.heartbeat_s:
                self.sock.send(encode(Msg.HEARTBEAT, job=self.job))
                sent = now
            if now - heard > self.heartbeat_timeout_s:
                logger.error("no heartbeat from the daemon for %.0f s; exiting",
                             now - heard)
                return 1
            idle = self.idle_timeout_s or 0
            if self.job is None and idle > 0 and now - idle_since > idle:
                logger.info("idle for %.0f s; exiting to return the device memory", idle)
                self.sock.send(encode(Msg.BYE, reason="idle"))
                return 0

    def _flush_outbox(self) -> bool:
        """Send what the pipeline thread produced; return True when a job ended."""
        ended = False
        while True:
            try:
                frames = self.outbox.get_nowait()
            except queue.Empty:
                return ended
            if decode(frames[0])["type"] in (Msg.DONE, Msg.FAILED):
                self.job = None
                ended = True
            self.sock.send_multipart(frames)

    def _on_message(self, frames: list[bytes]) -> bool:
        """Handle one message from the daemon; return True when the worker must exit."""
        try:
            message = decode(frames[0])
        except WorkerProtocolError as exc:
            logger.warning("ignored an invalid message from the daemon: %s", exc)
            return False
        kind = message["type"]
        if kind == Msg.JOB:
            if self.job is not None or self.runner.busy.is_set():
                self.sock.send(encode(Msg.FAILED, job=message.get("job"), kind=Failure.ERROR,
                                      message="the worker is busy with another job"))
                return False
            self.job = message["job"]
            self.runner.busy.set()
            self.runner.jobs.put(message)
            logger.info("job received: job=%s frames=%s size=%sx%s steps=%s", self.job,
                        message.get("frames"), message.get("width"), message.get("height"),
                        message.get("steps"))
        elif kind == Msg.CANCEL:
            if message.get("job") == self.job:
                self.runner.cancel.set()
        elif kind == Msg.EXIT:
            logger.info("the daemon asked this worker to exit: %s", message.get("reason"))
            return True
        return False

    def _close(self) -> None:
        self.sock.close()
        self.ctx.term()


def run_worker(options: WorkerOptions) -> int:
    """Run a worker until its idle timeout or the daemon's `exit`; return the exit code."""
    # Everything is local: no model hub lookups, no telemetry, no progress bars on stderr.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    return Worker(options).run()
