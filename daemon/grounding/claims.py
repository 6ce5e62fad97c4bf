"""Claim extraction from a summary and the lookup of each claim in its source text."""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass
from decimal import Decimal

from famulus.daemon.grounding.normalize import (
    CURRENCY_CODES,
    NUMBER_FORM,
    Reading,
    blank_spans,
    find_dates,
    find_quantities,
    numeric_view,
    phrase_key,
)


@dataclass(frozen=True)
class Claim:
    """A checkable statement in a summary: a number, date, name or quote."""

    kind: str
    """One of "number", "date", "name", "quote"."""
    text: str
    """The claim exactly as written, equal to summary[start:end]."""
    sentence: int
    """Index into split_sentences(summary) of the sentence that contains the claim."""
    start: int
    end: int


@dataclass(frozen=True)
class GroundingReport:
    """The claims found in a summary and those the source does not support."""

    claims: tuple[Claim, ...]
    unsupported: tuple[Claim, ...]

    @property
    def grounded(self) -> bool:
        """True when the source supports every claim."""
        return not self.unsupported


# Capitalized words that start sentences, label summaries, head Markdown sections or are
# titles before a name. A name run loses these from its front, so "The" and "**Summary**:"
# are never claims and "Director Anna Kowalczyk" claims "Anna Kowalczyk".
_COMMON_WORDS = frozenset(
    """
    a an the this that these those it its in on at of for from to with without by as into
    onto about after before during while when where what which who whom whose why how if
    although though because since despite unless until and but or nor so yet then thus
    therefore hence however additionally furthermore moreover also finally first firstly
    second secondly third next last lastly overall meanwhile instead still here there both
    each every all any some many most several few other another such only just even no not
    yes please thanks thank sure certainly note notes i he she they we you his her their our
    your my me him them us one two three is are was were be been has have had do does did can
    could will would should may might must let today now currently recently importantly
    notably specifically generally typically summary summaries summarized overview
    conclusion conclusions introduction background context document text article report
    paper passage content key points point main highlights takeaways takeaway details
    findings results purpose goal goals objective section chapter page table figure title
    topic author authors date total location name description example below above following
    based according dear hello hi okay ok
    mr mrs ms dr prof sir professor director president ceo mayor senator governor minister
    chairman chair head chief manager officer secretary spokesperson founder editor
    """.split()
)
_MONTH_AND_DAY_NAMES = frozenset(
    """
    january february march april may june july august september october november december
    jan feb mar apr jun jul aug sep sept oct nov dec monday tuesday wednesday thursday
    friday saturday sunday
    """.split()
)
# Lowercase words that may join capitalized words into one name ("Bank of America").
_PARTICLES = frozenset("of de da di do dos das du van von der den la le les del della y".split())
# Words after which a period does not end a sentence.
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof sr jr st vs etc inc ltd co corp no fig approx jan feb mar apr jun jul"
    " aug sep sept oct nov dec".split()
)

_LINE = re.compile(r"[^\n\r\v\f\x1c-\x1e\x85\u2028\u2029]+")
_LINE_BREAKS = re.compile(r"[\n\r\v\f\x1c-\x1e\x85\u2028\u2029]")
# Headings, block quotes, bullets and list numbers at the start of a line ("1. ", "- ", "# ").
_LINE_MARKERS = re.compile(r"(?:[ \t]*(?:#{1,6}|>|[-*+•‣◦▪●]|[0-9]{1,3}[.)])[ \t]+)*")
_BULLET = re.compile(r"[•‣◦▪●]")
_SENTENCE_END = re.compile(r"[.!?…]+[\"'”’)\]]*(?=\s|$)")
_TRAILING_LETTERS = re.compile(r"[^\W\d_]+$")
# Soft hyphens and zero-width characters sit inside words in PDF text, and normalization
# drops them, so they do not end a word here.
_INVISIBLE = "\u00ad\u200b\u200c\u200d\u2060\ufeff"
_WORD = re.compile(rf"[^\W_](?:[^\W_]|[{_INVISIBLE}])*(?:['’\-][^\W_](?:[^\W_]|[{_INVISIBLE}])*)*")
# What may separate two words of one name: spaces, or an ampersand ("AT&T", "Procter & Gamble").
_NAME_GAP = re.compile(r"[ \t\u00a0]+|[ \t\u00a0]*&[ \t\u00a0]*")
_QUOTED = re.compile(
    r'"(?P<straight>[^"\n]{1,1000}?)"'
    r"|“(?P<curly>[^“”\n]{1,1000}?)”"
    r"|„(?P<low>[^„“”\n]{1,1000}?)[“”]"
    r"|(?<![^\W_])['‘](?P<single>[^'‘’\n]{1,1000}?)['’](?![^\W_])"
)


