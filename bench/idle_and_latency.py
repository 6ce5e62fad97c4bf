"""Measure an idle daemon's cost and the pipeline overhead of one document.

1. Idle: the daemon with the default model loaded and one watched folder, sampled for
   `--idle-s` seconds: CPU time (share of one core), RSS and context switches (wake-ups)
   of the daemon and of the model host, from /proc.
2. Latency: small text files are written one at a time. For each, the report gives the
   time from the file's close to `document.summarized` on the bus, minus the model's own
   generation time and minus the configured quiet period.

Run: .venv/bin/python bench/idle_and_latency.py [--idle-s 60] [--files 5]
Linux only (reads /proc). Prints a JSON report.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

from famulus.daemon.demo import isolated_daemon
from famulus.daemon.model.registry import resolve
from famulus.daemon.paths import user_paths
from famulus.ipc.client import Client, Subscriber
from famulus.ipc.protocol import Topic

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
QUIET_PERIOD_S = 0.5


def proc_sample(pid: int) -> dict[str, float]:
    """Read CPU seconds, RSS bytes and context switches (all threads) of one process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu_s = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    rss = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
    switches = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            for line in (task / "status").read_text().splitlines():
                if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                    switches += int(line.split()[1])
        except OSError:
            continue  # the thread ended between listing and reading
    return {"cpu_s": cpu_s, "rss": rss, "switches": switches}


def measure_idle(pids: dict[str, int], seconds: float) -> dict[str, Any]:
    start = {name: proc_sample(pid) for name, pid in pids.items()}
    rss_curve: dict[str, list[int]] = {name: [] for name in pids}
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        time.sleep(min(5.0, seconds / 12))
        for name, pid in pids.items():
            rss_curve[name].append(int(proc_sample(pid)["rss"]))
    elapsed = time.monotonic() - t0
    end = {name: proc_sample(pid) for name, pid in pids.items()}
    report = {}
    for name in pids:
        report[name] = {
            "cpu_percent_of_core": round(100 * (end[name]["cpu_s"] - start[name]["cpu_s"])
                                         / elapsed, 3),
            "rss_mib_start": round(start[name]["rss"] / 2**20, 1),
            "rss_mib_end": round(end[name]["rss"] / 2**20, 1),
            "rss_mib_max": round(max(rss_curve[name]) / 2**20, 1),
            "wakeups_per_s": round((end[name]["switches"] - start[name]["switches"])
                                   / elapsed, 2),
        }
    report["seconds"] = round(elapsed, 1)
    return report


def measure_latency(inbox: Path, sub: Subscriber, files: int) -> dict[str, Any]:
    rows = []
    for i in range(files):
        path = inbox / f"note-{i}.txt"
        with path.open("w", encoding="utf-8") as f:
            f.write(f"Note {i}: the depot's solar roof produced {40 + i} kWh on Monday, "
                    "and the crew replaced two inverters.\n")
        closed = time.monotonic()
        while True:
            event = sub.recv(timeout_s=300)
            if event is None:
                raise RuntimeError(f"no summary of {path} within 300 s")
            if event.topic == Topic.DOCUMENT_SUMMARIZED and event.body["path"] == str(path):
                break
        total = time.monotonic() - closed
        generation = float(event.body["generation_s"])
        rows.append({"total_s": total, "generation_s": generation,
                     "overhead_s": total - generation,
                     "overhead_minus_quiet_s": total - generation - QUIET_PERIOD_S})
    summary = {}
    for key in rows[0]:
        values = [r[key] for r in rows]
        summary[key] = {"median": round(statistics.median(values), 3),
                        "max": round(max(values), 3)}
    return {"files": files, "quiet_period_s": QUIET_PERIOD_S, **summary}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--idle-s", type=float, default=60.0, help="idle sampling time (s)")
    parser.add_argument("--files", type=int, default=5, help="documents for the latency run")
    args = parser.parse_args()
    model = resolve(user_paths().models_dir, "smollm2-135m-instruct", "")
    with isolated_daemon(model, quiet_period_s=QUIET_PERIOD_S, prefix="famulus-bench-",
                         quiet_stderr=True) as daemon, \
            Client(daemon.requests_endpoint) as client:
        deadline = time.monotonic() + 120
        while client.call("status")["model"]["state"] != "loaded":
            if time.monotonic() > deadline:
                raise RuntimeError("the model did not load within 120 s")
            time.sleep(0.2)
        host_pid = client.call("status")["model"]["pid"]
        time.sleep(2)  # let start-up work (scan, first events) settle before sampling
        idle = measure_idle({"daemon": daemon.proc.pid, "model_host": host_pid}, args.idle_s)
        with Subscriber([Topic.DOCUMENT_SUMMARIZED], endpoint=daemon.events_endpoint,
                        requests_endpoint=client.endpoint) as sub:
            time.sleep(0.3)  # subscription propagation before the first file
            latency = measure_latency(daemon.inbox, sub, args.files)
    print(json.dumps({"machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                  "python": platform.python_version(),
                                  "openvino_genai": version("openvino-genai")},
                      "idle": idle, "latency": latency}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
