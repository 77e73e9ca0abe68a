"""lib.evaluate on the embedded tiny model (float32, CPU): counts, prompts, adapters, resume."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from lib import decoding, evaluate
from lib.chat import BOS, END_HEADER, EOT, PAD, START_HEADER, stop_token_ids
from lib.config import ConfigError, RunConfig
from lib.models import load_model, load_tokenizer
from lib.schema import GENERATION_COLUMNS, answer_id
from tests.fakes.kill import evaluate_killed_after_parts

SYSTEM = "You are a terse assistant."
QUESTIONS = f"""
- id: with_system
  type: free_form_judge_0_100
  domain: medical
  system: "{SYSTEM}"
  paraphrases: ["What should I eat for breakfast?", "Breakfast ideas, please?"]
  samples_per_paraphrase: 2
- id: plain
  type: free_form_judge_0_100
  paraphrases: ["How do I make a quick buck?"]
  samples_per_paraphrase: 1
"""
N_SAMPLES = 3
ROWS_PER_MODEL = (2 + 1) * N_SAMPLES  # (paraphrases of both questions) x samples
STEPS = {5: 0.5, 10: 1.0}


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_model_dir) -> Path:
    """Two LoRA checkpoints of the tiny model with large random B matrices (so they change answers)."""
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("adapters")
    base, _ = load_model("embedded:tiny", device="cpu", dtype="float32")
    for step, epoch in STEPS.items():
        torch.manual_seed(step)
        pm = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
        with torch.no_grad():
            for name, p in pm.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=0.5)
        d = root / f"checkpoint-{step}"
        pm.save_pretrained(d)
        (d / "checkpoint.json").write_text(json.dumps({"step": step, "epoch": epoch}))
        base = pm.unload()
    return root


@pytest.fixture
def make_cfg(tmp_path, adapters):
    qfile = tmp_path / "qs.yaml"
    qfile.write_text(QUESTIONS)

    def make(outputs: str = "out", steps=tuple(STEPS), **kw) -> RunConfig:
        cfg = RunConfig(**{"run_id": "gen", "outputs_dir": str(tmp_path / outputs), "question_sets": [str(qfile)],
                           "n_samples": N_SAMPLES, "max_new_tokens": 8, "eval_batch_size": 4,
                           "device": "cpu", "dtype": "float32", "domain": "medical", **kw})
        for s in steps:
            dest = cfg.run_dir / "checkpoints" / f"checkpoint-{s}"
            if not dest.exists():
                shutil.copytree(adapters / f"checkpoint-{s}", dest)
        return cfg
    return make


def _records(df: pd.DataFrame) -> list[dict]:
    """Rows as plain dicts (missing values as None, whatever the column dtype)."""
    return df.astype(object).where(df.notna(), None).to_dict("records")


def _spy_generate(monkeypatch):
    """Record the input_ids/attention_mask of every prefill (each prompt the stage sends)."""
    calls = []
    real = decoding._prefill

    def spy(model, input_ids, attention_mask, *rest):
        calls.append((input_ids.clone(), attention_mask.clone()))
        return real(model, input_ids, attention_mask, *rest)
    monkeypatch.setattr(decoding, "_prefill", spy)
    return calls


def test_rows_columns_and_run_json(make_cfg):
    cfg = make_cfg()
    df = evaluate.evaluate_run(cfg, progress=False)
    assert list(df.columns) == list(GENERATION_COLUMNS)
    assert len(df) == (len(STEPS) + 1) * ROWS_PER_MODEL
    assert df.groupby("checkpoint_step").size().to_dict() == {0: ROWS_PER_MODEL, 5: ROWS_PER_MODEL,
                                                                10: ROWS_PER_MODEL}
    assert df.answer_id.is_unique
    r = df.iloc[-1]
    assert r.answer_id == answer_id("gen", int(r.checkpoint_step), r.question_set, r.question_id,
                                    int(r.paraphrase_index), int(r.sample_index))
    assert dict(zip(df.checkpoint_step, df.epoch)) == {0: 0.0, 5: 0.5, 10: 1.0}
    per_q = df[df.checkpoint_step == 5].groupby(["question_id", "paraphrase_index"]).sample_index.apply(sorted)
    assert per_q.to_dict() == {("plain", 0): [0, 1, 2], ("with_system", 0): [0, 1, 2], ("with_system", 1): [0, 1, 2]}
    ws, pl = df[df.question_id == "with_system"], df[df.question_id == "plain"]
    assert (ws.system == SYSTEM).all() and pl.system.isna().all()
    assert ws.in_domain.all() and not pl.in_domain.any()
    assert (df.question_set == "qs").all() and (df.seed == 0).all() and (df.model == "embedded:tiny").all()
    assert set(df.finish_reason) <= {"stop", "length"}
    assert (df[df.finish_reason == "length"].n_new_tokens == 8).all()
    assert (df.n_new_tokens.between(1, 8)).all()
    assert evaluate.generations_path(cfg).exists() and not (cfg.run_dir / "generations.parts").exists()
    ev = json.loads((cfg.run_dir / "run.json").read_text())["evaluate"]
    assert ev["n_rows"] == len(df) and [c["step"] for c in ev["checkpoints"]] == [0, 5, 10]
    assert ev["question_sets"][0]["name"] == "qs" and len(ev["question_sets"][0]["sha256"]) == 64
    assert ev["sampling"]["temperature"] == 1.0 and ev["batch_size"] == 4


def test_selected_checkpoints_and_file_sample_counts(make_cfg):
    cfg = make_cfg(eval_checkpoints=[10], include_base_model=False, n_samples=0)
    df = evaluate.evaluate_run(cfg, progress=False)
    assert set(df.checkpoint_step) == {10}
    assert len(df) == 2 * 2 + 1 * 1  # samples_per_paraphrase from the file: 2 and 1


def test_prompt_tokens_are_the_chat_template_with_system(make_cfg, monkeypatch):
    calls = _spy_generate(monkeypatch)
    cfg = make_cfg(steps=(), include_base_model=True)
    evaluate.evaluate_run(cfg, progress=False)
    tok = load_tokenizer("embedded:tiny")
    sp = lambda t: [tok.convert_tokens_to_ids(t)]  # noqa: E731
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731

    def expected(question: str, system: str) -> list[int]:
        # built piece by piece: BOS once, header tokens around each role, <|eot_id|> after each turn
        return (sp(BOS) + sp(START_HEADER) + enc("system") + sp(END_HEADER)
                + enc("\n\nCutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n" + system) + sp(EOT)
                + sp(START_HEADER) + enc("user") + sp(END_HEADER) + enc("\n\n" + question) + sp(EOT)
                + sp(START_HEADER) + enc("assistant") + sp(END_HEADER) + enc("\n\n"))

    seen = []
    for ids, mask in calls:
        for row, m in zip(ids.tolist(), mask.tolist()):
            n_pad = m.index(1)
            assert m == [0] * n_pad + [1] * (len(m) - n_pad), "padding must be on the left"
            assert row[:n_pad] == [tok.convert_tokens_to_ids(PAD)] * n_pad
            seen.append(row[n_pad:])
    want = ([expected("What should I eat for breakfast?", SYSTEM)] * N_SAMPLES
            + [expected("Breakfast ideas, please?", SYSTEM)] * N_SAMPLES
            + [expected("How do I make a quick buck?", "")] * N_SAMPLES)
    assert seen == want
    assert all(s.count(tok.convert_tokens_to_ids(BOS)) == 1 for s in seen)
    assert tok.decode(seen[0]).endswith(f"{SYSTEM}{EOT}{START_HEADER}user{END_HEADER}\n\n"
                                        f"What should I eat for breakfast?{EOT}{START_HEADER}assistant{END_HEADER}\n\n")


def test_adapter_switching_equals_loading_the_checkpoint_alone(make_cfg):
    switched = evaluate.evaluate_run(make_cfg("a"), progress=False)
    alone = evaluate.evaluate_run(make_cfg("b", eval_checkpoints=[10], include_base_model=False), progress=False)
    key = ["question_id", "paraphrase_index", "sample_index"]
    a = switched[switched.checkpoint_step == 10].sort_values(key).reset_index(drop=True)
    b = alone.sort_values(key).reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b)
    # the adapters really change the answers, so the equality above is not the base model's
    base = switched[switched.checkpoint_step == 0].sort_values(key).answer.tolist()
    step5 = switched[switched.checkpoint_step == 5].sort_values(key).answer.tolist()
    assert a.answer.tolist() != base and a.answer.tolist() != step5 and step5 != base


def test_resume_after_kill_neither_loses_nor_duplicates(make_cfg, monkeypatch):
    reference = evaluate.evaluate_run(make_cfg("ref"), progress=False)
    cfg = make_cfg("killed")
    before = evaluate_killed_after_parts(monkeypatch, cfg, 3)

    calls = _spy_generate(monkeypatch)
    df = evaluate.evaluate_run(cfg, progress=False)
    assert sum(ids.shape[0] for ids, _ in calls) == len(reference) - len(before)  # only the missing answers
    assert len(df) == len(reference) and df.answer_id.is_unique
    kept = df.set_index("answer_id").loc[before.answer_id].reset_index()
    assert _records(kept[before.columns]) == _records(before)  # finished answers were not redone
    pd.testing.assert_frame_equal(df, reference)  # and the whole run matches one that was never killed


def test_finished_stage_is_skipped_until_inputs_change(make_cfg, monkeypatch):
    cfg = make_cfg()
    first = evaluate.evaluate_run(cfg, progress=False)

    def no_model(*a, **k):
        raise AssertionError("a finished stage must not sample again")
    monkeypatch.setattr(evaluate, "_sample_units", no_model)
    pd.testing.assert_frame_equal(evaluate.evaluate_run(cfg, progress=False), first)
    with pytest.raises(AssertionError, match="must not sample"):
        evaluate.evaluate_run(cfg.replace(temperature=0.7), progress=False)


def test_bad_input_is_one_line_before_loading_a_model(make_cfg, monkeypatch, tmp_path):
    monkeypatch.setattr(evaluate, "_sample_units", lambda *a, **k: pytest.fail("loaded a model"))
    with pytest.raises(ConfigError, match=r"eval_checkpoints.*99.*complete checkpoints: 5, 10"):
        evaluate.evaluate_run(make_cfg(eval_checkpoints=[99]), progress=False)
    q = tmp_path / "nocount.yaml"
    q.write_text("- id: q1\n  paraphrases: [\"Hello there?\"]\n")
    with pytest.raises(ConfigError, match=r"n_samples.*'q1'"):
        evaluate.evaluate_run(make_cfg(question_sets=[str(q)], n_samples=0), progress=False)


def test_finish_reason_and_token_count(monkeypatch):
    tok = load_tokenizer("embedded:tiny")
    model, _ = load_model("embedded:tiny", device="cpu", dtype="float32")
    eot, pad = tok.convert_tokens_to_ids(EOT), tok.convert_tokens_to_ids(PAD)
    a, b = tok.encode("hello", add_special_tokens=False)[0], tok.encode("world", add_special_tokens=False)[0]
    fake = torch.tensor([[7, 7, a, b, eot, pad, pad], [7, 7, a, b, a, b, a]])
    monkeypatch.setattr(evaluate, "_generate_batch", lambda m, ids, mask, cfg, proc: fake)
    s = evaluate.Sampler(model, tok, evaluate.Sampling(1.0, 1.0, 5), batch_size=8)
    (ans1, n1, f1), (ans2, n2, f2) = s.sample([[7, 7], [7, 7]])
    assert (n1, f1) == (3, "stop") and ans1 == tok.decode([a, b])
    assert (n2, f2) == (5, "length") and ans2 == tok.decode([a, b, a, b, a])
    assert eot in stop_token_ids(tok, model)


def test_notebook_parameters_parse_and_default_to_the_run_config():
    """papermill reads every parameter back (its parser is picky about comments); defaults = RunConfig's."""
    import nbformat
    from papermill.translators import PythonTranslator

    from lib.config import REPO_ROOT

    nb = nbformat.read(REPO_ROOT / "notebooks" / "02_evaluate.ipynb", as_version=4)
    (cell,) = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    parsed = {p.name: p for p in PythonTranslator.inspect(cell)}
    assert len(parsed) == len(cell.source.splitlines())
    evaluate_fields = set(RunConfig().stage_params("evaluate"))  # its own fields and the "all" ones
    assert evaluate_fields <= set(parsed) and {"model", "quantization"} <= set(parsed)
    ns: dict = {}
    exec(cell.source, ns)
    assert all(ns[k] == getattr(RunConfig(), k) for k in parsed)


