"""The model host process and chunked summaries, with the real default model."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from famulus.daemon.model.summarize import (
    DEFAULT_PROMPTS,
    Budget,
    Summarizer,
    messages_for,
    split_pieces,
)
from famulus.daemon.model.supervisor import (
    GenerationStopped,
    HostCrashed,
    LoadFailed,
    ModelHost,
)
from tests.conftest import CORPUS, wait_for


def host_for(model: Path, devices: list[str] | None = None) -> ModelHost:
    return ModelHost({"path": str(model), "devices": devices or ["NPU", "GPU", "CPU"],
                      "cache_dir": "", "npu_max_prompt_len": 1024,
                      "npu_min_response_len": 128, "load_timeout_s": 120},
                     backoff_s=0.1)


@pytest.fixture(scope="module")
def host(model_path: Path) -> Iterator[ModelHost]:
    h = host_for(model_path)
    h.ensure_loaded()
    yield h
    h.stop()


SHORT = [{"role": "user", "content": "Name three colours."}]


def test_falls_back_to_cpu_and_records_why(host: ModelHost) -> None:
    assert host.state.state == "loaded"
    assert host.state.device == "CPU"
    assert "not available" in host.state.device_errors["NPU"]
    assert "not available" in host.state.device_errors["GPU"]


def test_generate_returns_text_and_counts(host: ModelHost) -> None:
    reply = host.generate(SHORT, max_new_tokens=20, repetition_penalty=1.1, timeout_s=60)
    assert reply["text"].strip()
    assert 0 < reply["tokens"] <= 20
    assert reply["finish"] in ("stop", "length")


def test_count_includes_chat_template(host: ModelHost) -> None:
    bare, templated = host.count_tokens([[{"role": "user", "content": ""}], SHORT])
    assert bare > 3  # the template's own special tokens and role names
    assert templated > bare


def test_cancel_stops_generation(host: ModelHost) -> None:
    timer = threading.Timer(0.5, host.cancel)
    timer.start()
    with pytest.raises(GenerationStopped, match="cancelled"):
        host.generate([{"role": "user", "content": "Write a very long story."}],
                      max_new_tokens=5000, repetition_penalty=1.0, timeout_s=120)
    # The host still serves the next request.
    assert host.generate(SHORT, max_new_tokens=5, repetition_penalty=1.1, timeout_s=60)["text"]


def test_wall_clock_limit_stops_generation(host: ModelHost) -> None:
    with pytest.raises(GenerationStopped, match="timeout"):
        host.generate([{"role": "user", "content": "Write a very long story."}],
                      max_new_tokens=5000, repetition_penalty=1.0, timeout_s=0.5)


def test_crash_fails_request_then_restarts(model_path: Path) -> None:
    host = host_for(model_path, ["CPU"])
    try:
        host.ensure_loaded()
        pid = host.state.pid
        assert pid is not None
        killer = threading.Timer(0.5, os.kill, (pid, signal.SIGKILL))
        killer.start()
        with pytest.raises(HostCrashed):
            host.generate([{"role": "user", "content": "Write a very long story."}],
                          max_new_tokens=5000, repetition_penalty=1.0, timeout_s=120)
        assert host.state.restarts == 1
        reply = host.generate(SHORT, max_new_tokens=5, repetition_penalty=1.1, timeout_s=60)
        assert reply["text"]
        assert host.state.pid not in (None, pid)
    finally:
        host.stop()


def test_missing_device_everywhere_fails_load(model_path: Path) -> None:
    host = host_for(model_path, ["NPU"])
    try:
        with pytest.raises(LoadFailed, match="NPU: not available"):
            host.ensure_loaded()
        assert host.state.state == "failed"
    finally:
        host.stop()


def test_host_exits_when_parent_closes_pipe(model_path: Path) -> None:
    host = host_for(model_path, ["CPU"])
    host.ensure_loaded()
    pid = host.state.pid
    host.stop(timeout=5)
    assert pid is not None
    wait_for(lambda: not os.path.exists(f"/proc/{pid}"), 5, "the host process to exit")


def test_split_pieces_keeps_all_words() -> None:
    text = "First sentence. Second one!\n\nNew paragraph? Yes.\n\n\n"
    pieces = split_pieces(text)
    assert pieces == ["First sentence.", "Second one!", "New paragraph?", "Yes."]


def test_long_text_chunks_fit_budget(host: ModelHost) -> None:
    text = (CORPUS / "documents" / "lorem-ipsum.txt").read_text() * 3
    budget = Budget(max_prompt_tokens=400, max_new_tokens=20, repetition_penalty=1.1,
                    timeout_s=60)
    summarizer = Summarizer(host, budget)
    chunks = summarizer.chunk(text, DEFAULT_PROMPTS.chunk)
    assert len(chunks) > 3
    counts = host.count_tokens([messages_for(DEFAULT_PROMPTS.chunk, c) for c in chunks])
    assert max(counts) <= 400
    assert " ".join(" ".join(chunks).split()) == " ".join(text.split())


def test_unbreakable_word_is_cut_to_fit(host: ModelHost) -> None:
    budget = Budget(max_prompt_tokens=300, max_new_tokens=20, repetition_penalty=1.1,
                    timeout_s=60)
    chunks = Summarizer(host, budget).chunk("x" * 5000, DEFAULT_PROMPTS.chunk)
    assert "".join(chunks) == "x" * 5000
    counts = host.count_tokens([messages_for(DEFAULT_PROMPTS.chunk, c) for c in chunks])
    assert max(counts) <= 300


def test_long_text_summary_combines_chunks(host: ModelHost) -> None:
    steps: list[tuple[int, int]] = []
    budget = Budget(max_prompt_tokens=500, max_new_tokens=40, repetition_penalty=1.1,
                    timeout_s=60)
    text = (CORPUS / "documents" / "crazy-ones.txt").read_text() * 4
    result = Summarizer(host, budget, lambda d, t: steps.append((d, t))).summarize(text)
    assert result.chunks >= 2
    assert result.text.strip()
    assert steps[-1][0] == result.chunks  # the combine step was reported
    assert result.generated_tokens > 0


def test_budget_smaller_than_template_rejected(host: ModelHost) -> None:
    budget = Budget(max_prompt_tokens=40, max_new_tokens=20, repetition_penalty=1.1,
                    timeout_s=60)
    with pytest.raises(ValueError, match="raise model.max_prompt_tokens"):
        Summarizer(host, budget).chunk("some text", DEFAULT_PROMPTS.chunk)
