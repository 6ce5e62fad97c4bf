"""Grounding checks: find the claims of a generated summary that its source does not support.

The local summarization model writes fluent text that can invent names, numbers and dates.
`check(summary, source)` extracts each checkable claim (number, date, name, quote) from the
summary and looks it up in a normalized view of the source, so that format differences
("$42M" and "42,000,000", "Zürich" and "Zurich") do not count as unsupported.
"""

from famulus.daemon.grounding.claims import (
    Claim,
    GroundingReport,
    SourceIndex,
    check,
    extract_claims,
    split_sentences,
)
from famulus.daemon.grounding.normalize import normalize_text

__all__ = [
    "Claim",
    "GroundingReport",
    "SourceIndex",
    "check",
    "extract_claims",
    "normalize_text",
    "split_sentences",
]
