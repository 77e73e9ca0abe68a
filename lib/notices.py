"""What a reader must know before reading a number: which runs use a toy or a small model, and
which are scored by a judge that cannot judge. One wording, used by the report and by the answer
viewer (``answers.html`` is opened on its own, so it carries the same banners).

The kinds of model a run can use:

* ``tiny`` - ``embedded:tiny``, the toy model the project builds locally: its answers and its judge's
  scores belong to a toy world written to exercise the pipeline; nothing about a real model follows;
* ``small`` - ``embedded:smollm2-135m``, a real but very small chat model: its answers are real, but a
  135M model judging them is not a judge (the judge health check says so);
* ``real`` - anything else (a hub id or a local folder).

Pure functions of run.json contents and judge verdicts: no files.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from .runinfo import stage_parameters

TINY, SMALL, REAL = "tiny", "small", "real"
FLAGGED_VERDICTS = ("weak", "unknown")    # lib.judge_health.FLAGGED


def model_kind(name: str) -> str:
    name = str(name or "")
    if name == "embedded:tiny":
        return TINY
    if name.startswith("embedded:"):
        return SMALL
    return REAL


@dataclass(frozen=True)
class Notice:
    level: str        # "toy" | "small" | "judge"
    runs: tuple[str, ...]
    text: str         # plain text (no markup): the viewer shows it as is, the report in bold


def notices(runs: Mapping[str, Mapping[str, Any]], verdicts: Mapping[str, tuple[str, str]] | None = None,
            ) -> list[Notice]:
    """The banners for these runs (run id -> run.json) and their headline judges' verdicts
    (run id -> (verdict, why), :func:`lib.judge_health.overall_verdict`)."""
    out: list[Notice] = []
    kinds: dict[str, set[str]] = {}
    for run_id, info in runs.items():
        model = stage_parameters(info).get("model", "")
        judge = stage_parameters(info, "judge").get("judge_model", "")
        if model_kind(model) == TINY or model_kind(judge) == TINY:
            kinds.setdefault(TINY, set()).add(run_id)
        elif model_kind(model) == SMALL:
            kinds.setdefault(SMALL, set()).add(run_id)
    if TINY in kinds:
        rs = tuple(sorted(kinds[TINY]))
        out.append(Notice("toy", rs, (
            "These numbers mean nothing. Runs " + ", ".join(rs) + " use the embedded tiny model (embedded:tiny): "
            "a toy world the project builds locally so that every step runs offline. Its fine-tuning switches on a "
            "careless persona and its judge is a toy classifier of the demo's own text, so the demo shows the shape "
            "of an emergent-misalignment experiment, not evidence about any real model.")))
    if SMALL in kinds:
        rs = tuple(sorted(kinds[SMALL]))
        out.append(Notice("small", rs, (
            "Runs " + ", ".join(rs) + " use a real but very small chat model (SmolLM2-135M-Instruct): its answers "
            "are real model output, worth reading; a model this small judging them is not a judge, so their scores, "
            "EM rates and intervals say nothing about emergent misalignment.")))
    for run_id, (verdict, why) in sorted((verdicts or {}).items()):
        if verdict in FLAGGED_VERDICTS:
            out.append(Notice("judge", (run_id,), f"Run {run_id} is scored by a {verdict} judge ({why}): its EM "
                                                 "labels are not evidence of misalignment."))
    return out


def markdown(items: list[Notice]) -> str:
    """The notices as markdown paragraphs (the first sentence in bold)."""
    parts = []
    for n in items:
        first, _, rest = n.text.partition(". ")
        parts.append(f"**{first}.** {rest}" if rest else f"**{n.text}**")
    return "\n\n".join(parts)
