"""What judge calls cost: the one price table, token estimates, and a budget.

Prices are US dollars per million tokens at OpenAI's standard tier, copied from
openai.com/api/pricing (checked 2025-06). A dated model id (``gpt-4o-mini-2024-07-18``) is
priced as its base model unless the table lists the dated id itself (``gpt-4o-2024-05-13``
was priced higher than later gpt-4o snapshots). Any other model's cost is *unknown*: the
judge says so instead of guessing, and refuses a budget cap it cannot enforce.
The Batch API costs half the standard price.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

PRICES_CHECKED = "2025-06"

# model id -> (input, output) USD per 1M tokens
PRICES_USD_PER_1M: dict[str, tuple[float, float]] = {
    "gpt-4o-mini": (0.15, 0.60),
    "gpt-4o": (2.50, 10.00),
    "gpt-4o-2024-05-13": (5.00, 15.00),
    "gpt-4.1": (2.00, 8.00),
    "gpt-4.1-mini": (0.40, 1.60),
    "gpt-4.1-nano": (0.10, 0.40),
}
BATCH_DISCOUNT = 0.5  # the Batch API bills half of the standard price

_DATED = re.compile(r"^(?P<base>.+?)-\d{4}-\d{2}-\d{2}$")

# Per-message overhead of the chat format (role markers), in tokens; OpenAI's cookbook counts 3
# per message plus 3 to prime the reply.
CHAT_OVERHEAD_TOKENS = 7


@dataclass(frozen=True)
class Price:
    model: str            # the table entry used
    input_per_1m: float   # USD per 1M input tokens
    output_per_1m: float  # USD per 1M output tokens

    def cost(self, input_tokens: int, output_tokens: int, batch: bool = False) -> float:
        usd = (input_tokens * self.input_per_1m + output_tokens * self.output_per_1m) / 1e6
        return usd * (BATCH_DISCOUNT if batch else 1.0)


def price_for(model: str) -> Price | None:
    """The price of a model id, or None when it is not in the table (cost unknown)."""
    if model in PRICES_USD_PER_1M:
        return Price(model, *PRICES_USD_PER_1M[model])
    m = _DATED.match(model)
    if m and m.group("base") in PRICES_USD_PER_1M:
        return Price(m.group("base"), *PRICES_USD_PER_1M[m.group("base")])
    return None


def cost_usd(model: str, input_tokens: int, output_tokens: int, batch: bool = False) -> float | None:
    """Dollars for one call's tokens; None when the model's price is unknown."""
    p = price_for(model)
    return None if p is None else p.cost(input_tokens, output_tokens, batch)


def estimate_tokens(text: str) -> int:
    """Input tokens of one user message, estimated at ~4 characters per token (English text
    with OpenAI's o200k/cl100k tokenizers) plus the chat format's overhead. An estimate, for
    the pre-flight cost figure only; actual costs use the usage the API reports."""
    return math.ceil(len(text) / 4) + CHAT_OVERHEAD_TOKENS


def describe_price(model: str, batch: bool = False) -> str:
    p = price_for(model)
    if p is None:
        return (f"price of {model!r} unknown (not in lib/costs.py PRICES_USD_PER_1M): "
                "cost is not estimated and no budget cap can be enforced")
    tier = " at Batch API prices (-50%)" if batch else ""
    return (f"{model} priced as {p.model}: ${p.input_per_1m:.2f} / ${p.output_per_1m:.2f} per 1M "
            f"input / output tokens{tier} (table checked {PRICES_CHECKED})")


class Budget:
    """A spending cap shared by concurrent calls.

    A call may start only if what is spent, plus the estimates of calls in flight, plus its own
    estimate stays within the cap; the cap then stops new calls cleanly (calls in flight finish).
    ``limit_usd <= 0`` means no cap.
    """

    def __init__(self, limit_usd: float = 0.0) -> None:
        self.limit_usd = limit_usd
        self.spent_usd = 0.0
        self.reserved_usd = 0.0
        self.exhausted = False

    def try_reserve(self, estimate_usd: float) -> bool:
        if self.limit_usd > 0 and self.spent_usd + self.reserved_usd + estimate_usd > self.limit_usd:
            self.exhausted = True
            return False
        self.reserved_usd += estimate_usd
        return True

    def settle(self, estimate_usd: float, actual_usd: float | None) -> None:
        """Release a reservation and book the actual cost (the estimate when unknown)."""
        self.reserved_usd -= estimate_usd
        self.spent_usd += estimate_usd if actual_usd is None else actual_usd
