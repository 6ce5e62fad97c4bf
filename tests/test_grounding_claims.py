"""Tests for famulus.daemon.grounding: claim extraction and lookup on real summaries and sources."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from famulus.daemon.grounding import (
    Claim,
    SourceIndex,
    check,
    extract_claims,
    normalize_text,
    split_sentences,
)

MILL_SOURCE = (
    "The old textile mill on River Street closed in 1998. Developers converted it into "
    "40 apartments, which opened last spring."
)
MILL_SUMMARY = (
    "The mill on River Street, built in 1887, was converted into 40 apartments next to "
    "Lincoln School."
)
INVOICE_SOURCE = (
    "INVOICE 2024-117\nBill to: Acme Hardware, 12 Elm Road, Portland, OR 97205\n"
    "Total revenue this period: $18,450.00\nPayment due within 30 days."
)
INVOICE_SUMMARY = "Location: Redding, WA. Total Revenue: $XXVIVYMMILLIONUSD"
MILLION_FORMATS = ["42 million", "42,000,000", "$42M", "$42 million"]


def texts(claims: tuple[Claim, ...] | list[Claim]) -> set[str]:
    return {claim.text for claim in claims}


def supported(summary: str, source: str) -> bool:
    """Check a summary that must contain a claim, and return whether every claim is supported."""
    report = check(summary, source)
    assert report.claims, f"no claim found in {summary!r}"
    return report.grounded


# Numbers


@pytest.mark.parametrize("written", MILLION_FORMATS)
@pytest.mark.parametrize("evidence", MILLION_FORMATS)
def test_million_formats_match(written: str, evidence: str) -> None:
    assert supported(f"The fund raised {written} last year.", f"Investors put in {evidence}.")


def test_scaled_amount_needs_scale() -> None:
    assert not supported("The fund raised $42 million.", "The farm sold 42 apples.")


def test_decimal_million_matches_digits() -> None:
    assert supported("The app has 3.5 million users.", "It counts 3,500,000 users.")


def test_digits_match_decimal_million() -> None:
    assert supported("The app has 3,500,000 users.", "It counts 3.5 million users.")


def test_european_thousands_dots() -> None:
    assert supported("The city has 42.000.000 litres.", "Storage holds 42 million litres.")


def test_spelled_number_in_source() -> None:
    assert supported("The building has 40 apartments.", "It has forty apartments.")


def test_small_spelled_number_is_not_claim() -> None:
    assert extract_claims("They hired three engineers.") == []


def test_spelled_million_is_claim() -> None:
    assert texts(extract_claims("They raised two million dollars.")) == {"two million dollars"}


def test_huge_numbers_do_not_crash() -> None:
    report = check("Revenue was " + "9" * 400 + " or 1e999 units.", "9" * 400)
    assert "9" * 400 in texts(report.unsupported)


def test_comma_list_is_separate_numbers() -> None:
    assert texts(extract_claims("Chapters 1,2 and 3 cover it.")) == {"1", "2", "3"}


# Currency: only the value is compared. "£5" matches "$5" because the model often swaps
# currency symbols while the amount is right, and a value match is the evidence we need.


def test_euro_symbol_matches_euro_word() -> None:
    assert supported("The repair cost €1,200.", "The repair came to 1200 euros.")


def test_currency_is_not_compared() -> None:
    assert supported("The ticket cost £5.", "The ticket cost $5.")


def test_currency_amount_differs() -> None:
    assert not supported("The ticket cost £6.", "The ticket cost $5.")


# Percentages: a percentage must match a percentage, but a plain number may match either.


@pytest.mark.parametrize("evidence", ["12%", "12 percent", "12 per cent", "12 %"])
def test_percent_formats_match(evidence: str) -> None:
    assert supported("Sales grew 12% this year.", f"Sales grew {evidence}.")


def test_percent_needs_percent_in_source() -> None:
    assert not supported("Sales grew 12% this year.", "The farm sold 12 apples.")


def test_plain_number_matches_percent() -> None:
    assert supported("The score rose by 12 points.", "The score rose 12%.")


# Dates


@pytest.mark.parametrize("evidence", ["2024-03-03", "3 March 2024", "March 3rd, 2024"])
def test_full_date_formats_match(evidence: str) -> None:
    assert supported("The plant opened on March 3, 2024.", f"Opening day was {evidence}.")


def test_wrong_day_is_unsupported() -> None:
    assert not supported("The plant opened on March 4, 2024.", "It opened 2024-03-03.")


def test_slash_date_accepts_both_orders() -> None:
    assert supported("Signed on 03/04/2024.", "Signed on 4 March 2024.")


def test_slash_date_day_first() -> None:
    assert supported("Signed on 03/04/2024.", "Signed on 3 April 2024.")


def test_month_year_matches_full_date() -> None:
    assert supported("It opened in March 2024.", "It opened on 2024-03-03.")


def test_full_date_needs_day_in_source() -> None:
    assert not supported("It opened on March 3, 2024.", "It opened in March 2024.")


def test_bare_year_is_supported() -> None:
    assert supported("The mill shut in 1998.", MILL_SOURCE)


def test_bare_year_is_a_date_claim() -> None:
    assert [claim.kind for claim in extract_claims("It shut in 1998.")] == ["date"]


def test_invented_year_is_unsupported() -> None:
    assert not supported("The mill was built in 1887.", MILL_SOURCE)


def test_date_numbers_are_not_counted_twice() -> None:
    assert texts(extract_claims("It opened on March 3, 2024.")) == {"March 3, 2024"}


# Names


def test_name_without_diacritics_matches() -> None:
    assert supported("The bank moved to Zurich.", "The bank moved to Zürich in May.")


def test_name_with_diacritics_matches() -> None:
    assert supported("The bank moved to Zürich.", "The bank moved to Zurich in May.")


def test_full_name_without_accents_matches() -> None:
    assert supported("The poem is by José Martí.", "A poem written by Jose Marti in 1891.")


def test_ligature_in_source_matches() -> None:
    assert supported("The report cites Griffin Labs.", "Data from Grif\ufb01n Labs.")


def test_name_split_across_lines() -> None:
    assert supported("The firm is based in New York.", "The firm is based in New\nYork.")


def test_name_hyphenated_across_lines() -> None:
    assert supported("Barges use the Mississippi.", "Barges use the Missis-\nsippi daily.")


def test_acronym_absent_is_unsupported() -> None:
    assert not supported("The study fits an MLR model.", "The study fits a linear model.")


def test_acronym_present_is_supported() -> None:
    assert supported("NASA launched the probe.", "The probe was launched by NASA.")


def test_internal_capital_is_name() -> None:
    assert texts(extract_claims("AutoGen runs agents.")) == {"AutoGen"}


def test_sentence_initial_word_is_not_name() -> None:
    assert extract_claims("Developers converted the mill.") == []


def test_particles_join_name() -> None:
    assert texts(extract_claims("She works at the Bank of America.")) == {"Bank of America"}


def test_possessive_is_left_out() -> None:
    assert texts(extract_claims("We read José Martí's poems.")) == {"José Martí"}


# Quotes


def test_quote_in_source_is_supported() -> None:
    summary = 'The mayor called it "a fresh start for the block".'
    assert supported(summary, "It is a fresh start for the block.")


def test_invented_quote_is_unsupported() -> None:
    assert not supported("The mayor called it 'a new dawn'.", "It is a fresh start for the block.")


def test_single_word_quote_is_not_claim() -> None:
    assert extract_claims('The mill was "historic".') == []


# Whole summaries


def test_mill_summary_flags_inventions() -> None:
    report = check(MILL_SUMMARY, MILL_SOURCE)
    assert texts(report.unsupported) == {"1887", "Lincoln School"}


def test_mill_summary_keeps_true_claims() -> None:
    report = check(MILL_SUMMARY, MILL_SOURCE)
    assert {"River Street", "40"} <= texts(report.claims) - texts(report.unsupported)


def test_invoice_flags_invented_place() -> None:
    report = check(INVOICE_SUMMARY, INVOICE_SOURCE)
    assert {"Redding", "WA"} <= texts(report.unsupported)


def test_invoice_flags_garbage_amount() -> None:
    # The token has no digits, so it is not a number. As an all-caps word it is a name claim.
    report = check(INVOICE_SUMMARY, INVOICE_SOURCE)
    assert "XXVIVYMMILLIONUSD" in texts(report.unsupported)


def test_markdown_preamble_has_no_claims() -> None:
    summary = "Here's a summary of the text:\n\n1. **Summary**: The text is short."
    assert extract_claims(summary) == []


def test_bullets_and_headings_have_no_claims() -> None:
    summary = "# Key Points\n\n- **Overview**: The text is short.\n2) The end."
    assert extract_claims(summary) == []


def test_claim_text_matches_offsets() -> None:
    summary = MILL_SUMMARY + "\n- Cost: $42M (3%).\n" + INVOICE_SUMMARY
    for claim in extract_claims(summary):
        assert summary[claim.start : claim.end] == claim.text


def test_claim_sentence_index() -> None:
    claims = extract_claims("The mill closed.\n- It reopened in 2004 as Mill Lofts.")
    assert {claim.text: claim.sentence for claim in claims} == {"2004": 1, "Mill Lofts": 1}


def test_source_index_is_reusable() -> None:
    index = SourceIndex(MILL_SOURCE)
    assert check(MILL_SUMMARY, index).unsupported == check(MILL_SUMMARY, MILL_SOURCE).unsupported


# Sentences and normalization


def test_sentences_split_on_lines_and_bullets() -> None:
    text = "Dr. Smith came. He left.\n- First item • second item"
    assert [text[start:end] for start, end in split_sentences(text)] == [
        "Dr. Smith came.",
        "He left.",
        "First item",
        "second item",
    ]


def test_normalize_folds_quotes_dashes_and_case() -> None:
    assert normalize_text("“Zürich”\u2013Ünïon  ﬁle") == '"zurich"-union file'


# Robustness


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=400), st.text(max_size=2000))
def test_arbitrary_text_never_raises(summary: str, source: str) -> None:
    report = check(summary, source)
    assert set(report.unsupported) <= set(report.claims)


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("0123456789,. $€%MkmBn-/\n'\"ZüAaé&")), max_size=300))
def test_number_like_text_keeps_offsets(summary: str) -> None:
    for claim in extract_claims(summary):
        assert summary[claim.start : claim.end] == claim.text


# Pieces that real summaries and sources mix: digits, separators, currencies, months and
# accented names.
TEXT_PIECES = st.sampled_from(
    list("0123456789,. \u00a0$€£%MkmB'\"“”-\n–/&#*•)Zü¹")
    + ["March ", "May ", " of ", "USD"]
    + [" per cent", "th ", "2024", "1998", "José ", "NASA ", "Missis-\nsippi"]
)


@settings(max_examples=300, deadline=None)
@given(st.lists(TEXT_PIECES, max_size=80).map("".join))
def test_text_supports_itself(text: str) -> None:
    # The extractive fallback quotes source sentences, and those must pass the check.
    assert check(text, text).unsupported == ()


def test_footnote_mark_inside_amount_supports_itself() -> None:
    # Found by the property test above: the claim was read with the mark, the source without.
    assert check("USD¹0", "USD¹0").unsupported == ()
    assert check("It cost USD¹0.", "It cost USD 0.").unsupported == ()


def test_large_source_runs() -> None:
    # Speed is not asserted. This runs a 100 kB source through the whole check once.
    source = (MILL_SOURCE + " " + INVOICE_SOURCE + "\n") * 400
    report = check(MILL_SUMMARY * 20, source[:100_000])
    assert texts(report.unsupported) == {"1887", "Lincoln School"}


def test_footnote_mark_after_date_day() -> None:
    # Found by hypothesis: the day of "March 2¹" is claimed as a bare number.
    assert check("March 2¹", "March 2¹").grounded


def test_footnote_mark_before_number() -> None:
    # Found by hypothesis: a superscript before "1,000" cut the claim to "000".
    assert check("¹1,000", "¹1,000").grounded
