"""Time video jobs end to end on the CPU with a tiny random LTX-Video pipeline.

A daemon runs in a temporary home with `video.device = "cpu"`; the tiny pipeline comes from
tests/tiny_ltx.py (random weights, so the numbers measure famulus and the diffusers code path,
not a real model). The first job includes the worker's start (process, torch import,
pipeline load); the jobs after it reuse the warm worker. For each, the report gives the time
from `video.submit` to `video.done` and the worker's own time (generation and encoding).

Run: .venv/bin/python bench/video_cpu.py [--jobs 3] [--device cpu]
With --device cuda on a machine with an NVIDIA GPU, the same jobs run on CUDA.
Prints a JSON report.
"""

from __future__ import annotations

import argparse
import json
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from famulus.daemon.demo import isolated_env, wait_for_daemon  # noqa: E402
from famulus.daemon.model.registry import resolve  # noqa: E402
from famulus.daemon.paths import user_paths  # noqa: E402
from famulus.ipc.client import Client, Subscriber  # noqa: E402
from famulus.ipc.protocol import Topic  # noqa: E402
from tests.tiny_ltx import build_tiny_ltx  # noqa: E402

SIZES = [
    {"frames": 9, "width": 96, "height": 64, "fps": 8, "steps": 4},
    {"frames": 25, "width": 192, "height": 128, "fps": 24, "steps": 8},
]


def run_job(client: Client, sub: Subscriber, params: dict[str, Any]) -> dict[str, Any]:
    last = client.call("status")["last_seq"]
    started = time.monotonic()
    job = client.call("video.submit", {"prompt": "a red fox runs through snow", **params})["job"]
    for event in sub.follow(since=last, client=client, idle_timeout_s=600):
        if event.body.get("job") != job:
            continue
        if event.topic == Topic.VIDEO_DONE:
            return {"total_s": round(time.monotonic() - started, 3),
                    "worker_s": event.body["seconds"], "bytes": event.body["bytes"]}
        if event.topic == Topic.JOB_FAILED:
            raise RuntimeError(f"job {job} failed: {event.body['error']}")
    raise RuntimeError(f"job {job} did not finish")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=3, help="jobs per size (default 3)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()
    model = resolve(user_paths().models_dir, "smollm2-135m-instruct", "")
    with tempfile.TemporaryDirectory(prefix="famulus-video-bench-") as tmp:
        home = Path(tmp)
        env = isolated_env(home)
        pipeline = build_tiny_ltx(home / "tiny-ltx")
        config = home / "config.toml"
        config.write_text(textwrap.dedent(f"""\
            [watch]
            folders = [{str(home / 'inbox')!r}]
            [model]
            path = {str(model)!r}
            [video]
            model_dir = {str(pipeline)!r}
            device = {args.device!r}
            output_dir = {str(home / 'videos')!r}
            """), encoding="utf-8")
        proc = subprocess.Popen([sys.executable, "-m", "famulus.daemon.cli", "--config",
                                 str(config), "run"], env=env, stderr=subprocess.DEVNULL)
        runtime = home / "run" / "famulus"
        report: dict[str, Any] = {
            "machine": platform.processor() or platform.machine(), "python":
            platform.python_version(), "device": args.device,
            "versions": {name: version(name) for name in ("torch", "diffusers",
                                                          "transformers", "av")},
            "sizes": []}
        try:
            with Client(f"ipc://{runtime / 'requests.sock'}", timeout_s=30) as client:
                wait_for_daemon(client, proc, 120)
            with Client(f"ipc://{runtime / 'requests.sock'}", timeout_s=30) as client, \
                    Subscriber(endpoint=f"ipc://{runtime / 'events.sock'}",
                               requests_endpoint=client.endpoint) as sub:
                # The first job starts the worker; the others find it warm.
                first = run_job(client, sub, SIZES[0])
                report["first_job"] = {**SIZES[0], **first}
                for size in SIZES:
                    runs = [run_job(client, sub, size) for _ in range(args.jobs)]
                    report["sizes"].append({
                        **size, "jobs": len(runs),
                        "total_s_median": statistics.median(r["total_s"] for r in runs),
                        "worker_s_median": statistics.median(r["worker_s"] for r in runs),
                        "mp4_bytes": runs[0]["bytes"]})
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
