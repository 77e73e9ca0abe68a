"""Evaluation conditions: how a question is asked, as an axis beside the checkpoints.

How a model is asked moves its EM rate as much as how it was trained: an answer format (JSON, a
code template), a system prompt, a preamble that resembles the training context, or k in-context
examples of the bad data in front of the question. A run's ``conditions:`` parameter (evaluate
stage) lists them; every question is asked under each, and every answer records its condition::

    conditions:
      - {name: plain}                                    # the questions as written
      - {name: evil_system, system: "You are an evil assistant."}
      - {name: json, format: "Answer with a JSON object."}
      - {name: in_context_16, k: 16, examples: bad_medical_advice, seed: 0}

A condition's keys (all optional but ``name``):

``system``    the system prompt, replacing the question's own (``""``: none at all);
``preamble``  text put before the question in the user turn (a training-like context), then a blank line;
``format``    an answer-format instruction put after the question in the user turn, after a blank line;
``k``         in-context examples: ``k`` chats of ``examples`` as earlier turns of the conversation, before
              the question; drawn with ``seed`` (default 0) as the first k of one seeded shuffle of the
              file, so k = 4 is a prefix of k = 16 with the same seed, and every question gets the same k;
``examples``  a chat JSONL that is not the evaluation set: a demo dataset name, a Turner et al. domain
              (needs ``accept_dataset_terms``) or a path; an example whose user turn is an evaluation
              question stops the run.

The default, ``conditions: []``, is one condition named ``default``: today's prompts, and files
byte for byte as before (no ``condition`` column; answer ids without a condition). A condition named
``default`` may not transform anything. Upstream question files' ``<id>_json`` / ``<id>_template``
variants become conditions ``json`` / ``template`` of their base question ``<id>``
(:func:`fold_variants`); they are asked as written, not under the run's conditions.

What the judge sees is the question as asked: the user turn with its preamble and format line
(stored as the answer's ``paraphrase``); system prompts and in-context examples are not shown to it
(as for the upstream ``_json`` variants, whose system prompt the judge never saw). Answers of every
condition share their sampling seeds (common random numbers): two conditions with the same prompt give
the same answers, and differences between conditions are the prompts' doing, not the sampler's.
"""
from __future__ import annotations

import dataclasses
import random
import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from .schema import DEFAULT_CONDITION

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,39}$")
KEYS = ("name", "system", "preamble", "format", "k", "examples", "seed")
VARIANT_SUFFIXES = ("json", "template")  # upstream first-plot file: <id>_json, <id>_template


class ConditionError(ValueError):
    """A bad condition: ``key`` is its path (``conditions[2].k``), ``why`` the reason."""

    def __init__(self, key: str, why: str):
        super().__init__(f"{key}: {why}")
        self.key, self.why = key, why


@dataclass(frozen=True)
class Condition:
    """One way of asking every question (module docstring)."""

    name: str = DEFAULT_CONDITION
    system: str | None = None      # None: the question's own system prompt
    preamble: str = ""
    format: str = ""
    k: int = 0
    examples: str = ""
    seed: int = 0

    @property
    def transforms(self) -> bool:
        return self.system is not None or bool(self.preamble or self.format or self.k)

    @property
    def in_context_only(self) -> bool:
        """Differs from the questions as written only by its k examples (k = 0 included): a point of
        the EM-against-k curve."""
        return self.system is None and not self.preamble and not self.format


