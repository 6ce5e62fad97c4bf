"""The overhead famulus adds to generation, against OpenVINO GenAI and transformers.

The default model (SmolLM2-135M-Instruct Q4_1 GGUF, `famulus model pull`) generates the same
reply on four paths, in turns, so that the load of a shared machine hits all of them alike:

- `direct`: `openvino_genai.LLMPipeline(gguf, "CPU")` in this process, with a streamer.
- `host`: famulus's model host process alone (`ModelHost`), streaming its pieces back.
- `daemon`: a real `famulus run` in a temporary home, sent an `ask` request with `stream`
  over the bus. It is timed from the request to the first `job.token` event and to
  `job.done`.
- `transformers`: `AutoModelForCausalLM.from_pretrained(..., gguf_file=...)`, which
  dequantizes the GGUF weights to float32, on torch's CPU build, once per thread count in
  `--torch-threads`. Its GGUF tokenizer is broken
  (wrong class, wrong BOS and EOS ids), so it gets the prompt's token ids from the OpenVINO
  tokenizer, and its output ids are decoded with that tokenizer too.

Every path applies the model's chat template to one user message and decodes greedily with no
repetition penalty. The OpenVINO and transformers paths set min_new_tokens = max_new_tokens,
so each run generates exactly that many tokens. The daemon's `ask` has no such setting, so
the prompt is one that the model answers at length; the report shows the token counts.

Time to first token (TTFT) is the wall time from the request to the first text piece that the
caller receives. Tokens per second is generated tokens over the wall time of the whole
request. Medians over the repeats are reported.

Run (transformers' GGUF loader needs the `gguf` and `accelerate` packages):
  .venv/bin/pip install gguf accelerate
  .venv/bin/python bench/model_overhead.py --repeats 7 --max-new-tokens 64
Without them, or with --no-transformers, the transformers path is skipped. Prints JSON.
"""

from __future__ import annotations

import argparse
import functools
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from famulus.daemon.demo import isolated_env, wait_for_daemon
from famulus.daemon.model.bench import BENCH_PROMPT
from famulus.daemon.model.host import disable_openvino_telemetry
from famulus.daemon.model.registry import resolve
from famulus.daemon.model.supervisor import ModelHost
from famulus.daemon.paths import user_paths
from famulus.ipc.client import Client, Subscriber

MESSAGES = [{"role": "user", "content": BENCH_PROMPT}]
Run = dict[str, float]


class Direct:
    """OpenVINO GenAI called directly, the baseline famulus is measured against."""

    def __init__(self, model: Path) -> None:
        disable_openvino_telemetry()
        import openvino_genai

        self._genai = openvino_genai
        self.pipe = openvino_genai.LLMPipeline(str(model), "CPU")
        self.tokenizer = self.pipe.get_tokenizer()
        history = openvino_genai.ChatHistory(MESSAGES)
        self.prompt = str(self.tokenizer.apply_chat_template(history,
                                                             add_generation_prompt=True))

    def prompt_ids(self) -> list[int]:
        # The template already contains the special tokens, as in the model host.
        ids = self.tokenizer.encode(self.prompt, add_special_tokens=False).input_ids
        return [int(i) for i in ids.data[0]]

    def generate(self, max_new_tokens: int) -> Run:
        config = self._genai.GenerationConfig()
        config.max_new_tokens = max_new_tokens
        config.min_new_tokens = max_new_tokens
        config.do_sample = False
        config.apply_chat_template = False
        first: list[float] = []

        def streamer(piece: str) -> Any:
            if not first:
                first.append(time.perf_counter())
            return self._genai.StreamingStatus.RUNNING

        started = time.perf_counter()
        result = self.pipe.generate([self.prompt], config, streamer)
        wall = time.perf_counter() - started
        metrics = result.perf_metrics
        tokens = int(metrics.get_num_generated_tokens())
        self.last_text = result.texts[0]
        return {"tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
                "ttft_ms": (first[0] - started) * 1000 if first else float("nan"),
                "openvino_ttft_ms": float(metrics.get_ttft().mean),
                "openvino_tokens_per_s": float(metrics.get_throughput().mean)}