def split_sentences(text: str) -> list[tuple[int, int]]:
    """Return (start, end) spans of the sentences in text, without surrounding whitespace.

    Line breaks and bullets ("•") always end a sentence. Heading marks, bullets and list
    numbers at the start of a line belong to no sentence.
    """
    spans: list[tuple[int, int]] = []
    for line in _LINE.finditer(text):
        start = _LINE_MARKERS.match(text, line.start(), line.end())
        cursor = start.end() if start else line.start()
        for bullet in _BULLET.finditer(text, cursor, line.end()):
            spans.extend(_split_segment(text, cursor, bullet.start()))
            cursor = bullet.end()
        spans.extend(_split_segment(text, cursor, line.end()))
    return spans


def _split_segment(text: str, start: int, end: int) -> list[tuple[int, int]]:
    spans: list[tuple[int, int]] = []
    cursor = start
    for match in _SENTENCE_END.finditer(text, start, end):
        if _ends_sentence(text, match, end):
            spans.append((cursor, match.end()))
            cursor = match.end()
    spans.append((cursor, end))
    return [span for span in (_strip_span(text, *span) for span in spans) if span[0] < span[1]]


def _ends_sentence(text: str, match: re.Match[str], end: int) -> bool:
    if match.group() == ".":
        word = _TRAILING_LETTERS.search(text, max(match.start() - 20, 0), match.start())
        # "Dr. Smith", "U.S. law" and "e.g. this" continue the sentence.
        if word and (len(word.group()) == 1 or word.group().casefold() in _ABBREVIATIONS):
            return False
    rest = text[match.end() : end].lstrip()
    return not (rest and rest[0].islower())


def _strip_span(text: str, start: int, end: int) -> tuple[int, int]:
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def extract_claims(summary: str) -> list[Claim]:
    """Extract the numbers, dates, names and quotes of a summary, in order of position."""
    sentences = split_sentences(summary)
    claims: list[Claim] = []
    for index, (start, end) in enumerate(sentences):
        claims.extend(_sentence_claims(summary[start:end], start, index))
    claims.extend(_quote_claims(summary, sentences))
    claims.sort(key=lambda claim: (claim.start, claim.end, claim.kind))
    return claims


def _sentence_claims(sentence: str, offset: int, index: int) -> list[Claim]:
    # Superscripts and other number forms (footnote marks) are blanked, one space each so
    # that offsets stay valid: "¹1,000" claims 1,000, as the source side reads it.
    plain = NUMBER_FORM.sub(" ", sentence)
    dates = find_dates(plain)
    date_spans = [(date.start, date.end) for date in dates]
    quantities = find_quantities(blank_spans(plain, date_spans))
    claims = [Claim("date", sentence[s:e], index, offset + s, offset + e) for s, e in date_spans]
    for quantity in quantities:
        if quantity.spelled and not (quantity.scaled or quantity.percent):
            continue  # "three" and "second" are too common in prose to check
        kind = "number" if quantity.year is None else "date"
        start, end = quantity.start, quantity.end
        claims.append(Claim(kind, sentence[start:end], index, offset + start, offset + end))
    blocked = bytearray(len(sentence))
    for start, end in date_spans + [(q.start, q.end) for q in quantities]:
        blocked[start:end] = b"\x01" * (end - start)
    for run in _name_runs(sentence, blocked):
        claim = _name_claim(sentence, run, offset, index)
        if claim is not None:
            claims.append(claim)
    return claims


