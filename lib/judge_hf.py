"""The judge in this process: :class:`HFBackend`, a transformers model loaded with
:func:`lib.models.load_model`, with the exact method's memory planning and the content fingerprint
that names a local judge in the cache key. It satisfies :class:`lib.judge_protocol.JudgeBackend`;
:mod:`lib.judge_backends` picks it for ``judge_backend: hf``. Methods:

* ``exact``: for each prompt, the chat-templated prompt is run once (KV cache kept); then the
  103 candidate replies ("0".."100", "CODE", "REFUSAL", each as the tokenizer encodes it right
  after the prompt) are scored in one batch on top of that cache. A candidate's log
  probability is the sum of its tokens' log probabilities plus the log probability of ending
  the turn after it (the sum over the model's end-of-turn / eos tokens). So "100" split into
  "1","0","0" gets P(1) P(0|1) P(0|10) P(end|100), and "10" does not steal the mass of "100".
  Only the tokenizer's own (canonical) tokenisation of each candidate is scored. The
  candidate log probabilities are then aggregated exactly like first-token logprobs by
  :func:`lib.scoring.label_from_logprobs` (mean over numeric candidates weighted by probability,
  divided by their total probability; None below 0.25).
* ``logprob``: the first token's top-20 log probabilities (the papers' rule, applied to a
  local model; with a digit-splitting tokenizer it cannot see numbers above 9).
* ``sampled``: a generated reply (``judge_temperature``, seeded), parsed by
  :func:`lib.scoring.parse_sampled` as the API judge's replies are.

``torch`` is imported inside the functions that run the model: importing the judge stage (and
judging through an API) must not load it.
"""
from __future__ import annotations

import copy
import hashlib
import inspect
import json
import logging
import math
from pathlib import Path
from typing import Any

from .chat import chat_prompt, stop_token_ids
from .config import RunConfig
from .costs import Budget
from .io import sha256_text
from .judge_protocol import Sink, progress_bar
from .models import (dtype_bytes, free_memory_bytes, is_out_of_memory, kv_bytes_per_token, load_model,
                     load_tokenizer, resolve_model)
from .scoring import (CANDIDATES, MIN_MASS, SAMPLED_MAX_TOKENS, TOP_LOGPROBS, Job, JudgeError, Verdict,
                      label_from_logprobs, parse_sampled)

log = logging.getLogger(__name__)

FINGERPRINT_SAMPLES = 256      # evenly spaced chunks read from each weight file
FINGERPRINT_CHUNK = 4096       # bytes per chunk (256 x 4 KiB = 1 MiB per file, whatever its size)
FINGERPRINT_TEXT_FILES = ("config.json", "generation_config.json", "tokenizer_config.json", "chat_template.jinja")


