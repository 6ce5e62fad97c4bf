"""Video jobs end to end: a real daemon, real `famulus worker` processes, a tiny LTX pipeline.

The pipeline has random weights (tests/tiny_ltx.py), so the frames are noise, but every step
is real: the text encoder, the denoising loop, the VAE decode and the H.264 encode. Each MP4
is checked with PyAV's decoder.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

av = pytest.importorskip("av", reason="the video extra is not installed")
pytest.importorskip("diffusers", reason="the video extra is not installed")

import zmq  # noqa: E402

from famulus.daemon import journal  # noqa: E402
from famulus.daemon.journal import JobKind, Lane  # noqa: E402
from famulus.daemon.store import Store  # noqa: E402
from famulus.ipc import security  # noqa: E402
from famulus.ipc.client import BusError  # noqa: E402
from famulus.ipc.protocol import Event, Topic  # noqa: E402
from tests.conftest import DaemonHome, pid_alive, wait_for  # noqa: E402
from tests.tiny_ltx import build_tiny_ltx, build_tiny_ltx2  # noqa: E402

# The tiny VAE compresses 4x in space and time: frames must be 4k+1, sizes multiples of 4.
SMALL = {"frames": 9, "width": 96, "height": 64, "fps": 8, "steps": 4, "seed": 7}
JOB_TIMEOUT_S = 120


@pytest.fixture(scope="session")
def tiny_ltx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_ltx(tmp_path_factory.mktemp("tiny-ltx"))


@pytest.fixture(scope="session")
def tiny_ltx2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_ltx2(tmp_path_factory.mktemp("tiny-ltx2"))


def video_config(home: DaemonHome, model_dir: Path, **keys: Any) -> None:
    values = {"model_dir": str(model_dir), "device": "cpu",
              "output_dir": str(home.root / "videos"), "idle_timeout_s": 30.0,
              "heartbeat_s": 0.2, "heartbeat_timeout_s": 3.0, **keys}
    lines = "\n".join(f"{key} = {json.dumps(value)}" for key, value in values.items())
    home.write_config(extra=f"\n[video]\n{lines}\n")


def faults(home: DaemonHome, **spec: Any) -> None:
    home.env["FAMULUS_WORKER_FAULTS"] = json.dumps(spec)


def wait_job(home: DaemonHome, job: int, topic: str = Topic.JOB_DONE) -> Event:
    assert home.log is not None
    return home.log.wait(lambda e: e.topic in (topic, Topic.JOB_FAILED, Topic.JOB_DONE,
                                               Topic.JOB_CANCELLED) and e.body["job"] == job,
                         JOB_TIMEOUT_S, f"job {job} to end")


def submit(home: DaemonHome, prompt: str, **params: Any) -> int:
    with home.client() as client:
        return int(client.call("video.submit", {"prompt": prompt, **SMALL, **params})["job"])


def probe(path: Path) -> dict[str, Any]:
    """Decode the whole file with PyAV and report what a player would see."""
    with av.open(str(path)) as container:
        video = container.streams.video[0]
        frames = sum(1 for _ in container.decode(video=0))
        return {"frames": frames, "width": video.codec_context.width,
                "height": video.codec_context.height, "codec": video.codec_context.name,
                "audio_streams": len(container.streams.audio)}


def durations(path: Path) -> dict[str, float]:
    """Return each stream's duration in seconds, by stream type."""
    with av.open(str(path)) as container:
        return {s.type: float(s.duration * s.time_base) for s in container.streams}


