"""Measure the idle CPU cost of the clipboard watcher: X11 events against polling.

For each backend, a child process runs only the clipboard watcher of the clipboard plugin
against a private Xvfb server. The script first copies one text with xclip and times how long
the watcher takes to report it. Then nothing is copied for `--seconds` seconds, and the
child's CPU time (its own and that of the xclip processes it ran and reaped) and context
switches are read from /proc before and after.

Run: .venv/bin/python bench/clipboard_idle.py [--seconds 60] [--poll-interval-s 1.0]
Needs Linux (/proc), Xvfb, xclip and python-xlib (all installed by .ci/setup). Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import random
import select
import subprocess
import sys
import threading
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
READY_TIMEOUT_S = 20.0


def cpu_and_switches(pid: int) -> tuple[float, int]:
    """Return CPU seconds (self and reaped children) and context switches of all threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = sum(int(fields[i]) for i in (11, 12, 13, 14)) / CLOCK_TICKS
    switches = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            for line in (task / "status").read_text().splitlines():
                if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                    switches += int(line.split()[1])
        except OSError:
            continue
    return cpu, switches


def run_child(backend: str, poll_interval_s: float) -> None:
    """Run one watcher and print one line per clipboard change it reports."""
    from famulus.plugins.clipboard import ClipboardSettings
    from famulus.plugins.clipboard_watchers import Offer, choose_watcher

    settings = ClipboardSettings(backend=backend, poll_interval_s=poll_interval_s)

    def on_offer(offer: Offer) -> None:
        chars = len(offer.text) if offer.text else 0
        print(f"offer {chars}", flush=True)

    watcher = choose_watcher(settings, on_offer, lambda: True,
                             lambda *a: print("warning", *a, file=sys.stderr))
    if watcher is None or watcher.kind != backend:
        raise SystemExit(f"backend {backend} unavailable (got {watcher and watcher.kind})")
    watcher.prime()
    print("ready", flush=True)
    watcher.run()


def start_xvfb() -> tuple[subprocess.Popen[bytes], str, int]:
    read_fd, write_fd = os.pipe()
    # A random high display number avoids the X servers of other users of the machine.
    number = random.randrange(200, 60000)
    proc = subprocess.Popen(["Xvfb", f":{number}", "-displayfd", str(write_fd), "-nolisten",
                             "tcp"],
                            pass_fds=(write_fd,), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    os.close(write_fd)
    ready, _, _ = select.select([read_fd], [], [], READY_TIMEOUT_S)
    if not ready:
        raise SystemExit("Xvfb did not start")
    reported = os.read(read_fd, 32).decode().strip()
    # The read end stays open: Xvfb may write the newline after the number separately, and a
    # write to a closed pipe would kill it with SIGPIPE.
    if reported != str(number):
        raise SystemExit(f"Xvfb reported display {reported!r}, not {number}")
    return proc, f":{number}", read_fd


class Lines:
    """Lines of a child's stdout, read on a thread (select on a buffered pipe can miss some)."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self._queue: queue.Queue[str] = queue.Queue()
        assert proc.stdout is not None
        stdout = proc.stdout
        threading.Thread(target=lambda: [self._queue.put(x.strip()) for x in stdout],
                         daemon=True).start()

    def next(self, timeout: float, what: str = "output") -> str:
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            raise SystemExit(f"no {what} from the watcher within {timeout} s") from None


def measure(backend: str, env: dict[str, str], seconds: float,
            poll_interval_s: float) -> dict[str, Any]:
    child = subprocess.Popen([sys.executable, __file__, "--child", backend,
                              "--poll-interval-s", str(poll_interval_s)],
                             stdout=subprocess.PIPE, text=True, env=env)
    copier: subprocess.Popen[bytes] | None = None
    lines = Lines(child)
    try:
        if lines.next(READY_TIMEOUT_S) != "ready":
            raise SystemExit(f"{backend} watcher did not start")
        copier = subprocess.Popen(["xclip", "-selection", "clipboard", "-quiet"],
                                  stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL, env=env)
        assert copier.stdin is not None
        copied_at = time.monotonic()
        copier.stdin.write(b"a line of text copied by the benchmark")
        copier.stdin.close()
        line = lines.next(READY_TIMEOUT_S, "report of the copy")
        detect_ms = (time.monotonic() - copied_at) * 1000
        if not line.startswith("offer"):
            raise SystemExit(f"{backend} watcher reported {line!r}")
        time.sleep(1.0)  # let the reading of that copy finish before sampling
        cpu0, switches0 = cpu_and_switches(child.pid)
        t0 = time.monotonic()
        time.sleep(seconds)
        cpu1, switches1 = cpu_and_switches(child.pid)
        elapsed = time.monotonic() - t0
    finally:
        child.terminate()
        child.wait(10)
        if copier is not None:
            copier.terminate()
            copier.wait(10)
    return {"backend": backend, "seconds": round(elapsed, 1),
            "cpu_s": round(cpu1 - cpu0, 3),
            "cpu_percent_of_one_core": round(100 * (cpu1 - cpu0) / elapsed, 3),
            "context_switches_per_s": round((switches1 - switches0) / elapsed, 2),
            "detect_ms": round(detect_ms, 1),
            "poll_interval_s": poll_interval_s if backend == "poll" else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0,
                        help="idle period sampled per backend, in seconds")
    parser.add_argument("--poll-interval-s", type=float, default=1.0,
                        help="interval of the polling backend, in seconds")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_child(args.child, args.poll_interval_s)
        return
    xvfb, display, xvfb_fd = start_xvfb()
    env = {**os.environ, "DISPLAY": display}
    env.pop("WAYLAND_DISPLAY", None)
    try:
        results = [measure(b, env, args.seconds, args.poll_interval_s) for b in ("x11", "poll")]
    finally:
        xvfb.terminate()
        xvfb.wait(10)
        os.close(xvfb_fd)
    print(json.dumps({"machine": {"cpus": os.cpu_count(), "kernel": platform.release(),
                                  "python": platform.python_version(),
                                  "python-xlib": version("python-xlib")},
                      "results": results}, indent=2))


if __name__ == "__main__":
    main()
