"""lib.costs: the price table and the budget cap."""
import pytest

from lib import costs


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
