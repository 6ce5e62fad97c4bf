"""The grounding policy and the extractive fallback."""

from __future__ import annotations

from famulus.daemon.grounding.claims import check
from famulus.daemon.grounding.extractive import extractive_summary, source_sentences
from famulus.daemon.grounding.policy import (
    Action,
    GroundingPath,
    drop_sentences,
    ground,
    unchecked,
)

SOURCE = ("The old textile mill on River Street closed in 1998. Developers converted it into "
          "40 apartments, which opened last spring. The city paid for new windows.")
INVENTED = ("The mill on River Street was converted into 40 apartments. It was built in 1887 "
            "next to Lincoln School.")


def never_called() -> str:
    raise AssertionError("regenerate must not be called")


def test_grounded_summary_kept() -> None:
    good = "The mill on River Street became 40 apartments."
    out = ground(SOURCE, good, never_called, action=Action.DROP_SENTENCES, retry=True,
                 extractive_sentences=2)
    assert out.path is GroundingPath.GROUNDED
    assert out.text == good
    assert out.grounded
    assert out.unsupported == []


def test_retry_result_used_when_grounded() -> None:
    retried = "The mill closed in 1998 and now holds 40 apartments."
    out = ground(SOURCE, INVENTED, lambda: retried, action=Action.DROP_SENTENCES, retry=True,
                 extractive_sentences=2)
    assert out.path is GroundingPath.RETRIED
    assert out.text == retried
    assert out.attempts == 2
    assert {"kind": "date", "text": "1887"} in out.unsupported


def test_unsupported_sentences_dropped() -> None:
    out = ground(SOURCE, INVENTED, lambda: INVENTED, action=Action.DROP_SENTENCES, retry=True,
                 extractive_sentences=2)
    assert out.path is GroundingPath.DROPPED_SENTENCES
    assert out.text == "The mill on River Street was converted into 40 apartments."
    assert out.grounded
    assert check(out.text, SOURCE).grounded
    texts = [c["text"] for c in out.unsupported]
    assert "1887" in texts
    assert "Lincoln School" in texts


def test_extractive_action_replaces_summary() -> None:
    out = ground(SOURCE, INVENTED, never_called, action=Action.EXTRACTIVE, retry=False,
                 extractive_sentences=2)
    assert out.path is GroundingPath.EXTRACTIVE
    assert out.grounded
    assert out.text
    assert all(sentence in SOURCE for sentence in out.text.split(". ")[:1])


def test_drop_leaving_nothing_falls_back() -> None:
    all_invented = "Lincoln School opened in 1887."
    out = ground(SOURCE, all_invented, lambda: all_invented, action=Action.DROP_SENTENCES,
                 retry=True, extractive_sentences=2)
    assert out.path is GroundingPath.EXTRACTIVE
    assert out.grounded
    assert "Lincoln" not in out.text


def test_drop_sentences_keeps_others() -> None:
    claims = check(INVENTED, SOURCE).unsupported
    assert drop_sentences(INVENTED, claims) == (
        "The mill on River Street was converted into 40 apartments.")


def test_unchecked_reports_without_acting() -> None:
    out = unchecked(SOURCE, INVENTED)
    assert out.path is GroundingPath.OFF
    assert out.text == INVENTED
    assert out.grounded is False
    assert out.unsupported


def test_extractive_prefers_central_sentences() -> None:
    text = ("Solar panels now cover the depot roof. "
            "The panels produce most of the depot's power at noon. "
            "A cat sleeps on the fence sometimes. "
            "On cloudy days the panels produce less, so the depot buys power.")
    summary = extractive_summary(text, 2)
    assert "cat" not in summary
    assert summary.startswith("Solar panels")


def test_extractive_drops_running_headers() -> None:
    pages = "\n".join(f"Data Model Edition 1.0 page {n}\nThe network model stores rivers "
                      f"and lakes as connected segments number {n}." for n in range(5))
    assert all("Edition" not in s for s in source_sentences(pages))


def test_extractive_short_text_returns_start() -> None:
    assert extractive_summary("Too short.") == "Too short."
    long_word_salad = "word " * 200
    assert len(extractive_summary(long_word_salad)) <= 400


def test_extractive_joins_hyphenated_lines() -> None:
    text = "The siege became too dan-\ngerous for the people who lived in the city."
    assert "dangerous" in extractive_summary(text)


def test_extractive_keeps_title_apart() -> None:
    text = ("A Case Study of Inference Tuning for MATH\n"
            "What about inference parameters? We tune the model and its parameters for hard "
            "math problems.")
    summary = extractive_summary(text, 3)
    assert check(summary, text).grounded
    assert "MATH\n" in summary


def test_extractive_keeps_abbreviations_inside() -> None:
    text = ("For easy problems the tuned model was more accurate (e.g., 90% vs. 70%) and cost "
            "less than the untuned one. The hard problems showed the opposite result.")
    sentences = source_sentences(text)
    assert sentences[0].endswith("cost less than the untuned one.")
