"""Output hygiene: leaked template tokens are trimmed; empty or looping output is retried once
with other settings, then rejected with the reason."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from famulus.daemon.model.hygiene import clean, degenerate
from famulus.daemon.model.summarize import (
    RETRY_MIN_PENALTY,
    RETRY_NGRAM,
    DegenerateOutput,
    generate_clean,
)


@pytest.mark.parametrize("raw, expected", [
    ("The plan is ready.<|im_end|>\n<|im_start|>user\nThanks", "The plan is ready."),
    ("assistant\nThe plan is ready.", "The plan is ready."),
    ("Assistant: The plan is ready. [INST] more [/INST]", "The plan is ready."),
    ("The plan is ready.</s>", "The plan is ready."),
    ("<|eot_id|>", ""),
    ("Summary of the assistant's role: it helps.", "Summary of the assistant's role: it helps."),
])
def test_clean_trims_leaked_markers(raw: str, expected: str) -> None:
    assert clean(raw) == expected


@pytest.mark.parametrize("text, reason", [
    ("", "empty"),
    ("  \n ", "empty"),
    ("... !!! ---", "no words"),
    ("The report is late. The report is late. The report is late.", "repeated one sentence"),
    ("the " * 40, "looped"),
])
def test_degenerate_output_is_named(text: str, reason: str) -> None:
    found = degenerate(text)
    assert found is not None
    assert reason in found


def test_ordinary_summary_is_not_degenerate() -> None:
    text = ("The depot counted 35 parcels on Monday and 25 on Tuesday. The manager asked for "
            "a second van. Deliveries resumed after the storm.")
    assert degenerate(text) is None


class ScriptedModel:
    """Returns the given texts in turn and records the settings of each call."""

    def __init__(self, *texts: str) -> None:
        self.texts = list(texts)
        self.calls: list[dict[str, Any]] = []

    def count_tokens(self, prompts: list[list[dict[str, str]]]) -> list[int]:
        return [sum(len(m["content"].split()) for m in p) for p in prompts]

    def generate(self, messages: list[dict[str, str]], *, max_new_tokens: int,
                 repetition_penalty: float, timeout_s: float,
                 on_token: Callable[[str], None] | None = None,
                 no_repeat_ngram_size: int = 0) -> dict[str, Any]:
        self.calls.append({"repetition_penalty": repetition_penalty,
                           "no_repeat_ngram_size": no_repeat_ngram_size})
        return {"text": self.texts.pop(0), "tokens": 5, "generation_s": 0.1}


def run(model: ScriptedModel) -> tuple[str, list[dict[str, Any]]]:
    return generate_clean(model, [{"role": "user", "content": "x"}], max_new_tokens=32,
                          repetition_penalty=1.1, timeout_s=10)


def test_degenerate_output_is_retried_with_other_settings() -> None:
    model = ScriptedModel("Go. Go. Go. Go.", "The van left at noon.<|im_end|>")
    text, replies = run(model)
    assert text == "The van left at noon."
    assert len(replies) == 2
    assert model.calls[0] == {"repetition_penalty": 1.1, "no_repeat_ngram_size": 0}
    assert model.calls[1] == {"repetition_penalty": RETRY_MIN_PENALTY,
                              "no_repeat_ngram_size": RETRY_NGRAM}


def test_second_degenerate_output_fails_with_both_reasons() -> None:
    model = ScriptedModel("", "Go. Go. Go.")
    with pytest.raises(DegenerateOutput) as failure:
        run(model)
    assert "empty text" in str(failure.value)
    assert "repeated one sentence 3 times" in str(failure.value)


def test_good_output_is_generated_once() -> None:
    model = ScriptedModel("The van left at noon.")
    assert run(model)[0] == "The van left at noon."
    assert len(model.calls) == 1