def _name_runs(sentence: str, blocked: bytearray) -> list[list[tuple[int, int]]]:
    """Group the capitalized words of a sentence into runs, each a list of word spans.

    A run continues over spaces, "&" and lowercase particles that sit between two
    capitalized words. A possessive ends the run and its "'s" is left out.
    """
    runs: list[list[tuple[int, int]]] = []
    current: list[tuple[int, int]] = []
    particles: list[tuple[int, int]] = []
    previous_end = 0
    for match in _WORD.finditer(sentence):
        start, end = match.span()
        word = match.group()
        possessive = len(word) > 2 and word[-2] in "'’" and word[-1] in "sS"
        if possessive:
            end -= 2
            word = word[:-2]
        joined = bool(current) and _NAME_GAP.fullmatch(sentence, previous_end, start) is not None
        # Only a word that starts inside a number or date belongs to it ("USD" in "42 USD"),
        # so "GPT-4" stays a name although its "4" is also a number claim.
        kind = "other" if blocked[start] else _word_kind(word)
        if kind == "name" and joined:
            current.extend(particles)
            current.append((start, end))
        elif kind == "name":
            runs.append(current)
            current = [(start, end)]
        elif kind == "particle" and joined:
            particles.append((start, end))
            previous_end = end
            continue
        else:
            runs.append(current)
            current = []
        particles = []
        previous_end = end
        if possessive:
            runs.append(current)
            current = []
    runs.append(current)
    return [run for run in runs if run]


def _word_kind(word: str) -> str:
    """Classify a word as "name", "particle" or "other"."""
    if not word[0].isalpha():
        return "other"  # numbers and words that start with a digit ("3D") are not names
    folded = word.casefold()
    if word.islower() and folded in _PARTICLES:
        return "particle"
    if folded in _MONTH_AND_DAY_NAMES or word in CURRENCY_CODES:
        return "other"  # months belong to date claims and currencies are not compared
    if word[0].isupper() or _has_internal_capital(word):
        return "name"
    return "other"


def _has_internal_capital(word: str) -> bool:
    """Return whether word mixes cases after its first letter, as in "AutoGen" or "iPhone"."""
    return any(char.isupper() for char in word[1:]) and any(char.islower() for char in word)


def _is_all_caps(word: str) -> bool:
    letters = [char for char in word if char.isalpha()]
    return len(letters) >= 2 and all(char.isupper() for char in letters)


def _is_distinctive(word: str) -> bool:
    """Return whether a word is a name even at the start of a sentence: "NASA", "iPhone", "A100"."""
    return _is_all_caps(word) or _has_internal_capital(word) or any(c.isdigit() for c in word)


def _name_claim(sentence: str, run: list[tuple[int, int]], offset: int, index: int) -> Claim | None:
    """Turn a run into a name claim, or None when nothing in it is a name.

    Common words at the front of the run are dropped ("The Lincoln School" claims
    "Lincoln School"). A single ordinary capitalized word that starts the sentence
    is only capitalized because it starts the sentence, so it is not a claim.
    """
    first_word = _WORD.search(sentence)
    starts_sentence = first_word is not None and first_word.start() == run[0][0]
    first_start, first_end = run[0]
    if starts_sentence and len(run) == 1 and not _is_distinctive(sentence[first_start:first_end]):
        return None
    words = [sentence[start:end] for start, end in run]
    shouted = len(run) > 1 and all(_is_all_caps(word) for word in words)
    remaining = list(run)
    while remaining and _is_droppable(sentence[remaining[0][0] : remaining[0][1]], shouted):
        remaining.pop(0)
    if not remaining:
        return None
    start, end = remaining[0][0], remaining[-1][1]
    if len(remaining) == 1 and end - start == 1:
        return None  # initials such as the "J" of "J. Smith"
    return Claim("name", sentence[start:end], index, offset + start, offset + end)


def _is_droppable(word: str, shouted: bool) -> bool:
    """Return whether a word at the front of a run is a common word rather than part of a name.

    An all-caps common word is an acronym ("WHO", "AT&T", "IT") unless the whole run is in
    capitals, as in a heading such as "KEY POINTS".
    """
    folded = word.casefold()
    if folded in _PARTICLES:
        return True
    return folded in _COMMON_WORDS and (shouted or not _is_all_caps(word))


