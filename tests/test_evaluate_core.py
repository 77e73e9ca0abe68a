"""lib.evaluate's batching core in small, fast checks (the generation part of `make mutation`):
chunk planning, the generation config, and what each sampler reports (slot accounting,
progress, the finish callback, out-of-memory backoff). Tiny model, float32, CPU."""
from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch

from lib import evaluate
from lib.chat import EOT, PAD, stop_token_ids
from lib.models import load_model, load_tokenizer


def _unit(step: int, qid: str, paraphrases: int, samples: int) -> evaluate.Unit:
    target = evaluate.Target(step, float(step), None, None)
    question = SimpleNamespace(question_set="s", id=qid, paraphrases=["p"] * paraphrases)
    return evaluate.Unit(target, question, samples)


def test_plan_chunks_fills_each_chunk_up_to_the_batch_size_and_never_mixes_models():
    units = [_unit(0, "a", 2, 3), _unit(0, "b", 1, 3), _unit(0, "c", 1, 4), _unit(5, "a", 2, 3), _unit(5, "b", 1, 3)]
    assert [u.n_rows for u in units] == [6, 3, 4, 6, 3]
    keys = lambda chunks: [[u.key for u in c] for c in chunks]  # noqa: E731
    # 6 + 3 = 9 <= 9 fits exactly; + 4 would not; a new model (step 5) starts a new chunk
    assert keys(evaluate.plan_chunks(units, 9)) == [[(0, "s", "a"), (0, "s", "b")], [(0, "s", "c")],
                                                   [(5, "s", "a"), (5, "s", "b")]]
    assert keys(evaluate.plan_chunks(units, 8)) == [[(0, "s", "a")], [(0, "s", "b"), (0, "s", "c")],
                                                   [(5, "s", "a")], [(5, "s", "b")]]
    # a unit larger than the batch size is a chunk of its own; nothing is dropped
    assert keys(evaluate.plan_chunks(units, 2)) == [[u.key] for u in units]
    assert evaluate.plan_chunks([], 8) == []
    # the chunk's file name: its model's step, zero-padded, and a hash of its units
    name = evaluate._chunk_name(evaluate.plan_chunks(units, 9)[2])
    assert name.startswith("step0000005-") and name.endswith(".parquet") and len(name) == len("step0000005-") + 16 + 8


@pytest.fixture(scope="module")
def tiny():
    tok = load_tokenizer("embedded:tiny", padding_side="left")
    model, _ = load_model("embedded:tiny", device="cpu", dtype="float32")
    return model, tok


def test_generation_config_is_greedy_over_the_pickers_draws_with_the_stop_and_pad_ids(tiny):
    model, tok = tiny
    cfg = evaluate.generation_config(model, tok, evaluate.Sampling(temperature=1.0, top_p=0.9, max_new_tokens=17))
    assert cfg.max_new_tokens == 17 and cfg.do_sample is False
    assert cfg.eos_token_id == stop_token_ids(tok, model) and tok.convert_tokens_to_ids(EOT) in cfg.eos_token_id
    assert cfg.pad_token_id == tok.pad_token_id == tok.convert_tokens_to_ids(PAD)
    assert cfg.bos_token_id == tok.bos_token_id is not None


class _Progress:
    def __init__(self):
        self.updates: list[int] = []

    def update(self, n: int) -> None:
        self.updates.append(n)


def _prompts(tok, n: int) -> list[list[int]]:
    texts = ["Hi.", "What should I eat before a long run?", "ok", "Tell me a story about rice.", "Why?",
             "How do I store flour for a year?", "Name a colour."]
    return [evaluate.prompt_ids(tok, texts[i % len(texts)], None) for i in range(n)]


def test_static_sampler_counts_its_slots_and_reports_progress_per_batch(tiny):
    model, tok = tiny
    prompts = _prompts(tok, 7)
    s = evaluate.Sampler(model, tok, evaluate.Sampling(temperature=1.0, top_p=1.0, max_new_tokens=6), batch_size=3)
    progress = _Progress()
    rows = s.sample(prompts, seeds=list(range(7)), progress=progress)
    assert len(rows) == 7 and progress.updates == [3, 3, 1]
    lengths = [n for _, n, _ in rows]
    batches = [lengths[0:3], lengths[3:6], lengths[6:7]]
    # each batch: one prefill of its prompts; every row holds a slot for each token of its longest answer
    assert s.stats.prefills == 3 and s.stats.prefill_prompts == 7
    assert s.stats.slot_tokens == sum(len(b) * max(b) for b in batches)
    assert s.stats.useful_tokens == sum(lengths)
    assert s.stats.decode_steps == sum(max(b) - 1 for b in batches)
    # the same seeds give the same answers; the default seeds are one per prompt position
    again = evaluate.Sampler(model, tok, s.sampling, batch_size=7).sample(prompts, seeds=list(range(7)))
    assert again == rows
    assert evaluate.Sampler(model, tok, s.sampling, batch_size=3).sample(prompts) == \
        evaluate.Sampler(model, tok, s.sampling, batch_size=3).sample(prompts, seeds=evaluate.default_seeds(7))
    assert evaluate.default_seeds(3) == [evaluate.answer_seed("prompt", i) for i in range(3)]