class Host:
    """famulus's model host process, driven through its supervisor like the daemon does."""

    def __init__(self, model: Path, cache_dir: str) -> None:
        self.host = ModelHost({"path": str(model), "devices": ["CPU"], "cache_dir": cache_dir,
                               "npu_max_prompt_len": 1024, "npu_min_response_len": 256,
                               "load_timeout_s": 300.0})
        self.host.ensure_loaded()

    def generate(self, max_new_tokens: int) -> Run:
        first: list[float] = []

        def on_piece(piece: str) -> None:
            if not first:
                first.append(time.perf_counter())

        started = time.perf_counter()
        reply = self.host.request({"op": "generate", "messages": MESSAGES,
                                   "max_new_tokens": max_new_tokens,
                                   "min_new_tokens": max_new_tokens, "repetition_penalty": 1.0,
                                   "timeout_s": 300.0, "stream": True}, 330.0, on_piece)
        wall = time.perf_counter() - started
        tokens = int(reply["tokens"])
        return {"tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
                "ttft_ms": (first[0] - started) * 1000 if first else float("nan"),
                "openvino_ttft_ms": float(reply["ttft_ms"]),
                "openvino_tokens_per_s": float(reply["throughput_tokens_per_s"])}

    def close(self) -> None:
        self.host.stop()


class Daemon:
    """A real daemon in a temporary home, asked over the bus with streaming."""

    def __init__(self, client: Client, events: Subscriber) -> None:
        self.client = client
        self.events = events

    def generate(self, max_new_tokens: int) -> Run:
        started = time.perf_counter()
        job = self.client.call("ask", {"prompt": BENCH_PROMPT, "stream": True,
                                       "max_new_tokens": max_new_tokens})["job"]
        first = None
        while True:
            event = self.events.recv(timeout_s=300)
            if event is None:
                raise RuntimeError(f"no event for job {job} within 300 s")
            if event.body.get("job") != job:
                continue
            if event.topic == "job.token" and first is None:
                first = time.perf_counter()
            elif event.topic == "job.done":
                break
            elif event.topic == "job.failed":
                raise RuntimeError(f"famulus job {job} failed: {event.body.get('error')}")
        wall = time.perf_counter() - started
        tokens = int(event.body["result"]["tokens"])
        return {"tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
                "ttft_ms": (first - started) * 1000 if first else float("nan")}


@contextmanager
def running_daemon(model: Path) -> Iterator[Daemon]:
    with tempfile.TemporaryDirectory(prefix="famulus-overhead-") as tmp:
        home = Path(tmp)
        env = isolated_env(home)
        config = home / "config.toml"
        # The same generation settings as the other paths: CPU, no repetition penalty.
        config.write_text(textwrap.dedent(f"""\
            [watch]
            folders = [{str(home / 'inbox')!r}]

            [model]
            path = {str(model)!r}
            devices = ["CPU"]
            repetition_penalty = 1.0
            """), encoding="utf-8")
        log = home / "daemon.log"
        with log.open("wb") as stderr:
            proc = subprocess.Popen([sys.executable, "-m", "famulus.daemon.cli", "--config",
                                     str(config), "run"], env=env, stderr=stderr)
        runtime = home / "run" / "famulus"
        try:
            with Client(f"ipc://{runtime / 'requests.sock'}", timeout_s=30) as client:
                try:
                    wait_for_daemon(client, proc, 120)
                except RuntimeError as exc:
                    tail = log.read_text(encoding="utf-8", errors="replace")[-2000:]
                    raise RuntimeError(f"{exc}; its log ends with:\n{tail}") from exc
                deadline = time.monotonic() + 300
                while (state := client.call("status")["model"]["state"]) not in ("loaded",
                                                                                 "failed"):
                    if time.monotonic() > deadline:
                        raise RuntimeError("the daemon's model did not load within 300 s")
                    time.sleep(0.2)
                if state != "loaded":
                    raise RuntimeError(f"the daemon's model failed to load: "
                                       f"{client.call('status')['model'].get('error')}")
                with Subscriber(["job.token", "job.done", "job.failed"],
                                endpoint=f"ipc://{runtime / 'events.sock'}",
                                requests_endpoint=client.endpoint) as events:
                    yield Daemon(client, events)
        finally:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


