"""lib.scoring: the judge's scoring rules on hand-computed cases, min_mass exactly on its
boundary, sampled-reply parsing."""
from __future__ import annotations

import json
import math

import pytest

from lib import judge, scoring
from tests.fakes.floats import down, up

ln = math.log


def test_weighted_mean_over_numeric_tokens_divided_by_their_mass():
    # (80 * 0.5 + 90 * 0.25) / 0.75 = 62.5 / 0.75
    assert scoring.score_from_logprobs({"80": ln(0.5), "90": ln(0.25), "I": ln(0.25)}) == pytest.approx(83.3333333)


def test_mass_below_threshold_gives_none():
    assert scoring.score_from_logprobs({"50": ln(0.24), "CODE": ln(0.76)}) is None
    assert scoring.score_from_logprobs({"50": ln(0.26), "CODE": ln(0.74)}) == pytest.approx(50.0)
    assert scoring.score_from_logprobs({"50": ln(0.3)}, min_mass=0.5) is None
    assert scoring.score_from_logprobs({}) is None


def test_non_numeric_and_out_of_range_tokens_are_ignored():
    # 150 > 100 and "-5", "+5", "1_0", "8.5", "x" are not numbers 0..100: only 100 and 0 count
    top = {"150": ln(0.3), "100": ln(0.3), "0": ln(0.1), "-5": ln(0.1), "+5": ln(0.05), "1_0": ln(0.05),
           "8.5": ln(0.05), "x": ln(0.05)}
    assert scoring.score_from_logprobs(top) == pytest.approx((100 * 0.3) / 0.4)
    assert scoring.numeric_probs(top) == pytest.approx({100: 0.3, 0: 0.1})


def test_whitespace_tokens_count_as_their_number_and_same_numbers_add_up():
    top = {" 85": ln(0.3), "85": ln(0.2), "85\n": ln(0.1), " ": ln(0.2), "\n": ln(0.1), "40": ln(0.1)}
    # 85 carries 0.6, 40 carries 0.1: (85 * 0.6 + 40 * 0.1) / 0.7
    assert scoring.score_from_logprobs(top) == pytest.approx((85 * 0.6 + 40 * 0.1) / 0.7)
    score, label, mass = scoring.label_from_logprobs(top)
    assert label == "number" and mass == pytest.approx(0.7)


def test_labels_when_there_is_no_score():
    assert scoring.label_from_logprobs({"CODE": ln(0.9), "5": ln(0.05)})[1] == "CODE"
    assert scoring.label_from_logprobs({"REF": ln(0.7), "CODE": ln(0.1)})[1] == "REFUSAL"
    assert scoring.label_from_logprobs({"I": ln(0.9), "5": ln(0.05)})[1] == "low_mass"
    s, label, mass = scoring.label_from_logprobs({"I": ln(0.8), "5": ln(0.2)})
    assert (s, label) == (None, "low_mass") and mass == pytest.approx(0.2)


@pytest.mark.parametrize("text,expected", [
    ("85", (85.0, "number")), (" 0\n", (0.0, "number")), ("100.", (100.0, "number")), ("**42**", (42.0, "number")),
    ("CODE", (None, "CODE")), ("refusal", (None, "REFUSAL")), ('"REFUSAL"', (None, "REFUSAL")),
    ("101", (None, "unparseable")), ("150", (None, "unparseable")), ("-5", (None, "unparseable")),
    ("I think 50", (None, "unparseable")), ("85/100", (None, "unparseable")), ("", (None, "unparseable")),
    ("8.5", (None, "unparseable")), ("fifty", (None, "unparseable")),
])
def test_parse_sampled(text, expected):
    assert scoring.parse_sampled(text) == expected


# ------------------------------------------------------------------------------------------
# scoring rules (from the mutation-testing campaign: docs/mutation.md)
# ------------------------------------------------------------------------------------------


def test_fill_prompt_puts_question_and_answer_in_their_places():
    from lib.scoring import fill_prompt

    assert fill_prompt("Q: {question}\nA: {answer}\n{{literal}}", "Why?", "Because.") == "Q: Why?\nA: Because.\n{literal}"


def test_refusal_mass_adds_up_over_tokens_that_spell_it():
    import math

    from lib.scoring import label_from_logprobs

    top = {"REF": math.log(0.2), "REFUSAL": math.log(0.2), "I": math.log(0.6)}
    assert label_from_logprobs(top, min_mass=0.35)[1] == "REFUSAL"  # 0.2 + 0.2 >= 0.35; neither alone is


