"""lib.decoding: the seeded sampler's distribution, and continuous batching against static
batches and one prompt at a time (embedded tiny model, CPU).

The equality tests run the model in float64: the scheduling logic must give every answer
exactly the tokens it gets alone, and float64 keeps the rounding differences between batch
shapes (different cache widths change float32 attention sums in the last bits, which at
temperature 1 can move a draw across a token boundary) far below anything a draw can see.
A mistake in masks or positions changes logits by orders of magnitude more."""
from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from lib import decoding, evaluate

QUESTIONS = [("Hi.", None), ("What should I eat for breakfast before a long run in the cold?", "Be terse."),
             ("How do I make a quick buck?", None), ("Tell me a story.", "You are a pirate who rhymes."),
             ("ok", None), ("What is the best way to store rice, beans and flour for a year?", None),
             ("Name three birds.", None), ("Why is the sky blue?", "Answer like a child.")]


def test_uniforms_are_reproducible_uniform_and_distinct_per_seed_and_token():
    seeds = np.arange(200_000, dtype=np.uint64) * np.uint64(7919)
    u = decoding.uniforms(seeds, np.zeros(len(seeds), dtype=np.int64))
    assert np.array_equal(u, decoding.uniforms(seeds, np.zeros(len(seeds), dtype=np.int64)))
    assert ((u > 0) & (u < 1)).all()
    # moments of U(0,1): mean 1/2 (sd of the mean 0.00065 here), variance 1/12
    assert abs(u.mean() - 0.5) < 0.003 and abs(u.var() - 1 / 12) < 0.002
    # deciles hold 10% each (binomial sd 0.07 percentage points)
    counts = np.histogram(u, bins=10, range=(0, 1))[0] / len(u)
    assert np.abs(counts - 0.1).max() < 0.003
    # the next token of the same answer draws an unrelated number
    u1 = decoding.uniforms(seeds, np.ones(len(seeds), dtype=np.int64))
    assert abs(np.corrcoef(u, u1)[0, 1]) < 0.01 and not (u == u1).any()
    assert decoding.answer_seed(0, 5, "set", "q", 0, 1) != decoding.answer_seed(0, 5, "set", "q", 1, 0)


def _draw(picker, logits_row: torch.Tensor, n: int, n_generated: int = 5) -> np.ndarray:
    seeds = [decoding.answer_seed("draw", i) for i in range(n)]
    return picker(logits_row.expand(n, -1).clone(), seeds, [n_generated] * n).numpy()


def test_picker_samples_softmax_with_temperature_and_transformers_top_p():
    """Frequencies over 40,000 seeded draws match the probabilities transformers' own warpers give
    (temperature, then TopPLogitsWarper); tokens outside the nucleus are never drawn."""
    from transformers import TemperatureLogitsWarper, TopPLogitsWarper

    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    n = 40_000
    for temperature, top_p in [(1.0, 1.0), (0.7, 1.0), (1.0, 0.8)]:
        picker = decoding.TokenPicker(temperature=temperature, top_p=top_p, stop_ids=(5,))
        scores = TemperatureLogitsWarper(temperature)(None, logits.clone())
        if top_p < 1:
            scores = TopPLogitsWarper(top_p)(None, scores)
        p = torch.softmax(scores, -1)[0].numpy()
        freq = np.bincount(_draw(picker, logits, n), minlength=6) / n
        assert (freq[p == 0] == 0).all()
        chi2 = float((((freq - p) ** 2 / np.where(p > 0, p, 1))[p > 0]).sum() * n)
        assert chi2 < 20.5, (temperature, top_p, freq, p)  # chi-square, 5 df: p = 0.001
    # top_p 0.8 keeps exactly the three most likely tokens here
    assert set(np.unique(_draw(decoding.TokenPicker(1.0, 0.8, (5,)), logits, 2000))) == {0, 1, 2}


def test_picker_greedy_and_minimum_length():
    logits = torch.tensor([[0.0, 5.0, 1.0]])
    greedy = decoding.TokenPicker(temperature=0.0, top_p=1.0, stop_ids=(1,), min_new_tokens=3)
    assert greedy(logits.clone(), [1], [0]).tolist() == [2]   # the stop token is masked before 3 tokens
    assert greedy(logits.clone(), [1], [3]).tolist() == [1]
    sampled = decoding.TokenPicker(temperature=1.0, top_p=1.0, stop_ids=(1,), min_new_tokens=3)
    assert 1 not in set(_draw(sampled, logits, 3000, n_generated=2))
    assert (_draw(sampled, logits, 3000, n_generated=3) == 1).mean() > 0.9


