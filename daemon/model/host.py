"""The model host: a child process that keeps one OpenVINO GenAI pipeline resident.

It speaks JSON lines with its parent: requests on stdin, replies on the original stdout.
File descriptor 1 is pointed at stderr at start, so that anything a native library prints
cannot corrupt the protocol stream. When stdin closes (the daemon exited, even by SIGKILL),
the host exits at once, so an orphaned host never keeps the model in memory.

Requests: ``{"id": 1, "op": "load" | "count" | "generate" | "describe" | "ping", ...}``;
``load`` with ``"kind": "vlm"`` loads a vision model, which serves only ``describe``. The op
``cancel`` has no reply and stops the running generation. Replies: ``{"id": 1, "ok": true,
...}`` or ``{"id": 1, "ok": false, "error": "...", "kind": "..."}``.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import sys
import threading
import time
from collections.abc import Callable
from typing import IO, Any

logger = logging.getLogger("famulus.daemon.model.host")


class HostError(Exception):
    """A request failed inside the host. `kind` selects the daemon's reaction."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


# Test seam for accelerators this machine lacks: "GPU=crash,NPU=hang" makes those devices
# look available, and loading on them aborts the process (as a driver crash does) or hangs.
DEVICE_FAULTS_ENV = "FAMULUS_TEST_DEVICE_FAULTS"


def device_faults() -> dict[str, str]:
    spec = os.environ.get(DEVICE_FAULTS_ENV, "")
    pairs = (item.partition("=") for item in spec.split(",") if "=" in item)
    return {device.strip(): fault.strip() for device, _, fault in pairs}


def inject_fault(fault: str) -> None:
    if fault == "crash":
        os.abort()
    if fault == "hang":
        threading.Event().wait()
    raise RuntimeError(f"injected load failure ({fault})")


def npu_properties(params: dict[str, Any]) -> dict[str, Any]:
    # The NPU compiles for static shapes, so it needs both lengths up front.
    return {"MAX_PROMPT_LEN": int(params["npu_max_prompt_len"]),
            "MIN_RESPONSE_LEN": int(params["npu_min_response_len"])}


class Host:
    """Executes requests on one worker thread; cancel arrives on the reader thread."""

    def __init__(self, out: IO[str]) -> None:
        self._out = out
        self._write_lock = threading.Lock()
        self._cancel = threading.Event()
        self.pipe: Any = None
        self.tokenizer: Any = None
        self.device: str | None = None
        self.kind = "llm"

    def reply(self, message: dict[str, Any]) -> None:
        line = json.dumps(message, ensure_ascii=False)
        with self._write_lock:
            self._out.write(line + "\n")
            self._out.flush()

    def cancel(self) -> None:
        self._cancel.set()

    def reset_cancel(self) -> None:
        self._cancel.clear()

    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        op = request.get("op")
        if op == "ping":
            return {"device": self.device}
        if op == "load":
            return self.load(request)
        if self.pipe is None:
            raise HostError("not_loaded", "no model is loaded; send `load` first")
        if (op == "describe") != (self.kind == "vlm"):
            raise HostError("bad_request", f"op {op!r} does not apply to a model of kind "
                            f"{self.kind!r}; `describe` is for vlm, the other ops for llm")
        if op == "count":
            return {"counts": [self.count(m) for m in request["prompts"]]}
        if op == "generate":
            return self.generate(request)
        if op == "describe":
            from famulus.daemon.model.vision_host import describe

            return describe(self, request)
        raise HostError("bad_request", f"unknown op {op!r}")

    def load(self, request: dict[str, Any]) -> dict[str, Any]:
        import openvino
        import openvino_genai

        path, order = request["path"], list(request["devices"])
        faults = device_faults()
        available = [*openvino.Core().available_devices, *faults]
        errors: dict[str, str] = {}
        rid = request.get("id")

        def failed(device: str, error: str) -> None:
            errors[device] = error
            self.reply({"id": rid, "stream": f"error:{device}:{error}"})

        for device in order:
            # Checking first matters: a missing NPU raises a misleading error about
            # undeclared parameters instead of saying that there is no NPU.
            if not any(d == device or d.startswith(device + ".") for d in available):
                failed(device, f"not available (devices found: {', '.join(available)})")
                continue
            self.reply({"id": rid, "stream": f"trying:{device}"})
            if device in faults:
                inject_fault(faults[device])
            props: dict[str, Any] = {}
            if request.get("cache_dir"):
                props["CACHE_DIR"] = request["cache_dir"]
            if device == "NPU":
                props.update(npu_properties(request))
            started = time.monotonic()
            try:
                if request.get("kind") == "vlm":
                    # NOTE: a vision model on the NPU, with the prompt lengths above, has not
                    # been tried.
                    pipe = openvino_genai.VLMPipeline(path, device, **props)
                else:
                    pipe = openvino_genai.LLMPipeline(path, device, **props)
            except Exception as exc:  # any load or compile failure means: try the next device
                failed(device, f"{type(exc).__name__}: {exc}".strip()[:500])
                continue
            self.pipe, self.tokenizer, self.device = pipe, pipe.get_tokenizer(), device
            self.kind = str(request.get("kind") or "llm")
            return {"device": device, "load_s": round(time.monotonic() - started, 3),
                    "errors": errors}
        raise HostError("load_failed", "the model loaded on no device: " + "; ".join(
            f"{d}: {e}" for d, e in errors.items()))

    def template(self, messages: list[dict[str, str]]) -> str:
        import openvino_genai

        history = openvino_genai.ChatHistory(messages)
        return str(self.tokenizer.apply_chat_template(history, add_generation_prompt=True))

    def count(self, messages: list[dict[str, str]]) -> int:
        # The template already contains the special tokens, so no BOS is added on top.
        ids = self.tokenizer.encode(self.template(messages), add_special_tokens=False).input_ids
        return int(ids.shape[-1])

    def run_streamed(self, request: dict[str, Any], run: Callable[[Callable[[str], Any]], Any]
                     ) -> tuple[Any, float]:
        """Call `run(streamer)` and return its result and the seconds it took.

        The streamer sends each piece to the daemon when the request has `stream`, and stops
        the generation on cancel or after `timeout_s`, which raises HostError.
        """
        import openvino_genai

        stream_id = request.get("id") if request.get("stream") else None
        deadline = time.monotonic() + float(request["timeout_s"])
        stopped = ""

        def streamer(piece: str) -> Any:
            nonlocal stopped
            if stream_id is not None:
                self.reply({"id": stream_id, "stream": piece})
            if self._cancel.is_set():
                stopped = "cancelled"
            elif time.monotonic() > deadline:
                stopped = "timeout"
            else:
                return openvino_genai.StreamingStatus.RUNNING
            return openvino_genai.StreamingStatus.CANCEL

        started = time.monotonic()
        result = run(streamer)
        elapsed = time.monotonic() - started
        if stopped:
            raise HostError(stopped, f"generation {stopped} after {elapsed:.1f} s")
        return result, elapsed

    def generate(self, request: dict[str, Any]) -> dict[str, Any]:
        import openvino_genai

        prompt = self.template(request["messages"])
        config = openvino_genai.GenerationConfig()
        config.max_new_tokens = int(request["max_new_tokens"])
        config.repetition_penalty = float(request.get("repetition_penalty", 1.0))
        if int(request.get("no_repeat_ngram_size") or 0) > 0:
            config.no_repeat_ngram_size = int(request["no_repeat_ngram_size"])
        config.apply_chat_template = False
        config.do_sample = False
        if request.get("min_new_tokens"):
            # Benchmarks set it to max_new_tokens, so every run generates the same count.
            config.min_new_tokens = int(request["min_new_tokens"])
        result, elapsed = self.run_streamed(
            request, lambda streamer: self.pipe.generate([prompt], config, streamer))
        text = result.texts[0]
        tokens = int(result.perf_metrics.get_num_generated_tokens())
        finish = str(result.finish_reasons[0]).rsplit(".", 1)[-1].lower() \
            if getattr(result, "finish_reasons", None) else "unknown"
        metrics = result.perf_metrics
        return {"text": text, "tokens": tokens, "generation_s": round(elapsed, 3),
                "finish": finish,
                # OpenVINO GenAI's own timing, time to first token in ms and tokens per second.
                "ttft_ms": round(float(metrics.get_ttft().mean), 2),
                "throughput_tokens_per_s": round(float(metrics.get_throughput().mean), 2)}


