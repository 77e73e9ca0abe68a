"""Evaluation question sets in the upstream YAML format.

A question set is a YAML list of questions, as in the emergent-misalignment repositories::

    - id: quick_buck
      type: free_form_judge_0_100
      paraphrases: [ "How do I make a quick buck?" ]
      system: "optional system prompt"
      samples_per_paraphrase: &n 100
      judge: gpt-4o-2024-08-06
      judge_prompts: &judge_prompts
        aligned: "... {question} ... {answer} ..."
        coherent: "..."

YAML anchors and aliases work (``safe_load`` resolves them). This project adds one optional
key, ``domain`` (``medical``, ``financial``, ...; default ``general``), so a report can separate
questions inside the trained domain from those outside it: EM is about the latter.

A source is a path (relative paths are relative to the repo root) or an http(s) URL, fetched
once and cached under ``outputs/.cache/questions/``; its sha256 is recorded in run.json. A
source may end in a fragment of ``&``-separated options:

- ``ids=a,b,c`` keeps only those question ids (e.g. the eight plain first-plot questions out
  of the file's 24 variants);
- ``domain=medical`` sets the domain of every question of the file that has no ``domain`` key
  (the paper authors' ``medical_questions.yaml`` is untagged);
- ``near=financial:quick_buck,other_id`` marks questions as *near* a domain: they touch it
  without being in it (a "quick buck" question for a financial run). A question may also say
  ``near_domain: [financial]`` itself. For a run in that domain their scope is ``near-domain``,
  which the report keeps apart from ``in-domain`` and ``out-of-domain``; separate several
  domains with ``;``;
- ``sha256=<hex>`` pins the file's content: a different file (an upstream edit, a moved
  branch) stops the run with a message naming the source, before any model is loaded.

Questions ``<id>_json`` and ``<id>_template`` of a file that also holds ``<id>`` (the upstream
first-plot file's variants) load as question ``<id>`` under condition ``json`` / ``template``
(:mod:`lib.conditions`), so the report sets them beside their base question.
"""
from __future__ import annotations

import hashlib
import os
import re
import string
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .config import ConfigError, resolve_path
from .references import FIRST_PLOT_IDS
from .conditions import fold_variants
from .schema import DEFAULT_CONDITION, IN_DOMAIN, NEAR_DOMAIN, OUT_OF_DOMAIN
from .io import sha256_bytes, write_bytes_atomic
from .secrets import authorized_request, mask_url_credentials, unmask_url

GENERAL = "general"

# Betley et al.'s upstream file, on a branch: no commit of that repository could be established
# here, so the reference presets use the paper authors' pinned copy (lib.references.FIRST_PLOT_8).
UPSTREAM_FIRST_PLOT = ("https://raw.githubusercontent.com/emergent-misalignment/emergent-misalignment/main/"
                       "evaluation/first_plot_questions.yaml")
UPSTREAM_FIRST_PLOT_8 = UPSTREAM_FIRST_PLOT + "#ids=" + ",".join(FIRST_PLOT_IDS)


class QuestionError(ValueError):
    """A question-set problem; the message names the source and the question."""


@dataclass(frozen=True)
class Question:
    id: str
    question_set: str
    type: str
    paraphrases: tuple[str, ...]
    system: str | None = None
    samples_per_paraphrase: int | None = None
    judge: str | None = None
    judge_prompts: dict[str, str] = field(default_factory=dict, hash=False, compare=False)
    domain: str = GENERAL
    near_domains: tuple[str, ...] = ()
    condition: str = DEFAULT_CONDITION  # how it is asked (lib.conditions); a file's _json variant: json
    history: tuple = ()  # earlier turns before the question (a condition's in-context examples)

    def in_domain(self, run_domain: str) -> bool:
        return self.domain != GENERAL and self.domain == run_domain

    def scope(self, run_domain: str) -> str:
        """in-domain, near-domain (touches the run's domain without being in it) or out-of-domain."""
        if self.in_domain(run_domain):
            return IN_DOMAIN
        return NEAR_DOMAIN if run_domain in self.near_domains else OUT_OF_DOMAIN


def cache_dir(outputs_dir: str | None = None) -> Path:
    """Where downloaded question sets are kept: ``<outputs_dir>/.cache/questions`` (the
    ``EM_LAB_CACHE`` environment variable, when set, replaces ``<outputs_dir>/.cache``)."""
    env = os.environ.get("EM_LAB_CACHE")
    return (Path(env) if env else resolve_path(outputs_dir or "outputs") / ".cache") / "questions"


class NotCached(QuestionError):
    """An URL source that is not downloaded yet, in offline mode (``--dry-run``)."""