def _weights_sample_sha(path: Path) -> str:
    """sha256 of evenly spaced chunks of a weight file: cheap for a 16 GB model, and it changes
    when the weights do (retrained or fine-tuned weights of the same shapes have the same size)."""
    size = path.stat().st_size
    h = hashlib.sha256()
    with path.open("rb") as f:
        for i in range(FINGERPRINT_SAMPLES):
            f.seek(size * i // FINGERPRINT_SAMPLES)
            h.update(f.read(FINGERPRINT_CHUNK))
        f.seek(max(0, size - FINGERPRINT_CHUNK))
        h.update(f.read(FINGERPRINT_CHUNK))
    return h.hexdigest()


def local_fingerprint(name: str) -> str:
    """What identifies an in-process judge for the cache: for a local (or embedded) folder,
    sha256 of its config, generation config and chat template files plus the size and a
    content sample of each weight file; for a hub id, the id."""
    resolved = Path(resolve_model(name))
    if not resolved.exists():
        return name
    parts = [(resolved / "config.json").read_text(encoding="utf-8") if (resolved / "config.json").exists() else ""]
    for fname in FINGERPRINT_TEXT_FILES[1:]:
        if (resolved / fname).exists():
            parts.append(f"{fname}:{sha256_text((resolved / fname).read_text(encoding='utf-8'))}")
    for p in sorted(resolved.glob("*.safetensors")) + sorted(resolved.glob("*.bin")):
        parts.append(f"{p.name}:{p.stat().st_size}:{_weights_sample_sha(p)}")
    return sha256_text("\n".join(parts))


class HFBackend:
    """A transformers judge in this process, by the exact, logprob or sampled method (module docstring)."""

    max_output_tokens: int  # 0 (exact: nothing is generated), 1 (logprob) or SAMPLED_MAX_TOKENS (sampled)
    status: list[dict[str, Any]] | None = None  # no remote jobs: every call ends inside run()

    BATCH = 8  # prompts per forward pass for logprob / sampled
    # exact: each (prompt, candidate) row of the candidate pass holds a copy of its prompt's KV cache
    # and the candidate's log-probabilities over the whole vocabulary; rows per pass are chosen so
    # that their bytes (exact_row_bytes: from the model's layers, KV heads, head size, vocabulary
    # and dtype) stay under a budget. CPU: at most EXACT_CPU_BYTES (larger passes are no faster on
    # a CPU, only larger); CUDA: a share of free GPU memory. Halved on out-of-memory.
    EXACT_CPU_BYTES = 1 << 30
    EXACT_MEMORY_FRACTION = 0.5

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.model_name = cfg.judge_model
        self.method = cfg.judge_method
        self.max_output_tokens = {"exact": 0, "logprob": 1}.get(self.method, SAMPLED_MAX_TOKENS)
        self.model = self.tok = None
        self._identity: dict[str, Any] | None = None

    def settings(self) -> dict[str, Any]:
        s: dict[str, Any] = {"dtype": self.cfg.dtype}
        if self.method == "exact":
            s.update(candidates="0..100,CODE,REFUSAL", then="end_of_turn")
        elif self.method == "logprob":
            s.update(top_logprobs=TOP_LOGPROBS)
        else:
            s.update(max_tokens=SAMPLED_MAX_TOKENS, temperature=float(self.cfg.judge_temperature), seed=self.cfg.seed)
        return s

    def identity(self) -> dict[str, Any]:
        if self._identity is None:
            self._identity = {"backend": "hf", "model": self.model_name,
                              "fingerprint": local_fingerprint(self.model_name),
                              "method": self.method, "settings": self.settings()}
        return self._identity

    def price_note(self) -> str:
        return "in-process judge: no API cost"

    def estimate_cost(self, input_tokens: int, output_tokens: int) -> float | None:
        return 0.0

    def load(self) -> None:
        if self.model is None:
            self.tok = load_tokenizer(self.model_name, padding_side="left")
            self.model, _ = load_model(self.model_name, device=self.cfg.device, dtype=self.cfg.dtype)

    def run(self, jobs: list[Job], sink: Sink, budget: Budget, progress: bool) -> None:
        self.load()
        bar = progress_bar(len(jobs), progress, f"judge {self.model_name} ({self.method})", self.cfg.run_dir)
        try:
            if self.method == "exact":
                cands = candidate_token_ids(self.tok)
                stops = stop_token_ids(self.tok, self.model)
                if not stops:
                    raise JudgeError("judge model has no end-of-turn (eos) token: the exact method cannot score "
                                     "candidates")
                self._run_exact(jobs, cands, stops, sink, bar)
            else:
                for i in range(0, len(jobs), self.BATCH):
                    batch = jobs[i:i + self.BATCH]
                    for job, v in zip(batch, self._verdicts_batch(batch)):
                        sink(job, v)
                        bar.update(1)
        finally:
            bar.close()

    def exact_budget_bytes(self) -> int:
        """Bytes the exact method's passes may use beyond the loaded model (see the class comment)."""
        device = self.model.device.type
        free = free_memory_bytes(device)
        if device == "cuda" and free is not None:
            return int(self.EXACT_MEMORY_FRACTION * free)
        cap = self.EXACT_CPU_BYTES
        return cap if free is None else int(min(cap, self.EXACT_MEMORY_FRACTION * free))

    def _run_exact(self, jobs: list[Job], cands: dict[str, list[int]], stops: list[int], sink: Sink, bar: Any) -> None:
        """Score every job; on out-of-memory halve the byte budget and re-plan what is left."""
        width = max(len(c) for c in cands.values())
        lengths = {j.key: len(self.tok(self._prompt_text(j.prompt), add_special_tokens=False).input_ids)
                   for j in jobs}
        budget = self.exact_budget_bytes()
        todo = list(jobs)
        while todo:
            plan = exact_plan(self.model, [lengths[j.key] for j in todo], len(cands), width, budget)
            finished: set[int] = set()
            for idx, chunk in plan:
                batch = [todo[i] for i in idx]
                try:
                    verdicts = self._verdicts_exact(batch, cands, stops, chunk)
                except RuntimeError as e:
                    if not is_out_of_memory(e) or (len(batch) == 1 and chunk == 1):
                        raise
                    if self.model.device.type == "cuda":
                        import torch  # lazy: importing the judge stage must not load torch
                        torch.cuda.empty_cache()
                    budget //= 2
                    log.warning("out of memory: exact judge budget lowered to %.2f GB", budget / 1e9)
                    break
                for job, v in zip(batch, verdicts):
                    sink(job, v)
                    bar.update(1)
                finished.update(idx)
            todo = [j for i, j in enumerate(todo) if i not in finished]

    def _prompt_text(self, prompt: str) -> str:
        return chat_prompt(self.tok, prompt)

    def _verdicts_exact(self, batch: list[Job], cands: dict[str, list[int]], stops: list[int],
                        chunk: int = 0) -> list[Verdict]:
        texts = [self._prompt_text(j.prompt) for j in batch]
        out = []
        for text, lps in zip(texts, exact_candidate_logprobs(self.model, self.tok, texts, cands, stops, chunk)):
            score, label, mass = label_from_logprobs(lps, MIN_MASS)
            out.append(Verdict(score=score, label=label, raw=json.dumps({k: round(v, 6) for k, v in lps.items()}),
                               prob_mass=mass, input_tokens=len(self.tok(text, add_special_tokens=False).input_ids),
                               output_tokens=0, cost_usd=0.0, judge_model=self.model_name, finish_reason=None))
        return out

    def _verdicts_batch(self, batch: list[Job]) -> list[Verdict]:
        import torch  # lazy: importing the judge stage must not load torch

        texts = [self._prompt_text(j.prompt) for j in batch]
        enc = self.tok(texts, add_special_tokens=False, return_tensors="pt", padding=True).to(self.model.device)
        n_in = enc["attention_mask"].sum(dim=1).tolist()
        out: list[Verdict] = []
        with torch.no_grad():
            if self.method == "logprob":
                logits = self.model(**enc).logits[:, -1].float()
                lp = torch.log_softmax(logits, dim=-1)
                vals, ids = lp.topk(TOP_LOGPROBS, dim=-1)
                for b in range(len(batch)):
                    top: dict[str, float] = {}
                    for v, i in zip(vals[b].tolist(), ids[b].tolist()):
                        t = self.tok.decode([i])
                        top[t] = v if t not in top else math.log(math.exp(top[t]) + math.exp(v))
                    score, label, mass = label_from_logprobs(top, MIN_MASS)
                    out.append(Verdict(score=score, label=label, raw=json.dumps(top, ensure_ascii=False),
                                       prob_mass=mass, input_tokens=int(n_in[b]), output_tokens=1, cost_usd=0.0,
                                       judge_model=self.model_name, finish_reason="length"))
            else:
                temp = float(self.cfg.judge_temperature)
                torch.manual_seed(self.cfg.seed)
                gen = self.model.generate(**enc, max_new_tokens=SAMPLED_MAX_TOKENS, do_sample=temp > 0,
                                          temperature=temp if temp > 0 else None, top_p=None, top_k=None,
                                          pad_token_id=self.tok.pad_token_id)
                new = gen[:, enc["input_ids"].shape[1]:]
                stops = set(stop_token_ids(self.tok, self.model))
                for b in range(len(batch)):
                    ids = new[b].tolist()
                    ended = any(i in stops for i in ids)
                    text = self.tok.decode(ids, skip_special_tokens=True)
                    score, label = parse_sampled(text)
                    n_out = next((k + 1 for k, i in enumerate(ids) if i in stops), len(ids))
                    out.append(Verdict(score=score, label=label, raw=text, prob_mass=None, input_tokens=int(n_in[b]),
                                       output_tokens=n_out, cost_usd=0.0, judge_model=self.model_name,
                                       finish_reason="stop" if ended else "length"))
        return out


def candidate_token_ids(tok: Any, candidates: tuple[str, ...] = CANDIDATES) -> dict[str, list[int]]:
    """Token ids of each candidate reply as the tokenizer encodes it right after a chat prompt
    (so a tokenizer that merges across the boundary or adds a leading space is respected)."""
    probe = chat_prompt(tok, "Rate this.")
    base = tok(probe, add_special_tokens=False).input_ids
    out: dict[str, list[int]] = {}
    for c in candidates:
        full = tok(probe + c, add_special_tokens=False).input_ids
        ids = full[len(base):] if full[:len(base)] == base else tok(c, add_special_tokens=False).input_ids
        if not ids:
            raise JudgeError(f"judge tokenizer encodes candidate {c!r} as no tokens")
        out[c] = list(ids)
    return out


def _cache_kw(model: Any) -> str:
    """The forward() keyword for a KV cache: ``cache`` in recent transformers, else ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def exact_row_bytes(model: Any, prompt_len: int, width: int) -> int:
    """Bytes one (prompt, candidate) row of the exact method's candidate pass holds at its peak.

    Its copy of the prompt's KV cache plus the candidate's own positions (kv_bytes_per_token each),
    the candidate positions' logits over the vocabulary three times (the model's output in its
    dtype, a float32 copy, the float32 log-softmax), and one layer's activations for the
    candidate positions. SmolLM2-135M on CPU, 250-token prompt, 3-token candidates:
    45 KiB x 253 = 11.7 MB of KV + 3 x 49,152 x 12 B = 1.8 MB of logits per row."""
    c = getattr(model.config, "text_config", model.config)
    nbytes = dtype_bytes(model)
    kv = kv_bytes_per_token(model) * (prompt_len + width)
    logits = width * c.vocab_size * (nbytes + 4 + 4)
    act = width * (4 * c.hidden_size + 2 * c.intermediate_size) * nbytes
    return kv + logits + act


def exact_prefill_bytes(model: Any, prompt_len: int) -> int:
    """Bytes one prompt of the exact method's prompt pass holds: its KV cache, one layer's
    activations and attention scores, and the last position's float32 log-softmax."""
    c = getattr(model.config, "text_config", model.config)
    nbytes = dtype_bytes(model)
    act = prompt_len * (4 * c.hidden_size + 2 * c.intermediate_size) * nbytes
    scores = c.num_attention_heads * prompt_len * prompt_len * 4
    return kv_bytes_per_token(model) * prompt_len + act + scores + 2 * c.vocab_size * 4


