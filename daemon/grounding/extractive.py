"""Extractive summaries: the source's most central sentences, chosen without the model.

This is the fallback when the model's summary names facts that the source lacks. Every
sentence comes from the source unchanged, so the result cannot invent anything.
"""

from __future__ import annotations

import math
import re
from collections import Counter

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'“(\[]?[A-Z0-9])")
_ABBREVIATION = re.compile(
    r"(?:\b(?:e\.g|i\.e|vs|etc|cf|al|fig|figs|no|nos|vol|pp|mr|mrs|ms|dr|prof|st|approx|"
    r"jan|feb|mar|apr|jun|jul|aug|sep|sept|oct|nov|dec)|\b[A-Z])\.$", re.IGNORECASE)
_WORD = re.compile(r"[^\W\d_]{3,}", re.UNICODE)

# Function words carry no topic; without this list they would dominate every score.
_STOPWORDS = frozenset("""
about above after again against all also among and any are because been before being
below between both but can could did does doing down during each few for from further had
has have having her here hers herself him himself his how into its itself just more most
much must not now off once only other our ours out over own same she should some such than
that the their theirs them then there these they this those through too under until upon
very was were what when where which while who whom why will with would you your yours
""".split())

MIN_CHARS = 30
MAX_CHARS = 400


def source_sentences(text: str) -> list[str]:
    """Split text into sentences, keeping those long enough and mostly made of words."""
    sentences = []
    seen: Counter[str] = Counter()
    # A word hyphenated across a line break ("dan-\ngerous") is joined again.
    text = re.sub(r"(?<=[^\W\d_])-\n(?=[^\W\d_])", "", _without_running_lines(text))
    for block in _blocks(text):
        flat = " ".join(block.split())
        for sentence in _split_sentences(flat):
            if not MIN_CHARS <= len(sentence) <= MAX_CHARS:
                continue
            letters = sum(ch.isalpha() for ch in sentence)
            # Table rows, page numbers and OCR debris score well on frequency but read badly.
            if letters < 0.6 * len(sentence):
                continue
            sentences.append(sentence)
            seen[_shape(sentence)] += 1
    # Repeated sentences (boilerplate) are not central content: drop every copy.
    return [s for s in sentences if seen[_shape(s)] == 1]


def _blocks(text: str) -> list[str]:
    """Split text at blank lines and after heading-like lines.

    A short line without closing punctuation followed by a capitalized line is a heading
    or a title, and would otherwise be glued to the next sentence.
    """
    blocks: list[str] = []
    current: list[str] = []
    lines = text.splitlines()
    for index, line in enumerate(lines):
        stripped = line.strip()
        if stripped:
            current.append(stripped)
        following = lines[index + 1].strip() if index + 1 < len(lines) else ""
        heading = (stripped and len(stripped) < 60 and stripped[-1] not in ".,;:-"
                   and following[:1].isupper())
        if (not stripped or heading) and current:
            blocks.append(" ".join(current))
            current = []
    if current:
        blocks.append(" ".join(current))
    return blocks


def _split_sentences(flat: str) -> list[str]:
    """Split a paragraph at sentence ends, but not after common abbreviations."""
    sentences: list[str] = []
    for piece in _SENTENCE_END.split(flat):
        piece = piece.strip()
        if sentences and _ABBREVIATION.search(sentences[-1]):
            sentences[-1] = f"{sentences[-1]} {piece}"
        elif piece:
            sentences.append(piece)
    return sentences


def _without_running_lines(text: str) -> str:
    """Remove page headers and footers: short lines that recur with only numbers changed."""
    lines = text.splitlines()
    counts = Counter(_shape(line.strip()) for line in lines if line.strip())
    return "\n".join(line for line in lines
                     if len(line) > 120 or counts[_shape(line.strip())] < 3)


def _shape(sentence: str) -> str:
    return re.sub(r"\d+", "#", sentence.casefold())


def _content_words(sentence: str) -> list[str]:
    return [w for w in (m.group().casefold() for m in _WORD.finditer(sentence))
            if w not in _STOPWORDS]


def extractive_summary(text: str, max_sentences: int = 3) -> str:
    """Return up to `max_sentences` central sentences of `text`, in their original order.

    A sentence's score is the mean document frequency of its content words, so sentences
    about the document's main topics win. A small bonus favours early sentences, because
    documents usually state their subject first. A text without qualifying sentences gives
    its first `MAX_CHARS` characters, cut at a space.
    """
    sentences = source_sentences(text)
    if not sentences:
        # Too short or too fragmentary for sentences: the start of the text itself.
        flat = " ".join(text.split())
        return flat if len(flat) <= MAX_CHARS else flat[:MAX_CHARS].rsplit(" ", 1)[0]
    words_per_sentence = [_content_words(s) for s in sentences]
    frequency = Counter(w for words in words_per_sentence for w in set(words))
    scored = []
    for index, words in enumerate(words_per_sentence):
        if not words:
            continue
        centrality = sum(frequency[w] for w in words) / len(words)
        position = 1.0 + 0.5 / math.sqrt(index + 1)
        # Lines without closing punctuation are mostly headings and table rows, which name
        # topics but state little about them.
        form = 1.0 if sentences[index][-1] in ".!?" else 0.4
        scored.append((centrality * position * form, index))
    chosen = sorted(index for _, index in sorted(scored, reverse=True)[:max_sentences])
    # A sentence without closing punctuation (a title) ends its line, so that it does not
    # run into the next sentence.
    return "".join(sentences[i] + (" " if sentences[i][-1] in ".!?" else "\n")
                   for i in chosen).strip()