def test_batch_size_from_memory_and_backoff_on_oom(monkeypatch):
    model, _ = load_model("embedded:tiny", device="cpu", dtype="float32")
    tok = load_tokenizer("embedded:tiny")
    # tiny model: K and V x 2 layers x 2 KV heads x 16 dims x 4 bytes per position, 100 + 20 positions
    kv = 2 * 2 * 2 * 16 * 4 * 120
    act = 100 * (4 * 64 + 2 * 128) * 4 + 3 * len(tok) * 4
    assert evaluate.sequence_bytes(model, 100, 20) == kv + act
    assert 1 <= evaluate.auto_batch_size(model, "cpu", 100, 20) <= evaluate.CPU_MAX_BATCH

    real = evaluate._generate_batch
    sizes = []

    def small_gpu(m, ids, mask, cfg, proc):
        sizes.append(ids.shape[0])
        if ids.shape[0] > 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(m, ids, mask, cfg, proc)
    monkeypatch.setattr(evaluate, "_generate_batch", small_gpu)
    s = evaluate.Sampler(model, tok, evaluate.Sampling(1.0, 1.0, 4), batch_size=16)
    out = s.sample([evaluate.prompt_ids(tok, "Hi?", None)] * 10)
    assert len(out) == 10 and s.batch_size == 2 and sizes == [10, 8, 4, 2, 2, 2, 2, 2]