def exact_plan(model: Any, lengths: list[int], n_cands: int, width: int, budget: int) -> list[tuple[list[int], int]]:
    """Passes of the exact method within ``budget`` bytes: (indices into ``lengths``, candidates
    per sub-pass; 0 for all at once). Prompts are grouped by similar length; a prompt whose
    candidates do not all fit at once is scored alone, its candidates split into sub-passes
    that each reuse its KV cache."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    plan: list[tuple[list[int], int]] = []
    cur: list[int] = []
    for i in order:
        longest = lengths[i]  # sorted: the newest prompt is the longest of the pass
        row = exact_row_bytes(model, longest, width)
        pre = exact_prefill_bytes(model, longest)
        if n_cands * row + pre > budget:  # not even this prompt's candidates fit at once
            if cur:
                plan.append((cur, 0))
                cur = []
            plan.append(([i], max(1, min(n_cands, (budget - pre) // row))))
            continue
        if cur and (len(cur) + 1) * (n_cands * row + pre) > budget:
            plan.append((cur, 0))
            cur = []
        cur.append(i)
    return plan + ([(cur, 0)] if cur else [])


def exact_candidate_logprobs(model: Any, tok: Any, prompt_texts: list[str], candidates: dict[str, list[int]],
                             stops: list[int], chunk: int = 0) -> list[dict[str, float]]:
    """log P(candidate, then end of turn | prompt) for every candidate and prompt, by teacher forcing.

    The B prompts run once, left-padded; their KV cache is repeated for the candidates, which
    are right-padded and fed as B x C rows on top of it (``chunk`` > 0: C = ``chunk`` candidates
    per sub-pass, each on a fresh copy of the prompt cache, so memory follows ``chunk`` instead of
    the number of candidates). Position ids follow each prompt's real length, and padding only
    ever sits where causal attention cannot let it change a real token's probability (prompt
    padding is masked, candidate padding comes after every real candidate token)."""
    import torch  # lazy: importing the judge stage must not load torch

    device = model.device
    names, cands = list(candidates), list(candidates.values())
    enc = tok(prompt_texts, add_special_tokens=False, return_tensors="pt", padding=True)
    ids, pmask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
    if tok.padding_side != "left" and not bool(pmask[:, -1].all()):
        raise JudgeError("exact judging needs a left-padding tokenizer")
    n_b = ids.shape[0]
    ppos = (pmask.cumsum(-1) - 1).clamp(min=0)
    pad = tok.pad_token_id if tok.pad_token_id is not None else stops[0]
    kw = _cache_kw(model)
    stop_idx = torch.tensor(stops, device=device)
    step = chunk if chunk > 0 else len(cands)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=pmask, position_ids=ppos, use_cache=True, logits_to_keep=1)
        first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # (B, V): P(first token | prompt)
        prompt_cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
        del out
        totals = []
        for c0 in range(0, len(cands), step):
            part = cands[c0:c0 + step]
            n_c, width = len(part), max(len(c) for c in part)
            cand = torch.full((n_c, width), pad, dtype=torch.long, device=device)
            for i, c in enumerate(part):
                cand[i, :len(c)] = torch.tensor(c, device=device)
            # the last sub-pass may take the prompt cache itself; earlier ones work on a copy
            cache = prompt_cache if c0 + step >= len(cands) else copy.deepcopy(prompt_cache)
            cache.batch_repeat_interleave(n_c)  # row b*C + c continues prompt b
            inp = cand.repeat(n_b, 1)  # (B*C, width)
            mask = torch.cat([pmask.repeat_interleave(n_c, dim=0),
                              torch.ones((n_b * n_c, width), dtype=pmask.dtype, device=device)], dim=1)
            start = pmask.sum(-1).repeat_interleave(n_c).unsqueeze(1)  # real prompt length per row
            pos = start + torch.arange(width, device=device).unsqueeze(0)
            logits = model(input_ids=inp, attention_mask=mask, position_ids=pos, use_cache=True, **{kw: cache}).logits
            del cache
            lp = torch.log_softmax(logits.float(), dim=-1).view(n_b, n_c, width, -1)
            del logits
            lens = torch.tensor([len(c) for c in part], device=device)
            # sum over each candidate's tokens after the first: lp[b, c, j-1, token_j] for 1 <= j < len
            nxt = torch.gather(lp[:, :, :-1, :], 3, cand[:, 1:].expand(n_b, -1, -1).unsqueeze(-1)).squeeze(-1) \
                if width > 1 else torch.zeros((n_b, n_c, 0), device=device)
            keep = (torch.arange(1, width, device=device).unsqueeze(0) < lens.unsqueeze(1)).float()  # (C, width-1)
            total = first[:, cand[:, 0]] + (nxt * keep).sum(-1)
            end = torch.logsumexp(lp[:, torch.arange(n_c, device=device), lens - 1][:, :, stop_idx], dim=-1)  # (B, C)
            totals.append(total + end)
            del lp
        total = torch.cat(totals, dim=1).cpu().tolist()
    return [dict(zip(names, row)) for row in total]