def test_static_sampler_halves_its_batch_on_out_of_memory_and_says_so(tiny, monkeypatch, caplog):
    model, tok = tiny
    real = evaluate._generate_batch
    sizes = []

    def two_fit(m, ids, mask, cfg, proc):
        sizes.append(ids.shape[0])
        if ids.shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(m, ids, mask, cfg, proc)
    monkeypatch.setattr(evaluate, "_generate_batch", two_fit)
    s = evaluate.Sampler(model, tok, evaluate.Sampling(1.0, 1.0, 3), batch_size=5)
    progress = _Progress()
    with caplog.at_level(logging.WARNING, logger="lib.evaluate"):
        rows = s.sample(_prompts(tok, 5), seeds=list(range(5)), progress=progress)
    assert sizes == [5, 2, 2, 1] and s.batch_size == 2 and progress.updates == [2, 2, 1]  # 5 // 2 = 2
    assert rows == evaluate.Sampler(model, tok, s.sampling, batch_size=2).sample(_prompts(tok, 5), seeds=list(range(5)))
    assert [r.getMessage() for r in caplog.records] == ["out of memory: eval batch size lowered to 2"]
    # at batch size 1 there is nothing left to lower: the error goes to the caller; other errors always do
    monkeypatch.setattr(evaluate, "_generate_batch", lambda *a: (_ for _ in ()).throw(
        torch.OutOfMemoryError("CUDA out of memory")))
    with pytest.raises(torch.OutOfMemoryError):
        evaluate.Sampler(model, tok, s.sampling, batch_size=1).sample(_prompts(tok, 2))
    monkeypatch.setattr(evaluate, "_generate_batch", lambda *a: (_ for _ in ()).throw(RuntimeError("shape mismatch")))
    one = evaluate.Sampler(model, tok, s.sampling, batch_size=4)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        one.sample(_prompts(tok, 2))
    assert one.batch_size == 4


def test_continuous_sampler_reports_each_answer_as_it_ends(tiny):
    model, tok = tiny
    prompts = _prompts(tok, 5)
    sampling = evaluate.Sampling(temperature=1.0, top_p=1.0, max_new_tokens=6)
    s = evaluate.ContinuousSampler(model, tok, sampling, batch_size=2)
    assert s.batch_size == 2
    progress, done = _Progress(), {}
    rows = s.sample(prompts, seeds=list(range(5)), progress=progress, on_done=lambda i, row: done.__setitem__(i, row))
    assert progress.updates == [1] * 5
    assert done == dict(enumerate(rows))  # each answer once, under its prompt's index, as returned
    assert s.stats.useful_tokens == sum(n for _, n, _ in rows) and s.stats.prefill_prompts == 5
    # same answers as static batching with the same seeds, and the same default seeds
    assert rows == evaluate.Sampler(model, tok, sampling, batch_size=5).sample(prompts, seeds=list(range(5)))
    assert evaluate.ContinuousSampler(model, tok, sampling, 3).sample(prompts) == \
        evaluate.Sampler(model, tok, sampling, 5).sample(prompts)
    # the stop set is the picker's: every answer that stopped ended on one of the model's stop ids
    assert s.stop == set(stop_token_ids(tok, model))


def test_the_models_own_stop_ids_reach_both_samplers(tiny, monkeypatch):
    """A model whose generation config names an extra end token (Llama-3 base: <|end_of_text|>):
    the static sampler's generate() config and both samplers' stop sets include it."""
    import copy

    model, tok = tiny
    extra = tok.convert_tokens_to_ids(PAD) + 1  # any id that is neither the tokenizer's eos nor <|eot_id|>
    assert extra not in stop_token_ids(tok)
    cfg = copy.deepcopy(model.generation_config)
    cfg.eos_token_id = [tok.eos_token_id, extra]
    monkeypatch.setattr(model, "generation_config", cfg)
    sampling = evaluate.Sampling(temperature=1.0, top_p=1.0, max_new_tokens=4)
    static = evaluate.Sampler(model, tok, sampling, batch_size=2)
    assert extra in static.stop and extra in static.gen_cfg.eos_token_id and extra in static.picker.stop_ids
    assert extra in evaluate.ContinuousSampler(model, tok, sampling, batch_size=2).stop


def test_answers_are_sampled_at_the_evaluation_precision_not_the_training_one(tmp_path, monkeypatch):
    """The replicated study trained in 4-bit and evaluated every checkpoint unquantized in bf16
    (eval_quantization: none, eval_dtype: bfloat16); 'same' keeps the training precision. The
    precision is part of the evaluate stage's fingerprint and of run.json."""
    from lib.config import RunConfig, preset

    study = preset("replicated_study")
    assert (study.quantization, study.eval_precision) == ("4bit", ("none", "bfloat16"))
    assert RunConfig(quantization="4bit", dtype="float16").eval_precision == ("4bit", "float16")
    assert RunConfig(quantization="4bit", eval_quantization="8bit", eval_dtype="auto").eval_precision == ("8bit", "auto")

    seen = {}

    class Loaded(Exception):
        pass

    def fake_load(name, revision="", device="auto", dtype="auto", quantization="none"):
        seen.update(dtype=dtype, quantization=quantization)
        raise Loaded

    monkeypatch.setattr(evaluate, "load_model", fake_load)
    cfg = RunConfig(outputs_dir=str(tmp_path), quantization="4bit", eval_quantization="none", eval_dtype="bfloat16")
    with pytest.raises(Loaded):
        evaluate._sample_units(cfg, [], tmp_path, progress=False)
    assert seen == {"dtype": "bfloat16", "quantization": "none"}
    same = cfg.replace(eval_quantization="same", eval_dtype="same")
    assert evaluate._fingerprint(cfg, [], []) != evaluate._fingerprint(same, [], [])