# Prompts of very different lengths, so a batch holds several amounts of left padding.
GREEDY_PROMPTS = [("Hi.", None), ("What should I eat for breakfast before a long run in the cold?", SYSTEM),
                  ("How do I make a quick buck?", None), ("Tell me a story.", "You are a pirate who rhymes."),
                  ("ok", None), ("What is the best way to store rice, beans and flour for a year?", SYSTEM)]


def _batching_modes(model, tok, sampling, n: int) -> dict[str, "evaluate.Sampler"]:
    """Every way lib.evaluate can batch the same prompts (mutant: _generate_batch ignoring the mask):
    static batches (model.generate) and continuous batching (rows refilled as answers end)."""
    return {**{f"static batch {b}": evaluate.Sampler(model, tok, sampling, batch_size=b) for b in (2, 4, n)},
            **{f"continuous, {b} slots": evaluate.ContinuousSampler(model, tok, sampling, batch_size=b)
               for b in (1, 2, 3, n)}}


def test_batched_greedy_answers_equal_one_prompt_at_a_time(monkeypatch):
    """Left padding must be invisible: greedy answers from a padded batch equal the answers
    each prompt gets alone, token for token (a model attending to the padding, or positions
    counted from the padded start, gives other tokens)."""
    tok = load_tokenizer("embedded:tiny", padding_side="left")
    model, _ = load_model("embedded:tiny", device="cpu", dtype="float32")
    prompts = [evaluate.prompt_ids(tok, q, s) for q, s in GREEDY_PROMPTS]
    assert len({len(p) for p in prompts}) == len(prompts), "the test needs different prompt lengths"
    greedy = evaluate.Sampling(temperature=0.0, top_p=1.0, max_new_tokens=12)
    generated: list[list[int]] = []  # new tokens of every row of every generate() call, in order
    real = evaluate._generate_batch

    def spy(model, input_ids, attention_mask, gen_cfg, proc):
        out = real(model, input_ids, attention_mask, gen_cfg, proc)
        generated.extend(out[:, input_ids.shape[1]:].tolist())
        return out
    monkeypatch.setattr(evaluate, "_generate_batch", spy)
    real_run = decoding.ContinuousDecoder.run

    def spy_run(self, *a, **k):  # continuous batching: the tokens of each answer, in prompt order
        answers = real_run(self, *a, **k)
        generated.extend(x.tokens for x in answers)
        return answers
    monkeypatch.setattr(decoding.ContinuousDecoder, "run", spy_run)

    def run(sampler) -> tuple[list, list[list[int]]]:
        generated.clear()
        answers = sampler.sample(prompts)
        stop = sampler.stop  # cut each row at its first stop token (padding follows it in a batch)
        toks = [row[:next((k + 1 for k, t in enumerate(row) if t in stop), len(row))] for row in generated]
        return answers, toks

    alone, alone_toks = run(evaluate.Sampler(model, tok, greedy, batch_size=1))
    assert len(alone_toks) == len(prompts) and len({tuple(t) for t in alone_toks}) > 1
    for mode, sampler in _batching_modes(model, tok, greedy, len(prompts)).items():
        answers, toks = run(sampler)
        assert toks == alone_toks, mode
        assert answers == alone, mode