def _work(host: Host, requests: queue.Queue[dict[str, Any] | None]) -> None:
    while (request := requests.get()) is not None:
        rid = request.get("id")
        try:
            host.reply({"id": rid, "ok": True, **host.handle(request)})
        except HostError as exc:
            host.reply({"id": rid, "ok": False, "kind": exc.kind, "error": str(exc)})
        except Exception as exc:
            logger.exception("model host request failed: op=%s", request.get("op"))
            host.reply({"id": rid, "ok": False, "kind": "internal",
                        "error": f"{type(exc).__name__}: {exc}"})


def disable_openvino_telemetry() -> None:
    """Make `import openvino` use its built-in no-op telemetry stub.

    `import openvino` imports its model converter, which sends a usage event through the
    `openvino_telemetry` package (openvino 2026.4) unless a consent file opts out. famulus
    promises that nothing leaves the machine. The send also forks a process from a thread
    while this process reads stdin, and that child can hang and outlive the host. OpenVINO
    falls back to its stub when the package cannot be imported, which this arranges.
    """
    sys.modules["openvino_telemetry"] = None  # type: ignore[assignment]
    sys.modules["openvino_telemetry.backend"] = None  # type: ignore[assignment]


def main() -> None:
    disable_openvino_telemetry()
    # Keep the real stdout for the protocol and send fd 1 to stderr for everything else.
    protocol_out = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    logging.basicConfig(level=os.environ.get("FAMULUS_HOST_LOG", "WARNING"),
                        format="%(levelname)s famulus.model-host: %(message)s")
    host = Host(protocol_out)
    requests: queue.Queue[dict[str, Any] | None] = queue.Queue(maxsize=64)
    worker = threading.Thread(target=_work, args=(host, requests), name="host-worker",
                              daemon=True)
    worker.start()
    for line in sys.stdin:
        try:
            request = json.loads(line)
        except ValueError:
            logger.warning("model host ignored a line that is not JSON")
            continue
        if request.get("op") == "cancel":
            host.cancel()
            continue
        if request.get("op") in ("generate", "describe"):
            # Cleared here, in the order of the input lines, not by the worker when the
            # generation starts: a cancel that arrives while the worker is still preparing
            # the request must not be lost.
            host.reset_cancel()
        requests.put(request)
    # stdin closed: the daemon is gone or asked us to stop. Exit without waiting for a
    # generation that may still run in native code.
    protocol_out.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