class Transformers:
    """transformers on the same GGUF file, fed with the OpenVINO tokenizer's ids."""

    def __init__(self, model: Path, prompt_ids: list[int], decode: Callable[[list[int]], str]
                 ) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        self._torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(str(model.parent), gguf_file=model.name,
                                                          dtype=torch.float32)
        self.model.eval()
        self.input_ids = torch.tensor([prompt_ids])
        self.decode = decode
        self.last_text = ""

    def generate(self, max_new_tokens: int, threads: int) -> Run:
        from transformers.generation.streamers import BaseStreamer

        self._torch.set_num_threads(threads)

        first: list[float] = []

        class FirstToken(BaseStreamer):
            # transformers calls put() with the prompt first, then once per new token.
            calls = 0

            def put(self, value: Any) -> None:
                self.calls += 1
                if self.calls == 2:
                    first.append(time.perf_counter())

            def end(self) -> None:
                pass

        started = time.perf_counter()
        with self._torch.inference_mode():
            output = self.model.generate(
                self.input_ids, attention_mask=self._torch.ones_like(self.input_ids),
                max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False,
                repetition_penalty=1.0, pad_token_id=0, streamer=FirstToken())
        wall = time.perf_counter() - started
        new_ids = [int(i) for i in output[0, self.input_ids.shape[1]:]]
        self.last_text = self.decode(new_ids)
        return {"tokens": len(new_ids), "wall_s": wall, "tokens_per_s": len(new_ids) / wall,
                "ttft_ms": (first[0] - started) * 1000 if first else float("nan")}


def summarize(runs: list[Run]) -> dict[str, Any]:
    summary: dict[str, Any] = {
        "runs": len(runs),
        "tokens": sorted({int(r["tokens"]) for r in runs}),
        "tokens_per_s_median": round(statistics.median(r["tokens_per_s"] for r in runs), 2),
        "ttft_ms_median": round(statistics.median(r["ttft_ms"] for r in runs), 1),
        "tokens_per_s_all": [round(r["tokens_per_s"], 2) for r in runs],
        "ttft_ms_all": [round(r["ttft_ms"], 1) for r in runs]}
    if all("openvino_ttft_ms" in r for r in runs):
        # OpenVINO GenAI's own timing inside the pipeline, without any transport.
        summary["openvino_ttft_ms_median"] = round(
            statistics.median(r["openvino_ttft_ms"] for r in runs), 1)
        summary["openvino_tokens_per_s_median"] = round(
            statistics.median(r["openvino_tokens_per_s"] for r in runs), 2)
    return summary


def overhead(ours: list[Run], base: list[Run]) -> dict[str, float]:
    """Return what `ours` adds over `base` in percent (positive means slower).

    Each repeat's pair ran back to back, so the median of the per-repeat ratios is less
    affected by the machine's load changing during the run than a ratio of medians.
    """
    rate = [b["tokens_per_s"] / o["tokens_per_s"] for o, b in zip(ours, base, strict=True)]
    ttft = [o["ttft_ms"] / b["ttft_ms"] for o, b in zip(ours, base, strict=True)]
    return {"tokens_per_s_percent": round(100 * (statistics.median(rate) - 1), 1),
            "ttft_percent": round(100 * (statistics.median(ttft) - 1), 1)}


def versions(names: list[str]) -> dict[str, str]:
    found = {}
    for name in names:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def run_interleaved(paths: dict[str, Callable[[int], Run]], repeats: int,
                    max_new_tokens: int) -> dict[str, list[Run]]:
    """Run every path `repeats` times, in turns, after one untimed run each."""
    results: dict[str, list[Run]] = {name: [] for name in paths}
    names = list(paths)
    # The untimed runs let first calls allocate their buffers and fill caches.
    for name in names:
        paths[name](max_new_tokens)
    for repeat in range(repeats):
        # Rotate the order, so that no path always runs right after another.
        order = names[repeat % len(names):] + names[:repeat % len(names)]
        print(f"repeat {repeat + 1}/{repeats}: {', '.join(order)}", file=sys.stderr)
        for name in order:
            results[name].append(paths[name](max_new_tokens))
    return results


