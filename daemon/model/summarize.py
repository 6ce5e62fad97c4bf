"""Summaries within a token budget: prompts, chunking and the combine step.

A document that does not fit in one prompt is split into chunks that do (chat template
included), each chunk is summarized, and the partial summaries are combined, in rounds when
even they do not fit. Token counts come from the model's own tokenizer in the host.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from famulus.daemon.model.hygiene import clean, degenerate

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prompts:
    """One set of prompts: the system message and the chunk and combine requests."""

    system: str
    chunk: str
    combine: str


DEFAULT_PROMPTS = Prompts(
    system="You write short, factual summaries of documents. Use only facts stated in the "
    "text. Do not add names, numbers, dates or claims that the text does not contain.",
    chunk="Summarize the following text in 3 to 5 sentences.\n\nText:\n{text}",
    combine="These are summaries of consecutive parts of one document. Combine them into one "
    "summary of 3 to 5 sentences.\n\nSummaries:\n{text}",
)

# Used for the second attempt when the first summary named facts the source lacks.
STRICT_PROMPTS = Prompts(
    system="You summarize documents. Copy every name, number and date exactly as it is "
    "written in the text. Leave out any detail you are not sure of. Never add facts.",
    chunk="Summarize the text below in 2 or 3 short sentences. Mention only names, numbers "
    "and dates that appear in the text.\n\nText:\n{text}",
    combine="These are summaries of consecutive parts of one document. Combine them into one "
    "summary of 2 or 3 short sentences, keeping names, numbers and dates exactly as they "
    "are.\n\nSummaries:\n{text}",
)

_PARAGRAPHS = re.compile(r"\n\s*\n")
_SENTENCES = re.compile(r"(?<=[.!?])\s+")


class EmptySummary(Exception):
    """The model returned empty or whitespace-only text."""


class DegenerateOutput(EmptySummary):
    """The output was empty or degenerate, and so was the retry with different settings."""


class Model(Protocol):
    def count_tokens(self, prompts: list[list[dict[str, str]]]) -> list[int]: ...

    def generate(self, messages: list[dict[str, str]], *, max_new_tokens: int,
                 repetition_penalty: float, timeout_s: float,
                 on_token: Callable[[str], None] | None = None,
                 no_repeat_ngram_size: int = 0) -> dict[str, Any]: ...


# Settings of the second attempt after degenerate output: a stronger repetition penalty and
# no repeated word triple, which break the loops small models fall into.
RETRY_MIN_PENALTY = 1.3
RETRY_NGRAM = 3


def generate_clean(model: Model, messages: list[dict[str, str]], *, max_new_tokens: int,
                   repetition_penalty: float, timeout_s: float,
                   on_token: Callable[[str], None] | None = None
                   ) -> tuple[str, list[dict[str, Any]]]:
    """Generate, trim leaked template tokens, and retry once when the output is degenerate.

    Returns the text and every reply (for token counts). Raises DegenerateOutput with both
    reasons when the retry is degenerate too.
    """
    reply = model.generate(messages, max_new_tokens=max_new_tokens,
                           repetition_penalty=repetition_penalty, timeout_s=timeout_s,
                           on_token=on_token)
    text = clean(str(reply["text"]))
    reason = degenerate(text)
    if reason is None:
        return text, [reply]
    penalty = max(RETRY_MIN_PENALTY, repetition_penalty + 0.2)
    logger.info("model output rejected (%s); generating once more with repetition_penalty=%.2f "
                "and no_repeat_ngram_size=%d", reason, penalty, RETRY_NGRAM)
    retry = model.generate(messages, max_new_tokens=max_new_tokens,
                           repetition_penalty=penalty, timeout_s=timeout_s,
                           on_token=on_token, no_repeat_ngram_size=RETRY_NGRAM)
    text = clean(str(retry["text"]))
    second = degenerate(text)
    if second is not None:
        raise DegenerateOutput(f"{reason}; again with repetition_penalty={penalty:.2f} and "
                               f"no_repeat_ngram_size={RETRY_NGRAM}: {second}")
    return text, [reply, retry]


@dataclass(frozen=True)
class Budget:
    max_prompt_tokens: int
    max_new_tokens: int
    repetition_penalty: float
    timeout_s: float


@dataclass
class SummaryResult:
    text: str
    chunks: int
    prompt_tokens: int = 0
    generated_tokens: int = 0
    generation_s: float = 0.0
    steps: list[str] = field(default_factory=list)


def messages_for(template: str, text: str, system: str = DEFAULT_PROMPTS.system
                 ) -> list[dict[str, str]]:
    return [{"role": "system", "content": system},
            {"role": "user", "content": template.format(text=text)}]


def split_pieces(text: str) -> list[str]:
    """Split text into paragraphs, and paragraphs into sentences, keeping every character."""
    pieces: list[str] = []
    for paragraph in _PARAGRAPHS.split(text):
        paragraph = paragraph.strip()
        if paragraph:
            pieces.extend(s for s in _SENTENCES.split(paragraph) if s)
    return pieces


class Summarizer:
    """Summarizes text of any length with one model and one budget."""

    def __init__(self, model: Model, budget: Budget,
                 progress: Callable[[int, int], None] | None = None,
                 prompts: Prompts = DEFAULT_PROMPTS,
                 on_token: Callable[[str], None] | None = None) -> None:
        self.model = model
        self.on_token = on_token
        self.budget = budget
        self.progress = progress or (lambda done, total: None)
        self.prompts = prompts

    def summarize(self, text: str) -> SummaryResult:
        chunks = self.chunk(text, self.prompts.chunk)
        result = SummaryResult(text="", chunks=len(chunks))
        partials = []
        for index, chunk in enumerate(chunks):
            self.progress(index, len(chunks) + (1 if len(chunks) > 1 else 0))
            partials.append(self._generate(self.prompts.chunk, chunk, result))
        while len(partials) > 1:
            self.progress(len(chunks), len(chunks) + 1)
            groups = self.chunk("\n\n".join(partials), self.prompts.combine)
            if len(groups) >= len(partials):
                # Each partial summary alone fills the budget; combining cannot shrink them.
                groups = ["\n\n".join(partials)[: self._chars_hint()]]
            partials = [self._generate(self.prompts.combine, g, result) for g in groups]
        result.text = partials[0]
        return result

    def _chars_hint(self) -> int:
        # A rough cut used only in the degenerate case above: 3 characters per token.
        return self.budget.max_prompt_tokens * 3

    def _generate(self, template: str, text: str, result: SummaryResult) -> str:
        messages = messages_for(template, text, self.prompts.system)
        out, replies = generate_clean(self.model, messages,
                                      max_new_tokens=self.budget.max_new_tokens,
                                      repetition_penalty=self.budget.repetition_penalty,
                                      timeout_s=self.budget.timeout_s, on_token=self.on_token)
        for reply in replies:
            result.steps.append(str(reply.get("finish", "")))
            result.generated_tokens += int(reply.get("tokens", 0))
            result.generation_s += float(reply.get("generation_s", 0.0))
        return out

    def chunk(self, text: str, template: str) -> list[str]:
        """Pack pieces of `text` greedily into chunks whose prompts fit the budget."""
        overhead = self.model.count_tokens([messages_for(template, "", self.prompts.system)])[0]
        room = self.budget.max_prompt_tokens - overhead
        if room < 32:
            raise ValueError(f"max_prompt_tokens={self.budget.max_prompt_tokens} leaves "
                             f"{room} tokens for text after the prompt template "
                             f"({overhead} tokens); raise model.max_prompt_tokens")
        chunks: list[str] = []
        current: list[str] = []
        used = 0
        for piece, n in self._fit_pieces(split_pieces(text), room):
            # +1 token per separator between pieces is a safe over-estimate.
            if current and used + n + 1 > room:
                chunks.append("\n".join(current))
                current, used = [], 0
            current.append(piece)
            used += n + 1
        if current:
            chunks.append("\n".join(current))
        return chunks

    def _counts(self, pieces: list[str]) -> list[int]:
        if not pieces:
            return []
        # Counting bare text through a one-message prompt, minus that prompt's own size.
        base = self.model.count_tokens([[{"role": "user", "content": ""}]])[0]
        counts = self.model.count_tokens([[{"role": "user", "content": p}] for p in pieces])
        return [max(1, n - base) for n in counts]

    def _fit_pieces(self, pieces: list[str], room: int) -> list[tuple[str, int]]:
        """Count the pieces in one batch, splitting any longer than `room` tokens until all fit."""
        out: list[tuple[str, int]] = []
        for piece, n in zip(pieces, self._counts(pieces), strict=True):
            if n <= room:
                out.append((piece, n))
                continue
            words = piece.split()
            if len(words) > 1:
                half = len(words) // 2
                halves = [" ".join(words[:half]), " ".join(words[half:])]
            else:
                # One "word" longer than the budget (a URL, base64): cut by characters.
                cut = max(1, len(piece) * room // n)
                halves = [piece[:cut], piece[cut:]]
            out.extend(self._fit_pieces(halves, room))
        return out