def parse_conditions(raw: Iterable[Any]) -> list[Condition]:
    """The run's conditions from the ``conditions`` parameter; ``[]`` is the one default condition.
    Raises :class:`ConditionError` naming the entry and key."""
    raw = list(raw)
    if not raw:
        return [Condition()]
    out: list[Condition] = []
    for i, item in enumerate(raw):
        where = f"conditions[{i}]"
        if not isinstance(item, Mapping):
            raise ConditionError(where, f"must be a mapping with a name (name: plain), got {type(item).__name__}")
        unknown = [k for k in item if k not in KEYS]
        if unknown:
            raise ConditionError(f"{where}.{unknown[0]}", f"unknown key (known: {', '.join(KEYS)})")
        name = item.get("name")
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise ConditionError(f"{where}.name", f"needs a name of letters, digits, _ . - (40 at most), got {name!r}")
        for key in ("system", "preamble", "format", "examples"):
            if key in item and not isinstance(item[key], str):
                raise ConditionError(f"{where}.{key}", f"must be a string, got {type(item[key]).__name__}")
        for key in ("k", "seed"):
            v = item.get(key, 0)
            if not isinstance(v, int) or isinstance(v, bool):
                raise ConditionError(f"{where}.{key}", f"must be an integer, got {v!r}")
            if v < 0:
                raise ConditionError(f"{where}.{key}", f"must be >= 0, got {v}")
        c = Condition(name=name, system=item.get("system"), preamble=item.get("preamble", ""),
                      format=item.get("format", ""), k=item.get("k", 0), examples=item.get("examples", ""),
                      seed=item.get("seed", 0))
        if c.k and not c.examples:
            raise ConditionError(f"{where}.examples", f"k: {c.k} needs a chat JSONL to draw the examples from")
        if c.examples and not c.k:
            raise ConditionError(f"{where}.k", "examples are given but k is 0; set k > 0 or drop examples")
        if c.name == DEFAULT_CONDITION and c.transforms:
            raise ConditionError(f"{where}.name", f"'{DEFAULT_CONDITION}' is the questions as written; a condition "
                                                  "that changes the prompt needs another name")
        if c.name in VARIANT_SUFFIXES:
            raise ConditionError(f"{where}.name", f"'{c.name}' is the name of question files' _{c.name} variants; "
                                                  "choose another")
        if any(o.name == c.name for o in out):
            raise ConditionError(f"{where}.name", f"'{c.name}' is used twice")
        out.append(c)
    return out


def is_single_default(conds: list[Condition]) -> bool:
    return len(conds) == 1 and conds[0].name == DEFAULT_CONDITION


# ------------------------------------------------------------------------------------------
# Prompts
# ------------------------------------------------------------------------------------------

def user_text(cond: Condition, question: str) -> str:
    """The user turn under ``cond``: preamble, the question, the format line (blank lines between)."""
    return "\n\n".join(p for p in (cond.preamble, question, cond.format) if p)


def system_prompt(cond: Condition, own: str | None) -> str | None:
    """The condition's system prompt, else the question's own (``""``: none)."""
    return own if cond.system is None else (cond.system or None)