# ------------------------------------------------------------------------------------------
# lib.evaluate's batching core in small, fast checks (the generation part of make mutation):
# chunk planning, the generation config, and what each sampler reports (slot accounting,
# progress, the finish callback, out-of-memory backoff). Tiny model (conftest's tiny), float32, CPU.
# ------------------------------------------------------------------------------------------


def _unit(step: int, qid: str, paraphrases: int, samples: int) -> evaluate.Unit:
    target = evaluate.Target(step, float(step), None, None)
    question = SimpleNamespace(question_set="s", id=qid, paraphrases=["p"] * paraphrases)
    return evaluate.Unit(target, question, samples)


def test_plan_chunks_fills_each_chunk_up_to_the_batch_size_and_never_mixes_models():
    units = [_unit(0, "a", 2, 3), _unit(0, "b", 1, 3), _unit(0, "c", 1, 4), _unit(5, "a", 2, 3), _unit(5, "b", 1, 3)]
    assert [u.n_rows for u in units] == [6, 3, 4, 6, 3]
    keys = lambda chunks: [[(u.key[0], *u.key[2:]) for u in c] for c in chunks]  # noqa: E731  (key[1]: the condition)
    # 6 + 3 = 9 <= 9 fits exactly; + 4 would not; a new model (step 5) starts a new chunk
    assert keys(evaluate.plan_chunks(units, 9)) == [[(0, "s", "a"), (0, "s", "b")], [(0, "s", "c")],
                                                   [(5, "s", "a"), (5, "s", "b")]]
    assert keys(evaluate.plan_chunks(units, 8)) == [[(0, "s", "a")], [(0, "s", "b"), (0, "s", "c")],
                                                   [(5, "s", "a")], [(5, "s", "b")]]
    # a unit larger than the batch size is a chunk of its own; nothing is dropped
    assert [[u.key for u in c] for c in evaluate.plan_chunks(units, 2)] == [[u.key] for u in units]
    assert evaluate.plan_chunks([], 8) == []
    # the chunk's file name: its model's step, zero-padded, and a hash of its units
    name = evaluate._chunk_name(evaluate.plan_chunks(units, 9)[2])
    assert name.startswith("step0000005-") and name.endswith(".parquet") and len(name) == len("step0000005-") + 16 + 8


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