def _quote_claims(summary: str, sentences: list[tuple[int, int]]) -> list[Claim]:
    """Extract quoted passages of two or more words; the quote marks are not part of the claim."""
    starts = [start for start, _ in sentences]
    claims: list[Claim] = []
    for match in _QUOTED.finditer(summary):
        group = next(name for name, value in match.groupdict().items() if value is not None)
        start, end = match.span(group)
        if len(phrase_key(match[group]).split()) < 2:
            continue  # one quoted word is usually a term or a scare quote
        index = max(bisect.bisect_right(starts, start) - 1, 0)
        claims.append(Claim("quote", match[group], index, start, end))
    return claims


class SourceIndex:
    """Normalized view of one source text, built once and queried per claim."""

    def __init__(self, source: str) -> None:
        # The text is kept with hyphenated line breaks joined ("Missis-\nsippi") and, after a
        # "|" that no key contains, split, as a summary sentence that ends at "Missis-" has it.
        self._phrases = f" {phrase_key(source)} | {phrase_key(source, join_hyphenated=False)} "
        self._amounts: set[Decimal] = set()
        self._percents: set[Decimal] = set()
        self._readings: set[Reading] = set()
        # Days and years of the source's dates: a summary can quote one as a bare number when
        # it does not read as a date there ("March 2¹" with a footnote mark).
        self._date_parts: set[Decimal] = set()
        joined = numeric_view(source)
        # A number or date wrapped across lines ("March\n3, 2024") is read both whole and as
        # the separate pieces that a summary sentence, which never spans lines, would quote.
        for text in (joined, _LINE_BREAKS.sub("\x00", joined)):
            self._add_numbers(text)

    def _add_numbers(self, text: str) -> None:
        dates = find_dates(text)
        quantities = find_quantities(blank_spans(text, [(d.start, d.end) for d in dates]))
        for quantity in quantities:
            (self._percents if quantity.percent else self._amounts).update(quantity.values)
        for date in dates:
            for year, month, day in date.readings:
                # Store every coarser reading too, so a lookup at any precision is one set test.
                self._readings.update({(year, month, day), (year, month, None), (None, month, day)})
                self._readings.add((year, None, None))
                self._date_parts.update(Decimal(part) for part in (year, day) if part is not None)

    def supports(self, claim: Claim) -> bool:
        """Return whether the source contains evidence for the claim."""
        if claim.kind in ("number", "date"):
            # Read as extract_claims read it, with footnote marks blanked: "USD¹0" is USD 0.
            plain = NUMBER_FORM.sub(" ", claim.text)
            return self._has_number(plain) if claim.kind == "number" else self._has_date(plain)
        return self._has_phrase(claim.text)

    def _has_phrase(self, text: str) -> bool:
        # NOTE: the whole run must occur, so a capitalized noun the model adds ("Westbrook
        # Library" for "Westbrook public library") makes the claim unsupported.
        key = phrase_key(text)
        # A claim with no letters or digits states nothing the source could contradict.
        return not key or f" {key} " in self._phrases

    def _has_number(self, text: str) -> bool:
        quantities = find_quantities(text)
        if not quantities:
            return False
        quantity = quantities[0]
        # A percentage needs a percentage. A plain number or an amount of money may match
        # either. Currencies are not compared, because a value match is evidence enough.
        if quantity.percent:
            return not self._percents.isdisjoint(quantity.values)
        return not (
            self._amounts.isdisjoint(quantity.values)
            and self._percents.isdisjoint(quantity.values)
            and self._date_parts.isdisjoint(quantity.values)
        )

    def _has_date(self, text: str) -> bool:
        dates = find_dates(text)
        if dates:
            readings = dates[0].readings
        else:
            quantities = find_quantities(text)
            year = quantities[0].year if quantities else None
            if year is None:
                return False
            readings = frozenset({(year, None, None)})
        for reading in readings:
            if reading in self._readings:
                return True
            year, month, _ = reading
            if month is None and year is not None and Decimal(year) in self._amounts:
                return True  # a bare year matches the same number anywhere in the source
        return False


def check(summary: str, source: str | SourceIndex) -> GroundingReport:
    """Extract the claims of a summary and look each one up in the source.

    Pass a SourceIndex to check several summaries against one source without
    normalizing the source again.
    """
    index = source if isinstance(source, SourceIndex) else SourceIndex(source)
    claims = tuple(extract_claims(summary))
    unsupported = tuple(claim for claim in claims if not index.supports(claim))
    return GroundingReport(claims, unsupported)