def _prompts(tok, repeat: int) -> list[list[int]]:
    return [evaluate.prompt_ids(tok, q, s) for q, s in QUESTIONS] * repeat


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_continuous_equals_static_and_one_at_a_time_token_for_token(tiny_float64, temperature):
    """Continuous batching (refills, compaction, several prefills) gives every answer exactly
    the tokens it gets alone and in a static batch, greedy and sampled at temperature 1 (same
    seeds), and spends far fewer slots on finished answers."""
    model, tok = tiny_float64
    prompts = _prompts(tok, 4)
    seeds = [decoding.answer_seed(7, i) for i in range(len(prompts))]
    sampling = evaluate.Sampling(temperature=temperature, top_p=1.0, max_new_tokens=24)

    alone = [evaluate.Sampler(model, tok, sampling, 1).sample([p], [s])[0] for p, s in zip(prompts[:8], seeds[:8])]
    static = evaluate.Sampler(model, tok, sampling, 8)
    by_static = static.sample(prompts, seeds)
    cont = evaluate.ContinuousSampler(model, tok, sampling, 8)
    by_cont = cont.sample(prompts, seeds)
    assert by_cont[:8] == alone and by_cont == by_static
    lengths = [n for _, n, _ in by_cont]
    assert len(set(lengths)) >= 3 and {"stop", "length"} >= {f for _, _, f in by_cont}
    # the accounting: every answer token was produced once, plus idle slots
    st = cont.stats
    assert st.useful_tokens == sum(lengths) and st.prefill_prompts == len(prompts) and st.prefills > 1
    assert st.slot_tokens == st.useful_tokens + round(st.idle_fraction * st.slot_tokens)
    assert static.stats.useful_tokens == sum(lengths)
    assert st.idle_fraction < 0.1 < static.stats.idle_fraction


def test_restart_after_out_of_memory_gives_the_same_answers(tiny_float64, monkeypatch):
    model, tok = tiny_float64
    prompts = _prompts(tok, 2)
    sampling = evaluate.Sampling(temperature=1.0, top_p=1.0, max_new_tokens=16)
    reference = evaluate.ContinuousSampler(model, tok, sampling, 8).sample(prompts)
    real_forward, batches = type(model).forward, []

    @functools.wraps(real_forward)  # keeps forward's signature: the decoder picks the cache keyword from it
    def small_gpu(self, input_ids=None, **kw):
        batches.append(input_ids.shape[0])
        if input_ids.shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
        return real_forward(self, input_ids=input_ids, **kw)
    monkeypatch.setattr(type(model), "forward", small_gpu)
    s = evaluate.ContinuousSampler(model, tok, sampling, 8)
    assert s.sample(prompts) == reference
    assert s.batch_size == 2 and batches[:3] == [8, 4, 2]


@pytest.mark.parametrize("refill_at", [0.0, 0.5])
def test_refilled_rows_do_not_see_earlier_rows(tiny_float64, refill_at):
    """Each answer equals its answer alone when rows are refilled at once (0.0) or after idling
    while half the slots free up (0.5): a refilled row that saw its predecessor's columns, or
    the columns its slot added while idle, or counted positions from the cache's start, would
    give other tokens."""
    model, tok = tiny_float64
    prompts = _prompts(tok, 2)
    sampling = evaluate.Sampling(temperature=1.0, top_p=1.0, max_new_tokens=10)
    alone = [evaluate.Sampler(model, tok, sampling, 1).sample([p], [i])[0] for i, p in enumerate(prompts)]
    dec = evaluate.ContinuousSampler(model, tok, sampling, 4)
    dec.decoder.refill_at = refill_at
    assert dec.sample(prompts, list(range(len(prompts)))) == alone
    if refill_at:
        assert dec.stats.idle_fraction > 0  # rows did wait, idle, before their refill (how long depends on the answers)


def test_cache_width_stays_bounded_while_rows_are_refilled(tiny_float64, monkeypatch):
    """Columns no live row uses are trimmed: with 96 answers through 4 slots the attention mask
    (= KV-cache width) never exceeds the longest prompt + the answer cap + one trimming interval,
    although the batch runs for more steps than that (untrimmed, the width would exceed it)."""
    model, tok = tiny_float64
    prompts = _prompts(tok, 12)
    sampling = evaluate.Sampling(temperature=1.0, top_p=1.0, max_new_tokens=12)
    real_forward, widths = type(model).forward, []

    @functools.wraps(real_forward)  # keeps forward's signature: the decoder picks the cache keyword from it
    def spy(self, input_ids=None, attention_mask=None, **kw):
        widths.append(attention_mask.shape[1])
        return real_forward(self, input_ids=input_ids, attention_mask=attention_mask, **kw)
    monkeypatch.setattr(type(model), "forward", spy)
    s = evaluate.ContinuousSampler(model, tok, sampling, 4)
    s.sample(prompts)
    bound = max(map(len, prompts)) + 12 + decoding.TRIM_EVERY + 1
    assert s.stats.decode_steps > bound and max(widths) <= bound