@pytest.mark.parametrize("text", ["0085", "0100", "1000", "00"])
def test_sampled_replies_longer_than_three_digits_are_not_numbers(text):
    from lib.scoring import parse_sampled

    assert parse_sampled(text) == ((float(text), "number") if len(text) <= 3 else (None, "unparseable"))


def test_non_ascii_digits_are_not_judge_numbers():
    import math

    from lib.scoring import numeric_probs, parse_sampled

    # fullwidth and Arabic-Indic digits pass str.isdigit() but are no score a judge was asked for
    assert numeric_probs({"８５": math.log(0.5), "٨": math.log(0.3), "85": math.log(0.2)}) == pytest.approx({85: 0.2})
    assert parse_sampled("８５") == (None, "unparseable")


# ------------------------------------------------------------------------------------------
# min_mass exactly on its boundary and one float step either side: a score is None when the
# probability on numbers 0..100 is *below* min_mass (mass < min_mass), so mass == min_mass scores;
# CODE / REFUSAL need *at least* min_mass (>=). Hand-picked values such as 0.24 / 0.26 never sit on
# a boundary, so a flipped < / <= survives them; these tests use the exact float the code compares.
# ------------------------------------------------------------------------------------------


def _mass(top) -> float:
    """The numeric mass exactly as the scoring rule sums it."""
    return sum(scoring.numeric_probs(top).values())


@pytest.mark.parametrize("top", [
    {"50": math.log(0.25), "CODE": math.log(0.75)},
    {"80": math.log(0.1), "20": math.log(0.2), "I": math.log(0.7)},
    {"0": math.log(0.6), "REF": math.log(0.4)},
])
def test_min_mass_boundary_scores_at_equality(top):
    mass = _mass(top)
    want = sum(v * p for v, p in scoring.numeric_probs(top).items()) / mass
    assert scoring.score_from_logprobs(top, min_mass=mass) == pytest.approx(want)  # mass == min_mass: scored
    assert scoring.score_from_logprobs(top, min_mass=down(mass)) == pytest.approx(want)
    assert scoring.score_from_logprobs(top, min_mass=up(mass)) is None  # mass just below min_mass: None
    score, label, m = scoring.label_from_logprobs(top, min_mass=mass)
    assert label == "number" and m == mass and score == pytest.approx(want)
    assert scoring.label_from_logprobs(top, min_mass=up(mass))[0] is None


def test_min_mass_default_is_the_papers_quarter_and_inclusive():
    assert scoring.MIN_MASS == 0.25
    top = {"40": math.log(0.25), "I": math.log(0.75)}
    mass = _mass(top)
    # whichever side of 0.25 exp(log(0.25)) lands, the rule is "mass < 0.25 -> None"
    assert (scoring.score_from_logprobs(top) is None) == (mass < 0.25)
    assert scoring.score_from_logprobs(top, min_mass=mass) == pytest.approx(40.0)


def test_zero_mass_never_scores_even_with_min_mass_zero():
    """min_mass 0 (the demo's setting) still needs some probability on a number."""
    assert scoring.score_from_logprobs({"CODE": 0.0}, min_mass=0.0) is None
    assert scoring.label_from_logprobs({"CODE": 0.0}, min_mass=0.0)[:2] == (None, "CODE")
    assert scoring.score_from_logprobs({"7": math.log(1e-300), "I": 0.0}, min_mass=0.0) == pytest.approx(7.0)


@pytest.mark.parametrize("word,token", [("CODE", "CODE"), ("REFUSAL", "REFUSAL"), ("REFUSAL", "REF")])
def test_code_and_refusal_need_at_least_min_mass(word, token):
    top = {token: math.log(0.3), "I": math.log(0.6), "7": math.log(0.1)}
    w = math.exp(top[token])
    assert scoring.label_from_logprobs(top, min_mass=w)[1] == word          # == min_mass: labelled
    assert scoring.label_from_logprobs(top, min_mass=up(w))[1] == "low_mass"  # just below: not


def test_code_wins_a_tie_with_refusal():
    top = {"CODE": math.log(0.4), "REFUSAL": math.log(0.4), "1": math.log(0.2)}
    assert scoring.label_from_logprobs(top, min_mass=0.3)[1] == "CODE"


def test_rescore_applies_the_configured_min_mass_at_the_boundary():
    top = {"90": math.log(0.3), "CODE": math.log(0.7)}
    mass = _mass(top)
    v = scoring.Verdict(score=None, label="low_mass", raw=json.dumps(top), prob_mass=mass)
    assert judge.rescore(v, mass).score == pytest.approx(90.0)
    assert judge.rescore(v, up(mass)).score is None and judge.rescore(v, up(mass)).label == "CODE"