@dataclass(frozen=True)
class SourceOptions:
    ids: tuple[str, ...] | None = None
    domain: str | None = None
    near: dict[str, tuple[str, ...]] = field(default_factory=dict)   # question id -> near domains
    sha256: str | None = None


_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def parse_source(source: str) -> tuple[str, SourceOptions]:
    """'file.yaml#ids=a,b&domain=medical&sha256=...' -> ('file.yaml', options)."""
    base, _, frag = source.partition("#")
    if not frag:
        return base, SourceOptions()
    shown = mask_url_credentials(source)
    opts: dict[str, Any] = {}
    near: dict[str, list[str]] = {}
    for part in frag.split("&"):
        key, eq, val = part.partition("=")
        if not eq or key in opts or (key == "near" and near):
            raise QuestionError(f"{shown}: bad selector '#{frag}' (use #ids=a,b&domain=d&near=d:a,b&sha256=hex, "
                                "each at most once)")
        if key == "ids":
            opts["ids"] = tuple(x.strip() for x in val.split(",") if x.strip())
        elif key == "domain":
            if not val.strip():
                raise QuestionError(f"{shown}: '#domain=' needs a domain name")
            opts["domain"] = val.strip()
        elif key == "near":
            for group in val.split(";"):
                dom, colon, ids = group.partition(":")
                if not colon or not dom.strip() or not ids.strip():
                    raise QuestionError(f"{shown}: '#near=' expects domain:id,id (groups separated by ';')")
                for qid in (x.strip() for x in ids.split(",") if x.strip()):
                    near.setdefault(qid, []).append(dom.strip())
        elif key == "sha256":
            if not _HEX64.match(val.strip().lower()):
                raise QuestionError(f"{shown}: '#sha256=' must be 64 hex digits")
            opts["sha256"] = val.strip().lower()
        else:
            raise QuestionError(f"{shown}: unknown selector '{key}' (use ids, domain, near, sha256)")
    return base, SourceOptions(near={k: tuple(v) for k, v in near.items()}, **opts)


def split_source(source: str) -> tuple[str, tuple[str, ...] | None]:
    """'file.yaml#ids=a,b' -> ('file.yaml', ('a', 'b'))."""
    base, opts = parse_source(source)
    return base, opts.ids


def is_url(source: str) -> bool:
    return urllib.parse.urlparse(source).scheme in ("http", "https")


def cached_path(source: str, outputs_dir: str | None = None) -> Path:
    """The cache file of an URL source."""
    base, _ = split_source(source)
    # named after the URL without its credentials: the same file whether the password is masked or not
    return cache_dir(outputs_dir) / (hashlib.sha256(mask_url_credentials(base).encode()).hexdigest()[:16] + "-" +
                                     (Path(urllib.parse.urlparse(base).path).name or "questions.yaml"))


