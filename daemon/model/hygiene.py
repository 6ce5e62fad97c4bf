"""Output hygiene: trim leaked template tokens, and recognize empty or degenerate output.

Small models sometimes continue past their end-of-turn and write the next role's marker
("<|im_start|>user", "[INST]") or echo a role name at the start. Such text is cut off, not
shown. Output that is empty after trimming, or that repeats itself, is degenerate: the caller
generates once more with different settings and fails the job with the reason if that output
is degenerate too.
"""

from __future__ import annotations

import re
from collections import Counter

# Chat-template tokens of the model families famulus runs (ChatML, Llama 2/3, Mistral,
# Gemma, Phi). Everything from the first one on is dropped: it starts a new turn.
_TURN_MARKERS = re.compile(
    r"<\|im_start\|>|<\|im_end\|>|<\|endoftext\|>|<\|eot_id\|>|<\|start_header_id\|>"
    r"|<\|end_header_id\|>|<\|begin_of_text\|>|<\|end\|>|<\|user\|>|<\|assistant\|>"
    r"|<\|system\|>|<start_of_turn>|<end_of_turn>|\[/?INST\]|\[/?SYSTEM_PROMPT\]|</s>|<s>"
)
# A role name at the very start of the reply ("assistant\n", "Assistant:").
_LEADING_ROLE = re.compile(r"^\s*(?:assistant|model|system)\s*(?::|\n)\s*", re.IGNORECASE)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")
_WORD = re.compile(r"\w+")

# A sentence (normalized) seen this many times makes the output degenerate.
MAX_SENTENCE_REPEATS = 3
# With at least this many words, fewer distinct words than this share is a loop.
MIN_WORDS_FOR_RATIO = 24
MIN_DISTINCT_WORD_SHARE = 0.2


def clean(text: str) -> str:
    """Drop a leading role name and everything from the first leaked turn marker on."""
    match = _TURN_MARKERS.search(text)
    if match:
        text = text[: match.start()]
    return _LEADING_ROLE.sub("", text, count=1).strip()


def degenerate(text: str) -> str | None:
    """Return why `text` is not a usable reply, or None when it is."""
    if not text.strip():
        return "the model returned empty text"
    if not _WORD.search(text):
        return "the model returned no words"
    sentences = [" ".join(_WORD.findall(s.lower())) for s in _SENTENCE_END.split(text)]
    counts = Counter(s for s in sentences if s)
    if counts:
        sentence, times = counts.most_common(1)[0]
        if times >= MAX_SENTENCE_REPEATS:
            return f"the model repeated one sentence {times} times"
    words = _WORD.findall(text.lower())
    if len(words) >= MIN_WORDS_FOR_RATIO:
        share = len(set(words)) / len(words)
        if share < MIN_DISTINCT_WORD_SHARE:
            return (f"the model looped: {len(set(words))} distinct words in {len(words)} "
                    f"({share:.0%})")
    return None
