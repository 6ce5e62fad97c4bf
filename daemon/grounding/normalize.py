"""Text normalization and number and date parsing shared by summaries and sources.

Both sides go through the same functions, so a claim and its evidence compare equal when
they differ only in case, diacritics, quote and dash style, spacing, or the written format
of a number or date.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal

# Longer digit runs are not parsed, so input such as "9" * 400 costs nothing. Such a number
# still yields a Quantity, with no values, that nothing can support.
MAX_DIGITS = 60

Reading = tuple[int | None, int | None, int | None]
"""A date as (year, month, day), with None for each part the text leaves out."""

_PUNCTUATION = str.maketrans(
    {
        **dict.fromkeys("\u2010\u2011\u2012\u2013\u2014\u2015\u2212\ufe58\ufe63", "-"),
        **dict.fromkeys("\u2018\u2019\u201a\u201b\u2032\u2039\u203a", "'"),
        **dict.fromkeys("\u201c\u201d\u201e\u201f\u2033\u00ab\u00bb", '"'),
        # Soft hyphens and zero-width characters are common in PDF text and split words.
        **dict.fromkeys("\u00ad\u200b\u200c\u200d\u2060\ufeff", None),
    }
)
# Letters that NFD does not decompose, folded to the ASCII letters people type instead.
_UNDECOMPOSED_LETTERS = str.maketrans(
    {"ø": "o", "ł": "l", "đ": "d", "ð": "d", "ħ": "h", "ı": "i", "æ": "ae", "œ": "oe", "þ": "th"}
)
_LINE_BREAK = "(?:\r\n|[\n\r\v\f\x85\u2028\u2029])"
_HYPHENATED_BREAK = re.compile(rf"(?<=[^\W\d_])-[ \t]*{_LINE_BREAK}[ \t]*(?=[^\W\d_])")
_WHITESPACE = re.compile(r"\s+")
_EXPANDING_SYMBOL = re.compile(r"[^\x00-\x7f\w]")
_WORD_CHARACTER = re.compile(r"[^\W_]")
_NOT_ALPHANUMERIC = re.compile(r"[\W_]+")
# Spaces that group digits ("42 000 000"). NFKC would turn them into plain spaces.
_GROUP_SPACES = "\u00a0\u202f\u2009"
_GROUP_SPACE = re.compile(f"[{_GROUP_SPACES}]")
# Superscripts and subscripts, number forms, and enclosed (circled) numbers.
NUMBER_FORM = re.compile(
    "[\u00b2\u00b3\u00b9\u00bc-\u00be\u2070-\u209f\u2150-\u218f\u2460-\u24ff"
    "\u2776-\u2793\u3220-\u325f\u3280-\u32bf]"
)


def normalize_text(text: str, join_hyphenated: bool = True) -> str:
    """Normalize text for comparison: NFKC, casefold, no diacritics, one space per gap.

    Quotes and dashes become ASCII. With join_hyphenated, a word hyphenated across a line
    break is joined when the next line starts in lowercase ("Missis-\\nsippi" becomes
    "mississippi").
    """
    text = _EXPANDING_SYMBOL.sub(_space_expansion, text)
    text = unicodedata.normalize("NFKC", text).translate(_PUNCTUATION)
    if join_hyphenated:
        text = _HYPHENATED_BREAK.sub(_join_hyphenated, text)
    text = strip_diacritics(text.casefold())
    return _WHITESPACE.sub(" ", text).strip()


def _join_hyphenated(match: re.Match[str]) -> str:
    # An uppercase continuation ("Jean-\nPaul") is a real hyphen, kept so it reads as a gap.
    return "" if match.string[match.end()].islower() else match.group()


def _space_expansion(match: re.Match[str]) -> str:
    # A symbol that NFKC turns into letters ("™" into "TM") separates words in the summary,
    # where claims are read from the original text, so it must separate them here too.
    expansion = unicodedata.normalize("NFKC", match.group())
    return f" {expansion} " if _WORD_CHARACTER.search(expansion) else match.group()


def strip_diacritics(text: str) -> str:
    """Remove combining marks after NFD, so "Zürich" becomes "Zurich"."""
    if text.isascii():
        return text
    decomposed = unicodedata.normalize("NFD", text)
    bare = "".join(char for char in decomposed if not unicodedata.combining(char))
    return unicodedata.normalize("NFC", bare).translate(_UNDECOMPOSED_LETTERS)


def phrase_key(text: str, join_hyphenated: bool = True) -> str:
    """Normalize text and turn each run of non-alphanumeric characters into one space."""
    return _NOT_ALPHANUMERIC.sub(" ", normalize_text(text, join_hyphenated)).strip()


def numeric_view(text: str) -> str:
    """Apply NFKC to text while keeping the spaces that group digits, for number parsing.

    Superscripts, fractions and circled numbers become separate numbers, so a footnote mark
    does not extend the number before it ("1998¹" is 1998 and 1, not 19981).
    """
    text = NUMBER_FORM.sub(lambda match: f" {match.group()} ", text)
    pieces = _GROUP_SPACE.split(text)
    return "\u00a0".join(unicodedata.normalize("NFKC", piece) for piece in pieces)


def blank_spans(text: str, spans: Iterable[tuple[int, int]]) -> str:
    """Replace each (start, end) span with spaces, keeping every other offset in place."""
    pieces: list[str] = []
    cursor = 0
    for start, end in sorted(spans):
        start = max(start, cursor)
        pieces.append(text[cursor:start])
        pieces.append(" " * max(end - start, 0))
        cursor = max(end, cursor)
    pieces.append(text[cursor:])
    return "".join(pieces)


# ---------------------------------------------------------------------------------------------
# Dates

_MONTHS = {
    name: number
    for number, name in enumerate(
        ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"), 1
    )
}
_MONTH = (
    r"(?P<month>Jan(?:uary)?|Feb(?:ruary)?|Mar(?:ch)?|Apr(?:il)?|May|June?|July?|Aug(?:ust)?"
    r"|Sep(?:t|tember)?|Oct(?:ober)?|Nov(?:ember)?|Dec(?:ember)?)\b\.?"
)
_DAY = r"(?<![0-9])(?P<day>[0-3]?[0-9])(?![0-9])(?:st|nd|rd|th)?\b"
_YEAR = r"(?P<year>[0-9]{4})(?![0-9])"
_DATE_SEPARATOR = "[-/.\u2010-\u2015]"

# Tried in this order. A later pattern cannot claim text an earlier one matched, so
# "March 3, 2024" is one date and not also "March 3".
_DATE_PATTERNS = tuple(
    re.compile(pattern, re.IGNORECASE)
    for pattern in (
        rf"(?<![0-9])(?P<year>[0-9]{{4}}){_DATE_SEPARATOR}(?P<month>[0-9]{{1,2}})"
        rf"{_DATE_SEPARATOR}(?P<day>[0-9]{{1,2}})(?![0-9])",
        rf"(?<![0-9.])(?P<first>[0-9]{{1,2}}){_DATE_SEPARATOR}(?P<second>[0-9]{{1,2}})"
        rf"{_DATE_SEPARATOR}{_YEAR}",
        rf"\b{_MONTH}\s+{_DAY}(?:,\s*|\s+){_YEAR}",
        rf"{_DAY}\s+(?:of\s+)?{_MONTH},?\s+{_YEAR}",
        rf"\b{_MONTH},?\s+(?:of\s+)?{_YEAR}",
        rf"\b{_MONTH}\s+{_DAY}",
        rf"{_DAY}\s+(?:of\s+)?{_MONTH}",
    )
)


@dataclass(frozen=True)
class DateMention:
    """A date found in text, with every reading its format allows."""

    start: int
    end: int
    readings: frozenset[Reading]


def find_dates(text: str) -> list[DateMention]:
    """Find dates written with a month name or in numeric form, in order of position.

    "03/04/2024" has two readings (month first and day first). A bare year is not a
    date here: find_quantities reports it as a Quantity with `year` set.
    """
    claimed = bytearray(len(text))
    mentions: list[DateMention] = []
    for pattern in _DATE_PATTERNS:
        for match in pattern.finditer(text):
            start, end = match.span()
            if any(claimed[start:end]):
                continue
            readings = _readings(match)
            if readings:
                claimed[start:end] = b"\x01" * (end - start)
                mentions.append(DateMention(start, end, readings))
    mentions.sort(key=lambda mention: mention.start)
    return mentions


def _readings(match: re.Match[str]) -> frozenset[Reading]:
    groups = match.groupdict()
    year = int(groups["year"]) if groups.get("year") else None
    candidates: set[Reading]
    if groups.get("first"):
        first, second = int(groups["first"]), int(groups["second"])
        candidates = {(year, first, second), (year, second, first)}
    else:
        month = _month_number(groups["month"])
        day = int(groups["day"]) if groups.get("day") else None
        candidates = {(year, month, day)}
    return frozenset(reading for reading in candidates if _is_valid(reading))


def _month_number(month: str) -> int | None:
    if month.isdigit():
        return int(month)
    # A lowercase month name is usually a word ("you may 3 times"), so only capitals count.
    if not month[0].isupper():
        return None
    return _MONTHS.get(month[:3].casefold())


def _is_valid(reading: Reading) -> bool:
    year, month, day = reading
    return (
        (year is None or year > 0)
        and month is not None
        and 1 <= month <= 12
        and (day is None or 1 <= day <= 31)
    )


# ---------------------------------------------------------------------------------------------
# Numbers

# NOTE: only ASCII digits are read. Sources pass through numeric_view first, but summaries are
# parsed as written, so full-width or Arabic-Indic digits in a summary make no number claim.
_CURRENCY_CODES = ("USD", "EUR", "GBP", "JPY", "CHF", "CAD", "AUD", "CNY", "INR")
CURRENCY_CODES = frozenset(_CURRENCY_CODES)
_CODES = "|".join(_CURRENCY_CODES)
_QUANTITY = re.compile(
    rf"""
    (?<![^\W_])
    (?P<prefix>(?:US\$|[$€£¥₹])\s?|(?:{_CODES})\s?)?
    (?P<number>
        [0-9]{{1,3}}(?:,[0-9]{{3}})+(?:\.[0-9]+)?(?![0-9])
      | [0-9]{{1,3}}(?:\.[0-9]{{3}}){{2,}}(?:,[0-9]+)?(?![0-9])
      | [0-9]{{1,3}}\.[0-9]{{3}},[0-9]+
      | [0-9]{{1,3}}(?:[{_GROUP_SPACES}][0-9]{{3}})+(?![0-9])
      | [0-9]{{1,3}}(?:\ [0-9]{{3}}){{2,}}(?![0-9])
      | [0-9]+,[0-9]{{1,2}}(?![0-9])
      | [0-9]+(?:\.[0-9]+)?
    )
    (?:
        (?P<ordinal>st|nd|rd|th)\b
      | (?P<scale>\s?(?i:thousand|million|billion|trillion|mln|mn|bn|tn)\b|[kKMBm]\b)
    )?
    (?P<percent>\s?%|\s(?i:percent|per\s+cent|pct)\b)?
    (?P<suffix>\s?(?:{_CODES})\b|\s?[€£¥₹]|\s(?i:dollars?|euros?|pounds?|yen|francs?)\b)?
    """,
    re.VERBOSE,
)
_SCALE_EXPONENTS = {
    "thousand": 3, "k": 3,
    "million": 6, "mln": 6, "mn": 6, "m": 6,
    "billion": 9, "bn": 9, "b": 9,
    "trillion": 12, "tn": 12,
}  # fmt: skip
_THOUSANDS_COMMAS = re.compile(r"[0-9]{1,3}(?:,[0-9]{3})+(?:\.[0-9]+)?")

_SMALL_NUMBERS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen"
    " fifteen sixteen seventeen eighteen nineteen"
).split()
_TENS = "twenty thirty forty fifty sixty seventy eighty ninety".split()
_ORDINAL_WORDS = (
    "first second third fourth fifth sixth seventh eighth ninth tenth eleventh twelfth"
    " thirteenth fourteenth fifteenth sixteenth seventeenth eighteenth nineteenth twentieth"
).split()
_WORD_VALUES = {
    **{word: value for value, word in enumerate(_SMALL_NUMBERS)},
    **{word: 20 + 10 * index for index, word in enumerate(_TENS)},
    **{word: value for value, word in enumerate(_ORDINAL_WORDS, 1)},
}


def _alternatives(words: Iterable[str]) -> str:
    # Longest first, so "seventeen" is tried before "seven".
    return "|".join(sorted(words, key=len, reverse=True))


_SPELLED = re.compile(
    rf"""
    \b(?:
        (?:(?P<tens>{_alternatives(_TENS)})(?:[-\s](?P<unit>{_alternatives(_SMALL_NUMBERS[1:10])}))?
          | (?P<small>{_alternatives(_SMALL_NUMBERS)}))
        (?P<hundred>\s+hundred)?
        (?:\s+(?P<scale>thousand|million|billion|trillion))?
        (?P<percent>\s+(?:percent|per\s+cent))?
        (?P<currency>\s+(?:dollars?|euros?|pounds?|yen|francs?))?
      | (?P<ordinal>{_alternatives(_ORDINAL_WORDS)})
    )\b
    """,
    re.VERBOSE | re.IGNORECASE,
)


@dataclass(frozen=True)
class Quantity:
    """A number found in text, with each value its format allows after scaling."""

    start: int
    end: int
    values: frozenset[Decimal]
    percent: bool = False
    scaled: bool = False
    """True when a scale word or suffix (million, k, bn) or a currency is attached."""
    spelled: bool = False
    year: int | None = None
    """The value when the number is a bare four-digit integer from 1000 to 2100."""


def find_quantities(text: str) -> list[Quantity]:
    """Find numbers written in digits or in words, in order of position.

    Call it on text with dates blanked out (blank_spans), so a date's digits are not
    reported a second time.
    """
    quantities: list[Quantity] = []
    position = 0
    while match := _QUANTITY.search(text, position):
        quantity, position = _digit_quantity(match)
        quantities.append(quantity)
    quantities.extend(_spelled_quantity(match) for match in _SPELLED.finditer(text))
    quantities.sort(key=lambda quantity: quantity.start)
    return quantities


def _digit_quantity(match: re.Match[str]) -> tuple[Quantity, int]:
    """Build the Quantity for one match and return it with the offset to search on from."""
    number = match["number"]
    currency = bool(match["prefix"] or match["suffix"])
    scale = (match["scale"] or "").strip()
    if scale == "m" and not currency:
        scale = ""  # "42m" without a currency is metres or minutes, not millions
    exponent = _SCALE_EXPONENTS.get(scale.casefold(), 0)
    percent = bool(match["percent"])
    texts = _decimal_texts(number, decimal_comma=currency or percent or exponent > 0)
    if texts is None:
        # "1,2" with nothing attached is a list of two numbers, so keep the first and go on.
        start = match.start("number")
        comma = start + number.index(",")
        values = frozenset({Decimal(number[: comma - start])})
        return Quantity(start, comma, values), comma + 1
    values = frozenset(Decimal(f"{text}e{exponent}") for text in texts)
    bare = not (currency or scale or percent or match["ordinal"])
    year = int(number) if bare and len(number) == 4 and number.isdigit() else None
    if year is not None and not 1000 <= year <= 2100:
        year = None
    end = match.end()
    quantity = Quantity(match.start(), end, values, percent, currency or exponent > 0, False, year)
    return quantity, end


def _decimal_texts(number: str, decimal_comma: bool) -> tuple[str, ...] | None:
    """Return the plain decimal strings a written number can mean.

    Returns None for a comma decimal ("3,5") when decimal_comma is False, and an empty
    tuple for a number longer than MAX_DIGITS.
    """
    if sum(char.isdigit() for char in number) > MAX_DIGITS:
        return ()
    compact = _WHITESPACE.sub("", _GROUP_SPACE.sub("", number))
    if "," in compact and "." in compact:
        if compact.rfind(",") > compact.rfind("."):  # 1.234,56
            return (compact.replace(".", "").replace(",", "."),)
        return (compact.replace(",", ""),)
    if "," in compact:
        if _THOUSANDS_COMMAS.fullmatch(compact):
            return (compact.replace(",", ""),)
        return (compact.replace(",", "."),) if decimal_comma else None
    if compact.count(".") >= 2:
        return (compact.replace(".", ""),)
    whole, _, fraction = compact.partition(".")
    if len(fraction) == 3 and not whole.startswith("0"):
        return (compact, whole + fraction)  # "3.500" is 3.5 in English and 3500 in German
    return (compact,)


def _spelled_quantity(match: re.Match[str]) -> Quantity:
    words = [match[name] for name in ("tens", "unit", "small", "ordinal") if match[name]]
    value = sum(_WORD_VALUES.get(word.casefold(), 0) for word in words)
    if match["hundred"]:
        value *= 100
    exponent = _SCALE_EXPONENTS.get((match["scale"] or "").casefold(), 0)
    values = frozenset({Decimal(f"{value}e{exponent}")})
    percent = bool(match["percent"])
    scaled = exponent > 0 or bool(match["currency"])
    return Quantity(match.start(), match.end(), values, percent, scaled, True)
