"""Decoding for the evaluate stage: continuous batching over a model's forward steps, and a
seeded sampler whose random draws belong to each answer.

Why continuous batching
    A static batch (``model.generate`` on B prompts) runs until its longest answer ends; every
    row that stopped earlier still occupies a decode slot. Answers at temperature 1 with a
    600-token cap end at very different lengths, so much of a static batch's work is spent on
    finished rows. :class:`ContinuousDecoder` keeps B slots busy instead: when rows finish, the
    next prompts are prefilled and spliced into the freed rows of the running KV cache, and once
    no prompt is left, finished rows are dropped from the batch.

How the cache is kept
    One ``transformers.DynamicCache`` for the running batch (the model's own cache class, used
    through its public per-layer ``keys``/``values`` tensors) and one 2-D attention mask over its
    columns. New prompts are prefilled as a left-padded batch of their own, then written into
    freed rows so that every row's newest token sits in the last column; each row attends only to
    its own columns (mask) and gets explicit position ids, so a row's tokens see exactly what
    they would see alone. Columns no live row uses are trimmed from the left.

Why a sampler of our own
    ``generate``'s sampler draws from one global random stream, so an answer depends on which
    other answers share its batch and in what order they were scheduled. :class:`TokenPicker`
    applies the same sampling rules (the model's logits, then minimum length, temperature,
    top-p via transformers' own ``TopPLogitsWarper``; top-k off) and draws each token by
    inverse-CDF sampling with one uniform number that is a function of (the answer's seed, the
    token's index): the same distribution as ``torch.multinomial``, and an answer that depends
    only on its seed, whatever the batch size, scheduling, refills or restarts. The static
    sampler (``model.generate`` with :class:`SeededLogitsProcessor`) uses the same picker, so
    static and continuous batching give the same answers up to floating-point differences
    between batch shapes.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from .models import is_out_of_memory

log = logging.getLogger(__name__)

# What makes sampled answers reproducible; part of the evaluate stage's fingerprint, so a change
# of sampler regenerates instead of mixing two schemes in one run.
SAMPLER_VERSION = "per-answer inverse-CDF, splitmix64 uniforms, v1"

REFILL_AT = 1 / 16   # prefill new prompts once this share of the slots is free (fewer, larger prefills)
COMPACT_AT = 1 / 8   # with no prompt left, drop finished rows once they are this share of the batch
TRIM_EVERY = 16      # decode steps between checks for cache columns no live row uses


# ------------------------------------------------------------------------------------------
# Seeds and uniforms
# ------------------------------------------------------------------------------------------

def answer_seed(*parts: Any) -> int:
    """A 64-bit seed from the identity of one answer (e.g. run seed, step, question, paraphrase, sample)."""
    return int.from_bytes(hashlib.sha256(json.dumps(parts, default=str).encode()).digest()[:8], "big")


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's output function (Steele, Lea & Flood 2014) on uint64 arrays (arithmetic mod 2**64)."""
    with np.errstate(over="ignore"):
        z = x + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def uniforms(seeds, token_index) -> np.ndarray:
    """One uniform number in (0, 1) per (seed, token index), 53 random bits, float64."""
    s = np.asarray(seeds, dtype=np.uint64)
    t = np.asarray(token_index, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = _splitmix64(_splitmix64(s) ^ (t * _GOLDEN + np.uint64(1)))
    return ((z >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0 ** -53


# ------------------------------------------------------------------------------------------
# Token picking (the sampling rules)
# ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TokenPicker:
    """Next tokens from a batch of last-position logits, by the papers' plain sampling rules.

    temperature 0 is greedy (argmax). Otherwise: stop tokens masked while fewer than
    ``min_new_tokens`` tokens exist (transformers' MinNewTokensLength rule), logits divided by
    the temperature, top-p (nucleus) filtering by transformers' ``TopPLogitsWarper`` when
    top_p < 1, then one draw per row from softmax by inverse CDF with the row's uniform.
    """
    temperature: float
    top_p: float
    stop_ids: tuple[int, ...]
    min_new_tokens: int = 0

    def __call__(self, logits, seeds, n_generated) -> Any:
        """logits [rows, vocab]; seeds and n_generated (tokens each row already has) per row."""
        import torch  # heavy: loaded only when a model runs

        scores = logits.float()
        n_gen = np.asarray(n_generated, dtype=np.int64)
        if self.min_new_tokens and self.stop_ids and (n_gen < self.min_new_tokens).any():
            young = torch.as_tensor(n_gen < self.min_new_tokens, device=scores.device)
            stop = torch.as_tensor(list(self.stop_ids), device=scores.device)
            scores[young.nonzero()[:, :1], stop[None, :]] = float("-inf")
        if self.temperature <= 0:
            return scores.argmax(dim=-1)
        scores = scores / self.temperature
        if self.top_p < 1.0:
            from transformers import TopPLogitsWarper  # heavy: loaded only when a model runs

            scores = TopPLogitsWarper(top_p=self.top_p)(None, scores)
        cdf = torch.softmax(scores, dim=-1).double().cumsum(dim=-1)
        u = torch.as_tensor(uniforms(seeds, n_gen), device=scores.device)
        # token i is drawn when cdf[i-1] < u * total <= cdf[i]: a zero-probability token has an empty interval
        x = (u * cdf[:, -1]).unsqueeze(1)
        return torch.searchsorted(cdf, x).squeeze(1).clamp_max(scores.shape[-1] - 1)


class SeededLogitsProcessor:
    """For ``model.generate`` with ``do_sample=False``: replaces each row's scores by a one-hot at
    the token :class:`TokenPicker` draws for it, so greedy decoding emits exactly that token.
    Rows are the batch's prompts in order; ``prompt_len`` is the padded prompt length."""

    def __init__(self, picker: TokenPicker, seeds: list[int], prompt_len: int):
        self.picker, self.seeds, self.prompt_len = picker, list(seeds), prompt_len

    def __call__(self, input_ids, scores):
        import torch  # heavy: loaded only when a model runs

        n = input_ids.shape[1] - self.prompt_len
        tokens = self.picker(scores, self.seeds, [n] * len(self.seeds))
        out = torch.full_like(scores, float("-inf"))
        out[torch.arange(scores.shape[0], device=scores.device), tokens] = 0.0
        return out


# ------------------------------------------------------------------------------------------
# Continuous batching
# ------------------------------------------------------------------------------------------

@dataclass
class Answer:
    tokens: list[int]            # generated tokens, the stop token (if any) included
    finish_reason: str           # "stop" or "length"


@dataclass
class DecodeStats:
    """Where the token-producing slots went. A prefill produces one token per prompt (all
    useful); a decode step produces one per row, useful only for rows still answering."""
    decode_steps: int = 0
    prefills: int = 0
    prefill_prompts: int = 0
    slot_tokens: int = 0         # rows x forward passes that produced a next token
    useful_tokens: int = 0       # of those, tokens that belong to an unfinished answer

    @property
    def idle_fraction(self) -> float:
        return 1 - self.useful_tokens / self.slot_tokens if self.slot_tokens else 0.0

    def add(self, other: "DecodeStats") -> None:
        for f in ("decode_steps", "prefills", "prefill_prompts", "slot_tokens", "useful_tokens"):
            setattr(self, f, getattr(self, f) + getattr(other, f))


def _model_kwargs(model) -> tuple[str, bool]:
    """(name of the cache argument, whether logits_to_keep is accepted) of the model under any wrapper."""
    inner = model
    for attr in ("get_base_model",):  # peft
        if hasattr(inner, attr):
            inner = getattr(inner, attr)()
    params = inspect.signature(inner.forward).parameters
    cache_kw = "cache" if "cache" in params else "past_key_values"
    return cache_kw, "logits_to_keep" in params


def _new_cache():
    from transformers import DynamicCache  # heavy: loaded only when a model runs

    return DynamicCache()


def cache_layers(cache) -> list:
    """The per-layer objects holding ``keys`` and ``values`` [batch, heads, columns, head_dim]."""
    layers = getattr(cache, "layers", None)
    if layers is None or any(not hasattr(layer, "keys") for layer in layers):
        raise TypeError(f"{type(cache).__name__}: no per-layer keys/values (transformers too old?)")
    return layers


def _prefill(model, input_ids, attention_mask, position_ids, cache_kw: str, keep_last: bool):
    """One forward pass over new, left-padded prompts with a fresh cache: (last-position logits, cache).
    Tests wrap this to see the exact prompt tokens."""
    cache = _new_cache()
    kw = {cache_kw: cache}
    if keep_last:
        kw["logits_to_keep"] = 1
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                use_cache=True, **kw)
    return out.logits[:, -1, :], cache


@dataclass
class ContinuousDecoder:
    """Continuous batching over ``slots`` rows (see the module docstring).

    ``run(prompts, seeds)`` returns one :class:`Answer` per prompt, in order. On CUDA
    out-of-memory the slots are halved and the unfinished answers restarted; as every token is
    drawn from its answer's own seed, a restarted answer is the same answer.
    """
    model: Any
    picker: TokenPicker
    pad_id: int
    max_new_tokens: int
    slots: int
    refill_at: float = REFILL_AT
    compact_at: float = COMPACT_AT
    stats: DecodeStats = field(default_factory=DecodeStats)

    def run(self, prompts: list[list[int]], seeds: list[int],
            on_done: Callable[[int, Answer], None] | None = None) -> list[Answer]:
        import torch  # heavy: loaded only when a model runs

        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        answers: dict[int, Answer] = {}

        def done(i: int, a: Answer) -> None:
            answers[i] = a
            if on_done is not None:
                on_done(i, a)

        while len(answers) < len(prompts):
            todo = [i for i in range(len(prompts)) if i not in answers]
            try:
                with torch.inference_mode():
                    self._run(prompts, seeds, todo, done)
            except RuntimeError as e:
                if not is_out_of_memory(e) or self.slots == 1:
                    raise
                torch.cuda.empty_cache()
                self.slots = max(1, self.slots // 2)
                log.warning("out of memory: %d unfinished answers restart with %d slots",
                            len(prompts) - len(answers), self.slots)
        return [answers[i] for i in range(len(prompts))]

    # -- the scheduler ----------------------------------------------------------------------
    def _run(self, prompts, seeds, todo: list[int], done) -> None:
        import torch  # heavy: loaded only when a model runs

        device = next(self.model.parameters()).device
        cache_kw, keep_last = _model_kwargs(self.model)
        stop = set(self.picker.stop_ids)
        queue = deque(todo)
        cache = None
        mask = torch.zeros((0, 0), dtype=torch.long, device=device)
        req: list[int | None] = []        # request index per row, None for a free row
        gen: list[list[int]] = []         # tokens generated so far per row
        pos = torch.zeros(0, dtype=torch.long, device=device)    # position id of each row's next token
        last = torch.zeros(0, dtype=torch.long, device=device)   # token each row feeds next

        def finish(row: int) -> None:
            toks = gen[row]
            done(req[row], Answer(toks, "stop" if toks[-1] in stop else "length"))
            req[row] = None
            mask[row] = 0  # the row sees only columns added from now on (finite values, never used)

        def ended(toks: list[int]) -> bool:
            return toks[-1] in stop or len(toks) >= self.max_new_tokens

        while queue or any(r is not None for r in req):
            free = [r for r, q in enumerate(req) if q is None]
            n_active = len(req) - len(free)
            room = len(free) + (self.slots - len(req))
            if queue and room and (n_active == 0 or room >= max(1, int(self.refill_at * self.slots))):
                new = [queue.popleft() for _ in range(min(room, len(queue)))]
                # -- prefill the new prompts as one left-padded batch ----------------------------
                width = max(len(prompts[i]) for i in new)
                ids = torch.full((len(new), width), self.pad_id, dtype=torch.long)
                pmask = torch.zeros((len(new), width), dtype=torch.long)
                for k, i in enumerate(new):
                    ids[k, width - len(prompts[i]):] = torch.tensor(prompts[i])
                    pmask[k, width - len(prompts[i]):] = 1
                ids, pmask = ids.to(device), pmask.to(device)
                ppos = (pmask.cumsum(-1) - 1).clamp_min(0)
                logits, pcache = _prefill(self.model, ids, pmask, ppos, cache_kw, keep_last)
                first = self.picker(logits, [seeds[i] for i in new], [0] * len(new))
                self.stats.prefills += 1
                self.stats.prefill_prompts += len(new)
                self.stats.slot_tokens += len(new)
                self.stats.useful_tokens += len(new)
                # -- splice into the running batch: freed rows first, then new rows ------------
                rows = free[:len(new)]
                extra = len(new) - len(rows)
                if cache is None:
                    cache, mask = pcache, pmask
                    req, gen = [None] * len(new), [[] for _ in new]
                    pos, last = pmask.sum(-1), first
                    rows = list(range(len(new)))
                else:
                    cache, mask = self._splice(cache, mask, pcache, pmask, rows, extra)
                    rows = rows + list(range(len(req), len(req) + extra))
                    req += [None] * extra
                    gen += [[] for _ in range(extra)]
                    pos = torch.cat([pos, torch.zeros(extra, dtype=torch.long, device=device)])
                    last = torch.cat([last, torch.zeros(extra, dtype=torch.long, device=device)])
                    idx = torch.tensor(rows, device=device)
                    pos[idx] = pmask.sum(-1)
                    last[idx] = first
                for k, (row, tok) in enumerate(zip(rows, first.tolist())):
                    req[row], gen[row] = new[k], [tok]
                    if ended(gen[row]):
                        finish(row)
                continue  # refilling may have freed rows again (answers of one token)
            if n_active == 0:
                continue
            # -- one decode step for every row ----------------------------------------------------
            mask = torch.cat([mask, torch.ones((len(req), 1), dtype=torch.long, device=device)], dim=1)
            out = self.model(input_ids=last[:, None], attention_mask=mask, position_ids=pos[:, None],
                             use_cache=True, **{cache_kw: cache})
            active = [r for r, q in enumerate(req) if q is not None]
            row_seeds = [seeds[req[r]] if req[r] is not None else 0 for r in range(len(req))]
            toks = self.picker(out.logits[:, -1, :], row_seeds, [len(g) for g in gen])
            self.stats.decode_steps += 1
            self.stats.slot_tokens += len(req)
            self.stats.useful_tokens += len(active)
            pos, last = pos + 1, toks
            tok_list = toks.tolist()
            for r in active:
                gen[r].append(tok_list[r])
                if ended(gen[r]):
                    finish(r)
            # -- keep the batch and the cache small -----------------------------------------------
            live = [r for r, q in enumerate(req) if q is not None]
            if not queue and live and len(req) - len(live) > self.compact_at * len(req):
                keep = torch.tensor(live, device=device)
                for layer in cache_layers(cache):
                    layer.keys, layer.values = layer.keys[keep], layer.values[keep]
                mask, pos, last = mask[keep], pos[keep], last[keep]
                req, gen = [req[r] for r in live], [gen[r] for r in live]
            # drop columns no live row attends to (checked every TRIM_EVERY steps: one device sync each)
            if live and self.stats.decode_steps % TRIM_EVERY == 0:
                used = (mask if len(live) == len(req) else mask[torch.tensor(live, device=device)]).any(dim=0)
                start = int(used.long().argmax())
                if start > 0:
                    for layer in cache_layers(cache):
                        layer.keys, layer.values = layer.keys[:, :, start:], layer.values[:, :, start:]
                    mask = mask[:, start:]

    @staticmethod
    def _splice(cache, mask, pcache, pmask, rows: list[int], extra: int):
        """Write a prefilled batch into rows of the running cache (and `extra` new rows at the
        end), right-aligned on the last column; returns (cache, mask)."""
        import torch  # heavy: loaded only when a model runs

        width, cols = pmask.shape[1], mask.shape[1]
        src = torch.arange(len(rows), device=mask.device)
        dst = torch.tensor(rows, dtype=torch.long, device=mask.device)
        grow = max(0, width - cols)
        for layer, player in zip(cache_layers(cache), cache_layers(pcache)):
            for name in ("keys", "values"):
                t, p = getattr(layer, name), getattr(player, name)
                if grow or extra:
                    b, h, _, d = t.shape
                    t = torch.cat([t.new_zeros((b, h, grow, d)), t], dim=2) if grow else t
                    if extra:
                        t = torch.cat([t, t.new_zeros((extra, h, t.shape[2], d))], dim=0)
                if len(rows):
                    t[dst, :, t.shape[2] - width:] = p[src]
                if extra:
                    t[t.shape[0] - extra:, :, t.shape[2] - width:] = p[len(rows):]
                setattr(layer, name, t)
        if grow:
            mask = torch.cat([mask.new_zeros((mask.shape[0], grow)), mask], dim=1)
        if extra:
            mask = torch.cat([mask, mask.new_zeros((extra, mask.shape[1]))], dim=0)
        cols = mask.shape[1]
        if len(rows):
            mask[dst] = 0
            mask[dst, cols - width:] = pmask[src]
        if extra:
            mask[mask.shape[0] - extra:, cols - width:] = pmask[len(rows):]
        return cache, mask
