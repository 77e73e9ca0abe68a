"""Judge panels: a run's ``judges:`` list, each entry an extra judge beside the primary one.

The primary (headline) judge is the run's own ``judge_*`` fields, unchanged: a parameters file
without ``judges`` is the single-judge run it always was. Each entry of ``judges`` names one
more judge with the keys of :data:`PANEL_KEYS` (``backend``, ``model``, ``method``,
``base_url``, ``api_key_env``, ``prompts``, ``min_mass``, ``name``), each the ``judge_<key>``
field of that judge. A key an entry leaves out takes the primary judge's value, except ``name``:
an extra judge's judgments file is named by its own backend, model and method unless ``name``
says otherwise. Every other judge setting (metrics, concurrency, retries, timeout, budget,
temperature) is the run's.

:func:`panel_overrides` turns the list into the ``judge_*`` values of each extra judge, checking
only the entries' shape (a mapping, known keys); :func:`lib.config.judge_panel` builds a full,
checked RunConfig per judge from them, and the judge stage scores every answer with each
(:func:`lib.judge.judge_panel_run`). Errors are one line naming the entry and the key,
``judges[1].model: ...`` (``judges[0]`` is the first extra judge).
"""
from __future__ import annotations

import difflib
from typing import Any, Callable, Mapping

# an entry's key -> the RunConfig field it sets for that judge
PANEL_KEYS: dict[str, str] = {
    "backend": "judge_backend", "model": "judge_model", "method": "judge_method", "base_url": "judge_base_url",
    "api_key_env": "judge_api_key_env", "prompts": "judge_prompts", "min_mass": "judge_min_mass",
    "name": "judge_name",
}
FIELD_TO_KEY = {v: k for k, v in PANEL_KEYS.items()}
# what makes two judges the same judge (two entries equal on all of these score identically)
IDENTITY_FIELDS = ("judge_backend", "judge_model", "judge_method", "judge_base_url", "judge_prompts",
                   "judge_min_mass", "judge_name")


class PanelError(ValueError):
    """A ``judges`` entry's shape is wrong; the message starts with ``judges[i]``."""


def panel_overrides(judges: list, primary: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The ``judge_*`` values of each extra judge: the primary judge's values (``primary``: a run's
    parameters) under the entry's keys, with ``judge_name`` empty (derived) unless the entry names it."""
    out = []
    for i, entry in enumerate(judges):
        if not isinstance(entry, Mapping):
            raise PanelError(f"judges[{i}]: expected a mapping of {', '.join(PANEL_KEYS)}, got "
                             f"{type(entry).__name__} {entry!r}")
        for key in entry:
            if key not in PANEL_KEYS:
                hint = difflib.get_close_matches(str(key), [*PANEL_KEYS, *PANEL_KEYS.values()], n=1, cutoff=0.6)
                hint_key = FIELD_TO_KEY.get(hint[0], hint[0]) if hint else ""
                raise PanelError(f"judges[{i}]: unknown key '{key}'" + (f" (did you mean '{hint_key}'?)" if hint else "")
                                 + f"; an entry takes {', '.join(PANEL_KEYS)}")
        values = {f: primary[f] for f in PANEL_KEYS.values() if f in primary}
        values["judge_name"] = ""
        values.update({PANEL_KEYS[k]: v for k, v in entry.items()})
        out.append(values)
    return out


def relabel(message: str, index: int) -> str:
    """A RunConfig error about one extra judge's field (``... key 'judge_model': why``) as
    ``judges[i].model: why`` (``judges[i]: key '...': why`` for a field an entry cannot set)."""
    head, sep, rest = message.partition("key '")
    if not sep:
        return f"judges[{index}]: {message}"
    field, _, why = rest.partition("': ")
    if field in FIELD_TO_KEY:
        return f"judges[{index}].{FIELD_TO_KEY[field]}: {why}"
    return f"judges[{index}]: key '{field}': {why}"


def build_panel(cfg: Any, make: Callable[[dict[str, Any]], Any], error: type[Exception]) -> list[Any]:
    """``cfg`` (the primary judge) and one config per ``judges`` entry, each made by ``make`` from the
    run's parameters with the entry's judge values (``make`` checks them; its ``error`` becomes a
    ``judges[i]...`` line); two entries that are the same judge are an error too."""
    out = [cfg]
    for i, over in enumerate(panel_overrides(list(cfg.judges), cfg.to_dict())):
        try:
            out.append(make({**cfg.to_dict(), **over, "judges": []}))
        except error as e:
            raise PanelError(relabel(str(e).split(": ", 1)[-1], i)) from None
    pair = duplicate([{f: getattr(m, f) for f in IDENTITY_FIELDS} for m in out])
    if pair:
        raise PanelError(f"{who(pair[1])}: the same judge (or judgments file name) as {who(pair[0])}; change its "
                         "model, method or prompts, or give it another name")
    return out


def duplicate(identities: list[dict[str, Any]]) -> tuple[int, int] | None:
    """(i, j) of the first two judges (0: the primary, i: judges[i - 1]) that are the same judge, or
    that name the same judgments file with an explicit name; None when all differ."""
    for j, b in enumerate(identities):
        for i, a in enumerate(identities[:j]):
            same = all(a.get(f) == b.get(f) for f in IDENTITY_FIELDS)
            if same or (a.get("judge_name") and a.get("judge_name") == b.get("judge_name")):
                return i, j
    return None


def who(index: int) -> str:
    """The name errors use for judge ``index`` of :func:`duplicate` (0: the primary judge)."""
    return "the primary judge (judge_*)" if index == 0 else f"judges[{index - 1}]"
