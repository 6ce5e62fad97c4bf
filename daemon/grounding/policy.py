"""The grounding policy: the handling of a summary that names facts its source lacks.

Every summary is checked claim by claim against the source. When a claim is unsupported,
the summary is generated once more with stricter prompts (decoding is greedy on both
attempts). If claims are still unsupported, the configured action applies: drop the
sentences that carry them, or replace the summary with an extractive one. The outcome
records which path was taken and every unsupported claim seen on the way.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from famulus.daemon.grounding.claims import Claim, SourceIndex, check, split_sentences
from famulus.daemon.grounding.extractive import extractive_summary

logger = logging.getLogger(__name__)


class GroundingPath(enum.StrEnum):
    """The path by which the stored summary came about."""

    OFF = "off"  # checking is disabled in the config
    GROUNDED = "grounded"  # the first summary had no unsupported claim
    RETRIED = "retried"  # the stricter second attempt had none
    DROPPED_SENTENCES = "dropped_sentences"  # sentences with unsupported claims were removed
    EXTRACTIVE = "extractive"  # replaced by sentences taken from the source
    NOT_APPLICABLE = "not_applicable"  # an image description: no source text to check


class Action(enum.StrEnum):
    DROP_SENTENCES = "drop_sentences"
    EXTRACTIVE = "extractive"


@dataclass
class GroundedSummary:
    text: str
    path: GroundingPath
    grounded: bool
    unsupported: list[dict[str, str]] = field(default_factory=list)
    attempts: int = 1

    def fields(self) -> dict[str, Any]:
        """Return the fields that events and job results carry."""
        return {"grounded": self.grounded, "grounding": str(self.path),
                "unsupported": self.unsupported}


def claim_record(claim: Claim) -> dict[str, str]:
    return {"kind": claim.kind, "text": claim.text}


def drop_sentences(summary: str, claims: tuple[Claim, ...]) -> str:
    """Remove every sentence of `summary` that carries one of `claims`."""
    bad = {c.sentence for c in claims}
    kept = [summary[start:end].strip()
            for index, (start, end) in enumerate(split_sentences(summary)) if index not in bad]
    return " ".join(s for s in kept if s)


def ground(source: str, first: str, regenerate: Callable[[], str], *, action: Action,
           retry: bool, extractive_sentences: int) -> GroundedSummary:
    """Check `first` against `source` and apply the retry and the configured action."""
    index = SourceIndex(source)
    report = check(first, index)
    if report.grounded:
        return GroundedSummary(first, GroundingPath.GROUNDED, True)
    seen = [claim_record(c) for c in report.unsupported]
    text, attempts = first, 1
    if retry:
        text, attempts = regenerate(), 2
        report = check(text, index)
        _add_new(seen, report.unsupported)
        if report.grounded:
            return GroundedSummary(text, GroundingPath.RETRIED, True, seen, attempts)
    if action is Action.DROP_SENTENCES:
        kept = drop_sentences(text, report.unsupported)
        # Dropping can leave nothing, or a claim may straddle a sentence split; then the
        # extractive summary is the safe fallback.
        if kept and check(kept, index).grounded:
            return GroundedSummary(kept, GroundingPath.DROPPED_SENTENCES, True, seen, attempts)
    extract = extractive_summary(source, extractive_sentences)
    grounded = bool(extract) and check(extract, index).grounded
    if not grounded:
        # NOTE: extractive sentences come from the source, so this needs a claim that the
        # checker cannot find in its own source text (a normalization gap).
        logger.warning("extractive summary still has unsupported claims; it is stored "
                       "marked as not grounded")
    return GroundedSummary(extract, GroundingPath.EXTRACTIVE, grounded, seen, attempts)


def _add_new(seen: list[dict[str, str]], claims: tuple[Claim, ...]) -> None:
    for claim in claims:
        record = claim_record(claim)
        if record not in seen:
            seen.append(record)


def unchecked(source: str, summary: str) -> GroundedSummary:
    """Report the claims of a summary without acting on them (checking is disabled)."""
    report = check(summary, source)
    return GroundedSummary(summary, GroundingPath.OFF, report.grounded,
                           [claim_record(c) for c in report.unsupported])