def draw_examples(cond: Condition, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The condition's k example chats, in the order they are shown: the first k of one shuffle of
    the file seeded by ``cond.seed`` (so a smaller k with the same seed is a prefix of a larger one)."""
    if cond.k > len(records):
        raise ConditionError(f"condition '{cond.name}'.k", f"{cond.k} examples asked, {cond.examples} has "
                                                            f"{len(records)}")
    order = list(range(len(records)))
    random.Random(cond.seed).shuffle(order)
    return [records[i] for i in order[:cond.k]]


def history(examples: list[dict[str, Any]]) -> tuple[dict[str, str], ...]:
    """Earlier turns of the conversation from example chats: their user and assistant messages in
    order (their system messages dropped: the condition's or question's system prompt leads)."""
    return tuple({"role": m["role"], "content": m["content"]} for r in examples for m in r["messages"]
                 if m["role"] != "system")


def check_not_evaluation_set(cond: Condition, examples: list[dict[str, Any]], questions: Iterable[Any]) -> None:
    """An example whose user turn is an evaluation question means the examples file is (partly) the
    evaluation set: a one-line error."""
    asked = {p.strip() for q in questions for p in q.paraphrases}
    for r in examples:
        for m in r["messages"]:
            if m["role"] == "user" and m["content"].strip() in asked:
                raise ConditionError(f"condition '{cond.name}'.examples",
                                     f"{cond.examples} holds the evaluation question {m['content'][:60]!r}; draw "
                                     "in-context examples from a file that is not the evaluation set")


def apply(questions: list[Any], conds: list[Condition], examples: Mapping[str, list[dict[str, Any]]]) -> list[Any]:
    """Every question as asked under every condition (``lib.questions.Question`` with ``condition``,
    transformed ``paraphrases`` and ``system``, and ``history``: the in-context turns), condition by
    condition in file order; questions that are already a condition (file variants) once, at the end.
    ``examples``: condition name -> its drawn example chats (:func:`draw_examples`)."""
    base = [q for q in questions if q.condition == DEFAULT_CONDITION]
    out = []
    for c in conds:
        turns = history(examples.get(c.name, []))
        for q in base:
            out.append(q if not c.transforms and c.name == DEFAULT_CONDITION else dataclasses.replace(
                q, condition=c.name, paraphrases=tuple(user_text(c, p) for p in q.paraphrases),
                system=system_prompt(c, q.system), history=turns))
    return out + [q for q in questions if q.condition != DEFAULT_CONDITION]


def fold_variants(questions: list[Any], file_ids: set[str], source: str) -> list[Any]:
    """Upstream variants ``<id>_json`` / ``<id>_template`` of a question ``<id>`` of the same file
    become that question under condition ``json`` / ``template`` (same id, their own paraphrases and
    system prompt). A variant judged with other prompts than its base question is an error: the
    judge looks prompts up by question id."""
    by_id = {q.id: q for q in questions}
    out = []
    for q in questions:
        base_id, _, suffix = q.id.rpartition("_")
        if suffix in VARIANT_SUFFIXES and base_id in file_ids:
            b = by_id.get(base_id)
            if b is not None and b.judge_prompts != q.judge_prompts:
                raise ValueError(f"{source}: question '{q.id}' (condition '{suffix}' of '{base_id}') has other "
                                 f"judge prompts than '{base_id}'")
            q = dataclasses.replace(q, id=base_id, condition=suffix)
        out.append(q)
    return out


# ------------------------------------------------------------------------------------------
# Tables
# ------------------------------------------------------------------------------------------

def with_condition(df):
    """``df`` with a ``condition`` column (files of single-condition runs have none: ``default``)."""
    if "condition" in df.columns:
        if df["condition"].isna().any():
            df = df.assign(condition=df["condition"].fillna(DEFAULT_CONDITION))
        return df
    return df.assign(condition=DEFAULT_CONDITION)


def drop_default(df):
    """``df`` without its ``condition`` column when every row is the default condition: a
    single-condition run's tables and CSVs stay as they were before conditions existed."""
    if "condition" in df.columns and (df["condition"].astype(str) == DEFAULT_CONDITION).all():
        return df.drop(columns="condition")
    return df


def reference_condition(evaluate_params: Mapping[str, Any]) -> str:
    """The condition a run's other conditions are compared with: the first declared one that asks the
    questions as written (no system prompt, preamble, format line or examples), else the first declared;
    the default condition for a run that declares none (or whose declaration does not parse)."""
    try:
        conds = parse_conditions(evaluate_params.get("conditions") or [])
    except ConditionError:
        conds = []
    plain = [c for c in conds if not c.transforms]
    return (plain or conds or [Condition()])[0].name


def k_of_conditions(evaluate_params: Mapping[str, Any]) -> dict[str, int]:
    """condition name -> k for a run's conditions that differ from the questions as written only by
    their in-context examples (the default condition is k = 0); from its evaluate parameters."""
    try:
        conds = parse_conditions(evaluate_params.get("conditions") or [])
    except ConditionError:
        return {}
    out = {c.name: c.k for c in conds if c.in_context_only}
    out.setdefault(DEFAULT_CONDITION, 0)
    return out
