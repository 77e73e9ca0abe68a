"""What the judge stage needs from a backend: :class:`JudgeBackend`, and the two things every
backend shares with the stage (the :data:`Sink` it hands verdicts to, its :func:`progress_bar`).

A backend turns judge calls (:class:`lib.scoring.Job`) into verdicts (:class:`lib.scoring.Verdict`).
The stage (:mod:`lib.judge`) does the rest: it builds the jobs, keys each by the backend's
:meth:`JudgeBackend.identity` and the prompt, plans and prices the calls not cached yet, commits
every verdict to its cache as it arrives, and writes the table and run.json. The backends are
:mod:`lib.judge_openai` (an OpenAI-compatible API, and its Batch API variant) and :mod:`lib.judge_hf`
(transformers in this process); :mod:`lib.judge_backends` maps a run's ``judge_backend`` to one.

This module sits in the base layer, next to :mod:`lib.scoring` whose records it speaks in, so the
stage and every backend import it without a cycle.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Protocol, runtime_checkable

from .costs import Budget
from .progress import Progress
from .scoring import Job, Verdict

Sink = Callable[[Job, Verdict], None]  # the stage's hook for one finished call (it caches the verdict)


@runtime_checkable
class JudgeBackend(Protocol):
    """One judge (a model behind an API or in this process, with a scoring method), as the stage uses it.

    While it plans, before any call, the stage reads :attr:`max_output_tokens` and calls
    :meth:`identity`, :meth:`estimate_cost` and :meth:`price_note`; then it calls :meth:`run` once
    with the calls still to make, and reads :attr:`status` for its printout and run.json. Building a
    backend must be cheap and must not call anything remote (``plan`` builds one too): load the
    model or open the client in :meth:`run`.
    """

    max_output_tokens: int
    """Output tokens one call produces at most (logprob 1, sampled ``SAMPLED_MAX_TOKENS``, exact 0):
    the plan multiplies it by the calls to make for its token and cost estimate."""

    status: list[dict[str, Any]] | None
    """Remote jobs this run saw (the Batch API's batches: id, status, requests), printed after the
    run and kept as run.json's ``batches``; None for a backend whose calls all end inside :meth:`run`."""

    def identity(self) -> dict[str, Any]:
        """What makes this judge's verdicts what they are: backend, model (or its content fingerprint),
        method and sampling settings. JSON-serialisable and the same in every process: it is hashed
        with each prompt into the cache key (:func:`lib.judge.cache_key`), so changing what it returns
        re-pays every cached call. run.json keeps it."""
        ...

    def estimate_cost(self, input_tokens: int, output_tokens: int) -> float | None:
        """US dollars for calls of these many tokens in all: 0.0 when free, None when the price is
        unknown (the stage then refuses a budget cap it could not enforce)."""
        ...

    def price_note(self) -> str:
        """One line on what the calls cost and where the price comes from (the plan shows it,
        run.json keeps it)."""
        ...

    def run(self, jobs: list[Job], sink: Sink, budget: Budget, progress: bool) -> None:
        """Judge ``jobs`` (distinct calls, none cached), handing each verdict to ``sink`` as soon as
        it exists: the stage commits it there, so an interrupted run loses only calls in flight.

        A call that fails for good becomes :meth:`lib.scoring.Verdict.failed` (an error row, not
        cached: the next run retries it). A paid call first reserves its estimate with
        ``budget.try_reserve`` and the backend stops starting calls once one is refused. A job may
        end without a verdict (budget cap, a batch still running): it stays pending for a rerun. A
        problem no retry can fix (bad key, unknown model, no logprobs) raises
        :class:`lib.scoring.JudgeError`. ``progress``: show :func:`progress_bar`."""
        ...


def progress_bar(total: int, enabled: bool, desc: str, run_dir: Path | None) -> Progress:
    """The progress every backend reports while it judges: stage ``judge``, counted in judgments,
    one tick per call, so the notebook and the grid's tail of ``progress.jsonl`` read the same
    whichever backend runs."""
    return Progress("judge", "judgments", total, run_dir=run_dir, enabled=enabled, desc=desc, unit="call")