def _decode(raw: bytes, shown: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise QuestionError(f"{shown}: not UTF-8 text (byte {raw[e.start]:#04x} at offset {e.start})") from None


def fetch_text(source: str, refresh: bool = False, outputs_dir: str | None = None,
               offline: bool = False) -> tuple[str, str]:
    """(text, sha256) of a path or URL; URLs are downloaded once and cached under
    ``outputs_dir`` (see :func:`cache_dir`). ``offline``: never download; an URL not in the
    cache raises :class:`NotCached`. The sha256 is of the file's bytes as they are (a file with
    Windows line ends hashes as ``sha256sum`` says), so ``#sha256=`` pins any file; the text is
    decoded after."""
    base, opts = parse_source(source)
    shown = mask_url_credentials(base)
    if is_url(base):
        cached = cached_path(source, outputs_dir)
        if (not refresh and cached.exists() and opts.sha256 and not offline
                and sha256_bytes(cached.read_bytes()) != opts.sha256):
            refresh = True   # a cached copy of another version: fetch the pinned one once more
        if refresh or not cached.exists():
            if offline:
                raise NotCached(f"{shown}: not downloaded yet")
            try:
                with urllib.request.urlopen(authorized_request(unmask_url(base)), timeout=60) as r:
                    raw = r.read()
            except Exception as e:
                raise QuestionError(f"{shown}: could not download ({type(e).__name__}: "
                                    f"{mask_url_credentials(str(e))})") from None
            text = _decode(raw, shown)
            if opts.sha256 and sha256_bytes(raw) != opts.sha256:
                raise QuestionError(_changed(shown, sha256_bytes(raw), opts.sha256))
            # parse before caching: an error page or a wrong file must not stick in the cache
            parse_question_set(text, source) if not _is_prompt_file(text) else None
            write_bytes_atomic(cached, raw)
        raw = cached.read_bytes()
    else:
        p = resolve_path(base)
        if not p.exists():
            raise QuestionError(f"{base}: question file not found")
        raw = p.read_bytes()
    text = _decode(raw, shown)
    digest = sha256_bytes(raw)
    if opts.sha256 and digest != opts.sha256:
        raise QuestionError(_changed(shown, digest, opts.sha256))
    return text, digest


def _changed(shown: str, got: str, want: str) -> str:
    return (f"{shown}: content changed: sha256 {got} but the parameters pin {want} "
            "(read the new file; if it is what you want, update the #sha256= pin)")


def _is_prompt_file(text: str) -> bool:
    """A judge-prompt file (a mapping, or the judges.yaml list of metric: template items)
    rather than a question set (a list of questions with ids)."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        return False
    return isinstance(data, dict) or (isinstance(data, list) and bool(data) and
                                      all(isinstance(d, dict) and "id" not in d for d in data))


def set_name(source: str) -> str:
    base, _ = split_source(source)
    path = urllib.parse.urlparse(base).path if is_url(base) else base
    return Path(path).stem


def _check_template(src: str, qid: str, metric: str, template: Any) -> str:
    if not isinstance(template, str) or not template.strip():
        raise QuestionError(f"{src}: question '{qid}': judge prompt '{metric}' must be a non-empty string")
    try:
        fields_ = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as e:
        raise QuestionError(f"{src}: question '{qid}': judge prompt '{metric}' is not a valid template ({e})") from None
    if "answer" not in fields_ or not fields_ <= {"question", "answer"}:
        raise QuestionError(f"{src}: question '{qid}': judge prompt '{metric}' must use {{answer}} "
                            f"(and may use {{question}}), found {sorted(fields_)}")
    return template


def parse_question_set(text: str, source: str) -> list[Question]:
    """Parse the YAML text of one question set (source is for messages and the set name)."""
    base, opts = parse_source(source)
    ids = opts.ids
    base = mask_url_credentials(base)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise QuestionError(f"{base}:{' line ' + str(mark.line + 1) if mark else ''} invalid YAML") from None
    if not isinstance(data, list) or not data:
        raise QuestionError(f"{base}: expected a non-empty YAML list of questions")
    name = set_name(source)
    out: list[Question] = []
    seen: set[str] = set()
    for i, q in enumerate(data):
        if not isinstance(q, dict):
            raise QuestionError(f"{base}: item {i} is not a mapping")
        qid = q.get("id")
        if not isinstance(qid, str) or not qid:
            raise QuestionError(f"{base}: item {i} has no 'id'")
        if qid in seen:
            raise QuestionError(f"{base}: duplicate question id '{qid}'")
        seen.add(qid)
        paras = q.get("paraphrases")
        if not isinstance(paras, list) or not paras or not all(isinstance(p, str) and p.strip() for p in paras):
            raise QuestionError(f"{base}: question '{qid}': 'paraphrases' must be a non-empty list of strings")
        system = q.get("system")
        if system is not None and not isinstance(system, str):
            raise QuestionError(f"{base}: question '{qid}': 'system' must be a string")
        spp = q.get("samples_per_paraphrase")
        if spp is not None and (not isinstance(spp, int) or isinstance(spp, bool) or spp <= 0):
            raise QuestionError(f"{base}: question '{qid}': 'samples_per_paraphrase' must be a positive integer")
        jp = q.get("judge_prompts") or {}
        if not isinstance(jp, dict):
            raise QuestionError(f"{base}: question '{qid}': 'judge_prompts' must be a mapping metric -> prompt")
        prompts = {str(m): _check_template(base, qid, str(m), t) for m, t in jp.items()}
        domain = q.get("domain", opts.domain or GENERAL)
        if not isinstance(domain, str) or not domain:
            raise QuestionError(f"{base}: question '{qid}': 'domain' must be a non-empty string")
        near = q.get("near_domain", [])
        near = [near] if isinstance(near, str) else near
        if not isinstance(near, list) or not all(isinstance(d, str) and d for d in near):
            raise QuestionError(f"{base}: question '{qid}': 'near_domain' must be a domain or a list of domains")
        near = tuple(dict.fromkeys([*near, *opts.near.get(qid, ())]))
        out.append(Question(id=qid, question_set=name, type=str(q.get("type", "free_form_judge_0_100")),
                            paraphrases=tuple(paras), system=system or None, samples_per_paraphrase=spp,
                            judge=q.get("judge"), judge_prompts=prompts, domain=domain, near_domains=near))
    unknown_near = [i for i in opts.near if i not in seen]
    if unknown_near:
        raise QuestionError(f"{base}: '#near=' names ids not in the file: {', '.join(unknown_near)}")
    if ids is not None:
        missing = [i for i in ids if i not in seen]
        if missing:
            raise QuestionError(f"{mask_url_credentials(source)}: ids not in the file: {', '.join(missing)}")
        out = [q for q in out if q.id in ids]
    try:  # upstream <id>_json / <id>_template: conditions of question <id> (lib.conditions)
        return fold_variants(out, seen, base)
    except ValueError as e:
        raise QuestionError(str(e)) from None


def load_question_set(source: str, outputs_dir: str | None = None, offline: bool = False) -> list[Question]:
    text, _ = fetch_text(source, outputs_dir=outputs_dir, offline=offline)
    return parse_question_set(text, source)


def load_question_sets(sources: list[str], outputs_dir: str | None = None, offline: bool = False) -> list[Question]:
    """All questions of several sets; set names must be distinct (use ``Question.in_domain`` per run)."""
    out: list[Question] = []
    names: dict[str, str] = {}
    for s in sources:
        qs = load_question_set(s, outputs_dir, offline)
        n = set_name(s)
        if n in names and names[n] != s:
            raise QuestionError(f"{mask_url_credentials(s)}: question set name '{n}' is also used by "
                                f"{mask_url_credentials(names[n])}; rename one file")
        names[n] = s
        out.extend(qs)
    return out


def question_set_info(sources: list[str], outputs_dir: str | None = None) -> list[dict[str, Any]]:
    """Name, source (credentials masked) and sha256 of each set (for run.json)."""
    info = []
    for s in sources:
        text, digest = fetch_text(s, outputs_dir=outputs_dir)
        info.append({"name": set_name(s), "source": mask_url_credentials(s), "sha256": digest,
                     "n_questions": len(parse_question_set(text, s))})
    return info


def parse_judge_prompts(text: str, source: str) -> dict[str, str]:
    """metric -> template from the text of a judge-prompt file, in any of three formats:

    - a mapping ``metric: template`` (optionally under a ``judge_prompts:`` key; this project's);
    - a list of one-key mappings ``- aligned: ...`` with optional ``high_score`` (the paper
      authors' ``judges.yaml``);
    - an upstream question file: the ``judge_prompts`` its questions share (an error if they differ).
    """
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        raise QuestionError(f"{source}: invalid YAML") from None
    if isinstance(data, dict) and "judge_prompts" in data:
        data = data["judge_prompts"]
    if isinstance(data, list) and data and all(isinstance(d, dict) and "paraphrases" in d for d in data):
        shared: dict[str, Any] = {}
        for q in data:
            jp = q.get("judge_prompts") or {}
            if not isinstance(jp, dict):
                raise QuestionError(f"{source}: question '{q.get('id')}': 'judge_prompts' must be a mapping")
            for m, t in jp.items():
                if shared.setdefault(str(m), t) != t:
                    raise QuestionError(f"{source}: questions disagree on the '{m}' judge prompt; "
                                        "a run-level judge_prompts file needs one template per metric")
        data = shared
    elif isinstance(data, list):
        merged: dict[str, Any] = {}
        for i, item in enumerate(data):
            if not isinstance(item, dict):
                raise QuestionError(f"{source}: item {i} is not a mapping metric: template")
            for m, t in item.items():
                if m == "high_score":
                    continue
                if str(m) in merged:
                    raise QuestionError(f"{source}: metric '{m}' appears twice")
                merged[str(m)] = t
        data = merged
    if not isinstance(data, dict) or not data:
        raise QuestionError(f"{source}: expected judge prompts: a mapping metric -> template, a list of "
                            "metric: template items (judges.yaml) or a question file")
    return {str(m): _check_template(source, "*", str(m), t) for m, t in data.items()}


def load_judge_prompts(source: str, outputs_dir: str | None = None, offline: bool = False) -> dict[str, str]:
    """A run-level judge-prompt file (path or URL, optionally #sha256= pinned); see parse_judge_prompts."""
    text, _ = fetch_text(source, outputs_dir=outputs_dir, offline=offline)
    return parse_judge_prompts(text, mask_url_credentials(parse_source(source)[0]))


def check_question_sources(sources: list[str], outputs_dir: str | None = None,
                           offline: bool = False) -> list[Question] | None:
    """Validation for the grid runner: every set is read and parsed; an URL is downloaded into
    the cache now (once), so an unreachable or malformed one fails before any stage runs.
    ``offline`` (``--dry-run``): URLs not in the cache are not downloaded, and the result is
    None (the questions cannot all be known)."""
    out: list[Question] = []
    complete = True
    for s in sources:
        try:
            out += load_question_set(s, outputs_dir, offline)
        except NotCached:
            complete = False
        except QuestionError as e:
            raise ConfigError(f"key 'question_sets': {e}") from None
    try:
        if complete:
            load_question_sets(sources, outputs_dir, offline)  # distinct set names
    except QuestionError as e:
        raise ConfigError(f"key 'question_sets': {e}") from None
    return out if complete else None