def videos(home: DaemonHome) -> list[str]:
    folder = home.root / "videos"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def worker_pids(home: DaemonHome) -> list[int]:
    return [w["pid"] for w in home.status()["video"]["workers"]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_model_dispatcher_skips_video_lane(tmp_path: Path) -> None:
    store = Store(tmp_path / "db.sqlite")
    video = store.call(lambda tx: journal.enqueue(tx, JobKind.VIDEO, Lane.VIDEO))
    text = store.call(lambda tx: journal.enqueue(tx, JobKind.SUMMARIZE_TEXT, Lane.DOCUMENTS))
    claimed = store.call(journal.claim_next)
    assert claimed is not None
    assert claimed.id == text
    assert store.call(journal.claim_next) is None
    claimed = store.call(lambda tx: journal.claim_next(tx, (Lane.VIDEO,)))
    assert claimed is not None
    assert claimed.id == video
    store.close()


def send_garbage(home: DaemonHome) -> None:
    """Send malformed messages to the worker endpoint, as a broken worker might."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 1000)
    sock.connect(f"ipc://{home.runtime / 'worker.sock'}")
    for frame in (b"\xff\xfe", b"[1, 2]", b'{"v": 1}', b'{"v": 9, "type": "hello"}',
                  b'{"v": 1, "type": "done", "job": 1}'):
        sock.send(frame)
    sock.close()
    ctx.term()


def test_video_job_end_to_end(daemon_home: DaemonHome, tiny_ltx: Path) -> None:
    video_config(daemon_home, tiny_ltx, idle_timeout_s=2.0)
    daemon_home.start()
    with daemon_home.client() as client:
        with pytest.raises(BusError, match=r"`frames` must be from 1 to 257, got 400 "
                           r"\(raise video.max_frames"):
            client.call("video.submit", {"prompt": "x", "frames": 400})
        with pytest.raises(BusError, match="`prompt` must be non-empty text"):
            client.call("video.submit", {"prompt": " "})
        with pytest.raises(BusError, match="`audio` must be true or false"):
            client.call("video.submit", {"prompt": "x", "audio": "yes"})
        with pytest.raises(BusError, match="`seed` must be a whole number"):
            client.call("video.submit", {"prompt": "x", "seed": -1})
    send_garbage(daemon_home)
    job = submit(daemon_home, "a red fox runs through snow")
    done = wait_job(daemon_home, job)
    assert done.topic == Topic.JOB_DONE, done.body
    result = done.body["result"]
    path = Path(result["path"])
    assert path.parent == daemon_home.root / "videos"
    assert probe(path) == {"frames": 9, "width": 96, "height": 64, "codec": "h264",
                           "audio_streams": 0}
    assert result["bytes"] == path.stat().st_size
    assert result["seed"] == 7
    assert daemon_home.stderr().count("ignored an invalid message from a video worker") == 4
    assert daemon_home.log is not None
    announced = daemon_home.log.matching(Topic.VIDEO_DONE, job=job)
    assert [e.body["path"] for e in announced] == [str(path)]
    steps = [e.body["step"] for e in daemon_home.log.matching(Topic.JOB_PROGRESS, job=job)]
    assert steps == [1, 2, 3, 4]

    # The worker exits after its idle timeout, returning its memory; the daemon never
    # loaded torch itself.
    worker = result["worker_pid"]
    wait_for(lambda: not pid_alive(worker), 30, "the idle worker to exit")
    daemon_home.log.wait(lambda e: e.topic == Topic.VIDEO_WORKER
                         and e.body["action"] == "exited" and e.body["pid"] == worker, 10,
                         "video.worker exited")
    assert daemon_home.status()["video"]["workers"] == []
    status = subprocess.run(daemon_home.command("status"), env=daemon_home.env,
                            capture_output=True, text=True, timeout=60)
    assert "video:     workers: none" in status.stdout
    assert daemon_home.proc is not None
    maps = Path(f"/proc/{daemon_home.proc.pid}/maps").read_text()
    assert "libtorch" not in maps

    # A model without audio rejects --audio with a reason; nothing is written.
    rejected = wait_job(daemon_home, submit(daemon_home, "a fox", audio=True))
    assert rejected.topic == Topic.JOB_FAILED
    assert "makes no audio" in rejected.body["error"]
    assert videos(daemon_home) == [path.name]


def test_video_with_audio_track(daemon_home: DaemonHome, tiny_ltx2: Path) -> None:
    video_config(daemon_home, tiny_ltx2)
    daemon_home.start()
    # The tiny LTX-2 VAE compresses 2x in space and time.
    size = {"frames": 9, "width": 64, "height": 32, "fps": 8, "steps": 3}
    done = wait_job(daemon_home, submit(daemon_home, "a fox barks in the snow", audio=True,
                                        **size))
    assert done.topic == Topic.JOB_DONE, done.body
    path = Path(done.body["result"]["path"])
    assert done.body["result"]["pipeline"] == "LTX2Pipeline"
    assert probe(path) == {"frames": 9, "width": 64, "height": 32, "codec": "h264",
                           "audio_streams": 1}
    with av.open(str(path)) as container:
        assert container.streams.audio[0].codec_context.name == "aac"
    lengths = durations(path)
    assert lengths["video"] == pytest.approx(9 / 8)
    assert lengths["audio"] == pytest.approx(lengths["video"], abs=0.1)

    # The command line, without --audio: the same model writes no audio track.
    options = [f"--{name}={value}" for name, value in size.items()]
    cli = subprocess.run(daemon_home.command("video", "a quiet fox", *options, "--wait"),
                         env=daemon_home.env, capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0, cli.stderr
    assert "step 3 of 3" in cli.stderr
    silent = Path(cli.stdout.strip())
    assert probe(silent)["audio_streams"] == 0


def test_cancel_stops_before_decode(daemon_home: DaemonHome, tiny_ltx: Path) -> None:
    video_config(daemon_home, tiny_ltx)
    faults(daemon_home, step_delay_s=1.0, match="slow")
    daemon_home.start()
    job = submit(daemon_home, "a slow pan over the harbour", steps=6)
    assert daemon_home.log is not None
    daemon_home.log.wait(lambda e: e.topic == Topic.JOB_PROGRESS and e.body["job"] == job
                         and e.body["step"] == 2, JOB_TIMEOUT_S, "step 2 of 6")
    with daemon_home.client() as client:
        assert client.call("cancel", {"id": job}) == {"job": job, "state": "cancelling"}
    ended = wait_job(daemon_home, job, Topic.JOB_CANCELLED)
    assert ended.topic == Topic.JOB_CANCELLED
    with daemon_home.client() as client:
        assert client.call("job", {"id": job})["state"] == "cancelled"
    steps = [e.body["step"] for e in daemon_home.log.matching(Topic.JOB_PROGRESS, job=job)]
    assert max(steps) < 6
    assert videos(daemon_home) == []
    assert daemon_home.log.matching(Topic.VIDEO_DONE, job=job) == []

    after = wait_job(daemon_home, submit(daemon_home, "boats at dusk"))
    assert after.topic == Topic.JOB_DONE
    assert videos(daemon_home) == [Path(after.body["result"]["path"]).name]


def test_killed_worker_job_is_retried(daemon_home: DaemonHome, tiny_ltx: Path) -> None:
    video_config(daemon_home, tiny_ltx)
    faults(daemon_home, step_delay_s=1.0, match="slow")
    daemon_home.start()
    job = submit(daemon_home, "a slow fox", steps=4)
    assert daemon_home.log is not None
    daemon_home.log.wait(lambda e: e.topic == Topic.JOB_PROGRESS and e.body["job"] == job,
                         JOB_TIMEOUT_S, "the first step")
    [victim] = worker_pids(daemon_home)
    os.kill(victim, signal.SIGKILL)
    done = wait_job(daemon_home, job)
    assert done.topic == Topic.JOB_DONE, done.body
    assert done.body["result"]["worker_pid"] != victim
    assert probe(Path(done.body["result"]["path"]))["frames"] == 9
    with daemon_home.client() as client:
        assert client.call("job", {"id": job})["attempts"] == 2
    retries = [e for e in daemon_home.log.matching(Topic.JOB_QUEUED, job=job)
               if e.body.get("retry")]
    assert len(retries) == 1
    assert "process exited with code -9" in retries[0].body["retry"]
    assert daemon_home.status()["state"] == "running"


def test_killed_twice_fails_job(daemon_home: DaemonHome, tiny_ltx: Path) -> None:
    video_config(daemon_home, tiny_ltx)
    faults(daemon_home, step_delay_s=1.0)
    daemon_home.start()
    job = submit(daemon_home, "a fox")
    assert daemon_home.log is not None
    for attempt in (1, 2):
        daemon_home.log.wait(lambda e, a=attempt: e.topic == Topic.JOB_STARTED
                             and e.body["job"] == job and e.body["attempt"] == a,
                             JOB_TIMEOUT_S, f"attempt {attempt}")
        pids = wait_for(lambda: [w["pid"] for w in daemon_home.status()["video"]["workers"]
                                 if w["job"] == job], JOB_TIMEOUT_S, "a busy worker")
        os.kill(pids[0], signal.SIGKILL)
    failed = wait_job(daemon_home, job, Topic.JOB_FAILED)
    assert failed.topic == Topic.JOB_FAILED
    assert failed.body["error"].startswith("video job failed after 2 attempt(s)")
    assert videos(daemon_home) == []


def test_out_of_memory_recycles_worker(daemon_home: DaemonHome, tiny_ltx: Path) -> None:
    video_config(daemon_home, tiny_ltx)
    faults(daemon_home, oom_at_step=2, match="huge")
    daemon_home.start()
    job = submit(daemon_home, "a huge crowd", steps=6)
    failed = wait_job(daemon_home, job, Topic.JOB_FAILED)
    assert failed.topic == Topic.JOB_FAILED
    assert re.fullmatch(r"too large for this (GPU|CPU): needed about 3\.50 GiB, free [\d.]+ GiB; "
                        r"request fewer frames, a smaller size or fewer steps",
                        failed.body["error"]), failed.body["error"]
    assert videos(daemon_home) == []
    first = [e.body["pid"] for e in daemon_home.log.matching(Topic.VIDEO_WORKER)  # type: ignore[union-attr]
             if e.body["action"] == "started"]
    done = wait_job(daemon_home, submit(daemon_home, "a small fox"))
    assert done.topic == Topic.JOB_DONE, done.body
    assert done.body["result"]["worker_pid"] not in first


@pytest.mark.parametrize(("policy", "take", "give"), [("unload", "unload", "reload"),
                                                     ("wait", "hold", "release")])
def test_lease_frees_model_device(daemon_home: DaemonHome, tiny_ltx: Path, policy: str,
                                  take: str, give: str) -> None:
    video_config(daemon_home, tiny_ltx, lease=policy)
    daemon_home.start()
    job = submit(daemon_home, "a fox")
    done = wait_job(daemon_home, job)
    assert done.topic == Topic.JOB_DONE, done.body
    log = daemon_home.log
    assert log is not None
    returned = log.wait(lambda e: e.topic == Topic.MODEL_LEASE and e.body["action"] == give,
                        60, f"model.lease {give}")
    [taken] = log.matching(Topic.MODEL_LEASE, action=take)
    first_step = log.matching(Topic.JOB_PROGRESS, job=job)[0]
    assert taken.body["job"] == job
    assert taken.seq < first_step.seq < done.seq < returned.seq
    if policy == "unload":
        assert taken.body["device"] == "CPU"
        assert returned.body["device"] == "CPU"
    assert daemon_home.status()["model"]["state"] == "loaded"
    with daemon_home.client() as client:
        summary = client.call("summarize", {"text": "The ferry leaves at nine."})["job"]
    log.wait(lambda e: e.topic == Topic.JOB_DONE and e.body["job"] == summary, 120,
             "a summary after the reload")


def run_worker(home: DaemonHome, endpoint: str, keys: Path, model_dir: Path, name: str,
               timeout_s: float = 15) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "famulus.daemon.cli", "worker", "--connect", endpoint,
               "--keys", str(keys), "--model-dir", str(model_dir), "--device", "cpu",
               "--name", name, "--idle-timeout-s", "0", "--connect-timeout-s", str(timeout_s)]
    return subprocess.Popen(command, env=home.env, stderr=subprocess.PIPE, text=True,
                            stdout=subprocess.DEVNULL)


def client_keys(folder: Path, server_keys: Path, name: str) -> Path:
    security.create_client_keys(folder, name)
    (folder / "server.key").write_bytes((server_keys / "server.key").read_bytes())
    return folder


@pytest.fixture
def remote_home(daemon_home: DaemonHome, tiny_ltx: Path) -> tuple[DaemonHome, str, Path]:
    server = daemon_home.root / "config" / "famulus" / "keys"
    security.create_server_keys(server)
    laptop = client_keys(daemon_home.root / "gpu-box-keys", server, "gpu-box")
    security.authorize_client(server, laptop / "client.key", name="gpu-box")
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    video_config(daemon_home, tiny_ltx, tcp_endpoint=endpoint, start_local_worker=False,
                 heartbeat_timeout_s=2.0)
    return daemon_home, endpoint, laptop


def test_remote_worker_over_curve(remote_home: tuple[DaemonHome, str, Path],
                                  tiny_ltx: Path) -> None:
    home, endpoint, keys = remote_home
    home.start()
    stranger_keys = client_keys(home.root / "stranger-keys", keys, "stranger")
    stranger = run_worker(home, endpoint, stranger_keys, tiny_ltx, "stranger", timeout_s=10)
    remote = run_worker(home, endpoint, keys, tiny_ltx, "gpu-box")
    try:
        _, stderr = stranger.communicate(timeout=60)
        assert stranger.returncode == 1
        assert "rejected this worker's key" in stderr
        wait_for(lambda: [w["name"] for w in home.status()["video"]["workers"]] == ["gpu-box"],
                 60, "the remote worker to connect")
        job = submit(home, "a red fox on a remote GPU")
        done = wait_job(home, job)
        assert done.topic == Topic.JOB_DONE, done.body
        assert done.body["result"]["worker"] == "gpu-box"
        assert probe(Path(done.body["result"]["path"]))["frames"] == 9
        assert home.status()["video"]["workers"][0]["local"] is False
    finally:
        remote.terminate()
        remote.communicate(timeout=30)


def test_silent_remote_worker_is_lost(remote_home: tuple[DaemonHome, str, Path],
                                      tiny_ltx: Path) -> None:
    home, endpoint, keys = remote_home
    faults(home, step_delay_s=1.0)
    home.start()
    frozen = run_worker(home, endpoint, keys, tiny_ltx, "frozen")
    try:
        wait_for(lambda: home.status()["video"]["workers"], 60, "the first worker")
        job = submit(home, "a fox")
        assert home.log is not None
        home.log.wait(lambda e: e.topic == Topic.JOB_PROGRESS and e.body["job"] == job,
                      JOB_TIMEOUT_S, "the first step")
        frozen.send_signal(signal.SIGSTOP)
        lost = home.log.wait(lambda e: e.topic == Topic.VIDEO_WORKER
                             and e.body["action"] == "lost", 30, "the worker to be lost")
        assert lost.body["reason"].startswith("no heartbeat for")
        # The job goes back to the queue right after the worker is declared lost.
        retry = home.log.wait(lambda e: e.topic == Topic.JOB_QUEUED and e.body["job"] == job
                              and e.body.get("retry"), 10, "the job to be queued again")
        assert retry.seq > lost.seq
        with home.client() as client:
            assert client.call("job", {"id": job})["state"] == "queued"
        second = run_worker(home, endpoint, keys, tiny_ltx, "second")
        try:
            done = wait_job(home, job)
            assert done.topic == Topic.JOB_DONE, done.body
            assert done.body["result"]["worker"] == "second"
        finally:
            second.terminate()
            second.communicate(timeout=30)
    finally:
        frozen.kill()
        frozen.communicate(timeout=30)


def test_daemon_core_imports_no_torch() -> None:
    code = textwrap.dedent("""\
        import sys
        import famulus.daemon.cli, famulus.daemon.lifecycle
        import famulus.daemon.video.supervisor, famulus.daemon.video.worker
        heavy = sorted(m for m in ("torch", "diffusers", "transformers") if m in sys.modules)
        assert not heavy, heavy
        """)
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
