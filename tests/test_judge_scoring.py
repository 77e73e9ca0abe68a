"""Judge scoring rules on hand-computed cases, sampled-reply parsing, prices and names."""
import math

import pytest

from lib import costs, judge, scoring, secrets
from lib.config import RunConfig

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


def test_price_table_dated_ids_and_unknown_models():
    assert costs.price_for("gpt-4o-mini-2024-07-18").model == "gpt-4o-mini"
    assert costs.price_for("gpt-4o-2024-08-06").model == "gpt-4o"
    assert costs.price_for("gpt-4o-2024-05-13").input_per_1m == 5.0  # its own, older price
    assert costs.price_for("llama3.1:8b") is None
    assert costs.cost_usd("some-local-model", 1000, 10) is None
    # 1M input at $0.15 + 1M output at $0.60; the Batch API halves it
    assert costs.cost_usd("gpt-4o-mini", 1_000_000, 1_000_000) == pytest.approx(0.75)
    assert costs.cost_usd("gpt-4o-mini", 1_000_000, 1_000_000, batch=True) == pytest.approx(0.375)
    assert "unknown" in costs.describe_price("llama3.1:8b")


def test_budget_stops_before_exceeding_the_cap():
    b = costs.Budget(1.0)
    assert b.try_reserve(0.4) and b.try_reserve(0.4)
    assert not b.try_reserve(0.4) and b.exhausted
    b.settle(0.4, 0.1)
    assert b.spent_usd == pytest.approx(0.1) and b.reserved_usd == pytest.approx(0.4)
    assert costs.Budget(0.0).try_reserve(1e9)  # 0 = no cap


def test_judge_names_are_safe_and_distinct():
    cfg = RunConfig()
    assert judge.judge_name(cfg) == "hf-embedded_tiny-exact"
    api = cfg.replace(judge_backend="openai", judge_model="gpt-4o-mini-2024-07-18", judge_method="logprob")
    assert judge.judge_name(api) == "openai-gpt-4o-mini-2024-07-18-logprob"
    local = api.replace(judge_base_url="http://user:secret@localhost:11434/v1", judge_model="llama3.1:8b")
    assert judge.judge_name(local) == "openai-localhost-llama3.1_8b-logprob"
    assert "secret" not in secrets.safe_base_url(local.judge_base_url)
    assert judge.judge_name(api.replace(judge_name="my judge/v2")) == "my_judge_v2"
    assert judge.judgments_path(api).name == "openai-gpt-4o-mini-2024-07-18-logprob.parquet"