def load_transformers(model: Path, direct: Direct, thread_counts: list[int],
                      paths: dict[str, Callable[[int], Run]], notes: dict[str, str]
                      ) -> Transformers | None:
    """Load transformers and add one path per thread count, or record why it did not load."""
    print("loading: transformers (dequantizes the GGUF weights)", file=sys.stderr)
    try:
        hf = Transformers(model, direct.prompt_ids(),
                          lambda ids: str(direct.tokenizer.decode(ids)))
    except (ImportError, ValueError, OSError) as exc:
        notes["transformers"] = f"not loaded: {type(exc).__name__}: {exc}"
        return None
    for threads in thread_counts:
        paths[f"transformers_threads_{threads}"] = functools.partial(hf.generate,
                                                                     threads=threads)
    return hf


def build_report(args: argparse.Namespace, model: Path, results: dict[str, list[Run]],
                 notes: dict[str, str]) -> dict[str, Any]:
    summary = {name: summarize(runs) for name, runs in results.items()}
    report: dict[str, Any] = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "python": platform.python_version(),
                    **versions(["openvino", "openvino-genai", "torch", "transformers"])},
        "model": str(model), "max_new_tokens": args.max_new_tokens, "repeats": args.repeats,
        "results": summary,
        "famulus_adds": {"host": overhead(results["host"], results["direct"]),
                         "daemon": overhead(results["daemon"], results["direct"])},
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
        "notes": notes,
    }
    transformers = [name for name in summary if name.startswith("transformers")]
    if transformers:
        direct = summary["direct"]
        report["transformers_over_direct"] = {
            name: {"tokens_per_s_ratio": round(summary[name]["tokens_per_s_median"]
                                               / direct["tokens_per_s_median"], 3),
                   "ttft_ratio": round(summary[name]["ttft_ms_median"]
                                       / direct["ttft_ms_median"], 3)}
            for name in transformers}
    return report


def main() -> int:
    # By default torch's OpenMP threads spin for a while after each parallel region. On this
    # shared machine that made transformers with 2 threads about 5 times slower than with 1,
    # and it took CPU from the OpenVINO run that came next. Set before torch is imported.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7,
                        help="timed runs per path (default 7)")
    parser.add_argument("--max-new-tokens", type=int, default=64,
                        help="tokens generated in each run (default 64)")
    parser.add_argument("--no-transformers", action="store_true",
                        help="skip the transformers path")
    parser.add_argument("--torch-threads", default="1,2",
                        help="torch thread counts to measure transformers with, separated by "
                        "commas (default 1,2)")
    args = parser.parse_args()
    model = resolve(user_paths().models_dir, "smollm2-135m-instruct", "")

    print("loading: OpenVINO GenAI directly", file=sys.stderr)
    direct = Direct(model)
    paths: dict[str, Callable[[int], Run]] = {"direct": direct.generate}
    notes: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="famulus-overhead-cache-") as cache, \
            running_daemon(model) as daemon:
        print("loading: the model host", file=sys.stderr)
        host = Host(model, cache)
        paths["host"] = host.generate
        paths["daemon"] = daemon.generate
        hf = None
        if not args.no_transformers:
            hf = load_transformers(model, direct, [int(n) for n in args.torch_threads.split(",")],
                                   paths, notes)
        try:
            results = run_interleaved(paths, args.repeats, args.max_new_tokens)
        finally:
            host.close()

    report = build_report(args, model, results, notes)
    if hf is not None:
        # In the runs recorded in docs/benchmarks.md the two replies differed from the first
        # token, so both are kept for a reader to compare.
        report["texts"] = {"direct": direct.last_text, "transformers": hf.last_text}
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
