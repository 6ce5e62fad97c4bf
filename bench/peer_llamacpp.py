"""famulus beside llama.cpp's server, holding the same GGUF file, in one run.

1. Both start: a famulus daemon in a temporary home and `python -m llama_cpp.server` from a
   virtual environment with `llama-cpp-python[server]`, on 127.0.0.1, with the default
   model's GGUF file and as many threads as the machine has cores.
2. Idle, both loaded: CPU time, thread wake-ups (context switches) and RSS over `--idle-s`
   seconds, measured at the same time. famulus counts the daemon and its model host.
3. Generation: the same chat prompts (the start of each corpus document, with a request for
   a summary), greedy, repetition penalty 1.1, at most `--max-tokens` tokens, sent in turn to
   famulus (`ask` over the bus, timed until the job is done) and to llama.cpp
   (`/v1/chat/completions`, timed until the reply). Tokens per second are the generated
   tokens over the wall time of the request.

Run:
  python3 -m venv /tmp/llama && /tmp/llama/bin/pip install "llama-cpp-python[server]"
  .venv/bin/python bench/peer_llamacpp.py --llama-python /tmp/llama/bin/python
The pip install builds llama.cpp from source (about 20 minutes on 2 cores). Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from famulus.daemon.demo import isolated_daemon
from famulus.daemon.model.registry import resolve
from famulus.daemon.paths import user_paths
from famulus.ipc.client import Client

CORPUS = Path(__file__).resolve().parents[1] / "tests" / "corpus" / "documents"
PROMPT_CHARS = 1500
TICKS = os.sysconf("SC_CLK_TCK")


def prompts(count: int) -> list[str]:
    texts = []
    for path in sorted(CORPUS.glob("*.txt")) + sorted(CORPUS.glob("*.html")):
        body = path.read_text(encoding="utf-8", errors="replace")[:PROMPT_CHARS]
        texts.append(f"Summarize this text in three sentences.\n\n{body}")
    return (texts * count)[:count]


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def context_switches(pid: int) -> int:
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            for line in (task / "status").read_text().splitlines():
                if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                    total += int(line.split()[1])
        except OSError:
            continue  # the thread ended meanwhile
    return total


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def idle(pids: dict[str, list[int]], seconds: float) -> dict[str, Any]:
    """Measure CPU and wake-ups of each group of processes over the same `seconds`."""
    before = {name: (sum(map(cpu_ticks, group)), sum(map(context_switches, group)))
              for name, group in pids.items()}
    time.sleep(seconds)  # the measured idle period itself
    report = {}
    for name, group in pids.items():
        ticks = sum(map(cpu_ticks, group)) - before[name][0]
        switches = sum(map(context_switches, group)) - before[name][1]
        report[name] = {"cpu_percent_of_one_core": round(100 * ticks / TICKS / seconds, 3),
                        "wakeups_per_s": round(switches / seconds, 2),
                        "rss_mib": round(sum(map(rss_mib, group)), 1)}
    return report


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_llama(python: str, model: Path, port: int) -> subprocess.Popen[bytes]:
    threads = str(os.cpu_count() or 1)
    return subprocess.Popen(
        [python, "-m", "llama_cpp.server", "--model", str(model), "--host", "127.0.0.1",
         "--port", str(port), "--n_threads", threads, "--n_threads_batch", threads,
         "--n_ctx", "4096", "--verbose", "False"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def post(url: str, body: dict[str, Any], timeout: float = 300) -> dict[str, Any]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as reply:
        return dict(json.loads(reply.read()))


def wait_llama(base: str, proc: subprocess.Popen[bytes], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"llama.cpp server exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{base}/v1/models", timeout=2):
                return
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.2)
    raise RuntimeError(f"llama.cpp server not ready within {timeout:.0f} s")


def famulus_generate(client: Client, prompt: str, max_tokens: int) -> dict[str, float]:
    started = time.perf_counter()
    job = client.call("ask", {"prompt": prompt, "max_new_tokens": max_tokens})["job"]
    while (info := client.call("job", {"id": job}))["state"] not in ("done", "failed"):
        time.sleep(0.005)
    wall = time.perf_counter() - started
    if info["state"] != "done":
        raise RuntimeError(f"famulus job {job} failed: {info.get('error')}")
    tokens = int(info["result"]["tokens"])
    return {"tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall}


def llama_generate(base: str, prompt: str, max_tokens: int) -> dict[str, float]:
    started = time.perf_counter()
    reply = post(f"{base}/v1/chat/completions", {
        "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
        "temperature": 0.0, "repeat_penalty": 1.1})
    wall = time.perf_counter() - started
    tokens = int(reply["usage"]["completion_tokens"])
    return {"tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall}


def summarize_runs(runs: list[dict[str, float]]) -> dict[str, Any]:
    tokens = sum(r["tokens"] for r in runs)
    wall = sum(r["wall_s"] for r in runs)
    return {"requests": len(runs), "tokens": int(tokens), "wall_s": round(wall, 2),
            "tokens_per_s": round(tokens / wall, 1),
            "tokens_per_s_median": round(statistics.median(r["tokens_per_s"] for r in runs), 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--llama-python", required=True,
                        help="python of a virtual environment with llama-cpp-python[server]")
    parser.add_argument("--prompts", type=int, default=6)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--idle-s", type=float, default=60.0)
    args = parser.parse_args()
    model = resolve(user_paths().models_dir, "smollm2-135m-instruct", "")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    llama = start_llama(args.llama_python, model, port)
    version = subprocess.run([args.llama_python, "-c", "import llama_cpp; "
                              "print(llama_cpp.__version__)"], capture_output=True, text=True
                             ).stdout.strip()
    try:
        with isolated_daemon(model, prefix="famulus-peer-", quiet_stderr=True) as daemon, \
                Client(daemon.requests_endpoint, timeout_s=30) as client:
            wait_llama(base, llama)
            while (status := client.call("status"))["model"]["state"] not in ("loaded",
                                                                               "failed"):
                time.sleep(0.2)
            host_pid = int(status["model"]["pid"])
            idle_report = idle({"famulus": [daemon.proc.pid, host_pid],
                                "llama_cpp": [llama.pid]}, args.idle_s)
            ours: list[dict[str, float]] = []
            theirs: list[dict[str, float]] = []
            for prompt in prompts(args.prompts):
                ours.append(famulus_generate(client, prompt, args.max_tokens))
                theirs.append(llama_generate(base, prompt, args.max_tokens))
    finally:
        llama.terminate()
        llama.wait(15)
    famulus_rate = summarize_runs(ours)
    llama_rate = summarize_runs(theirs)
    report = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "python": platform.python_version(), "llama_cpp_python": version},
        "model": str(model), "max_tokens": args.max_tokens, "idle_s": args.idle_s,
        "idle": idle_report, "famulus": famulus_rate, "llama_cpp": llama_rate,
        "ratio_famulus_to_llama_cpp": {
            "tokens_per_s": round(famulus_rate["tokens_per_s"] / llama_rate["tokens_per_s"], 3),
            "idle_rss": round(idle_report["famulus"]["rss_mib"]
                              / idle_report["llama_cpp"]["rss_mib"], 3)},
    }
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
