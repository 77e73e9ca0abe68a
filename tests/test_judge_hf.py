"""The in-process judge (lib.judge_hf) on the embedded tiny model: exact candidate scoring, the
``sampled`` method, and the stage."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from lib import judge, layout, scoring
from lib.chat import chat_prompt, stop_token_ids
from lib.judge_hf import candidate_token_ids, exact_candidate_logprobs
from lib.models import load_model, load_tokenizer
from tests.fakes.judge_inputs import judge_config, write_generations, write_prompts


def test_candidates_split_digits_and_end_with_end_of_turn(tiny):
    model, tok = tiny
    cands = candidate_token_ids(tok)
    assert len(cands) == 103 and list(cands)[-2:] == ["CODE", "REFUSAL"]
    assert [len(cands[c]) for c in ("7", "42", "100")] == [1, 2, 3]  # one token per digit
    assert cands["100"][0] == cands["1"][0] and cands["100"][1] == cands["0"][0]
    stops = stop_token_ids(tok, model)
    assert tok.convert_tokens_to_ids("<|eot_id|>") in stops


def _naive(model, tok, text, ids, stops):
    """log P(ids, then a stop token | text) with one plain forward pass, no cache tricks."""
    p = tok(text, add_special_tokens=False).input_ids
    seq = torch.tensor([p + ids])
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=seq).logits[0].float(), -1)
    total = sum(lp[len(p) - 1 + j, ids[j]].item() for j in range(len(ids)))
    return total + torch.logsumexp(lp[len(p) + len(ids) - 1, stops], 0).item()


def test_exact_probabilities_are_valid_and_match_plain_teacher_forcing(tiny):
    model, tok = tiny
    cands, stops = candidate_token_ids(tok), stop_token_ids(tok, model)
    # prompts of different lengths: the batched pass left-pads them
    texts = [chat_prompt(tok, "Rate: " + "word " * 60), chat_prompt(tok, "Rate this short one.")]
    got = exact_candidate_logprobs(model, tok, texts, cands, stops)
    for b, text in enumerate(texts):
        lps = got[b]
        assert set(lps) == set(cands) and all(v <= 0 and math.isfinite(v) for v in lps.values())
        assert sum(math.exp(v) for v in lps.values()) <= 1.0  # disjoint events: "10<end>" vs "100<end>"
        for c in ("0", "9", "42", "100", "CODE", "REFUSAL"):
            assert lps[c] == pytest.approx(_naive(model, tok, text, cands[c], stops), abs=1e-4)


def test_exact_aggregation_uses_the_logprob_rule():
    # candidate log probs as the exact method returns them; same rule as first-token logprobs
    lps = {str(i): -50.0 for i in range(101)} | {"CODE": -50.0, "REFUSAL": -50.0}
    lps.update({"100": math.log(0.5), "10": math.log(0.2), "CODE": math.log(0.1)})
    score, label, mass = scoring.label_from_logprobs(lps)
    assert label == "number" and mass == pytest.approx(0.7, abs=1e-6)
    assert score == pytest.approx((100 * 0.5 + 10 * 0.2) / 0.7, abs=1e-4)


def test_hf_stage_end_to_end_then_cached(tmp_path):
    out = tmp_path / "outputs"
    write_generations(out, n=3)
    # the demo judge (hf / embedded:tiny / exact) with a threshold above every row's numeric mass
    cfg = judge_config(out, write_prompts(tmp_path), device="cpu", judge_min_mass=0.999)
    df = judge.judge_run(cfg, progress=False)
    assert len(df) == 6 and set(df["method"]) == {"exact"} and (df["judge_name"] == "hf-embedded_tiny-exact").all()
    # mass on "0".."100" below the threshold -> low_mass, no score
    assert ((df["prob_mass"] > 0) & (df["prob_mass"] < 0.999)).all() and (df["cost_usd"] == 0).all()
    assert (df["label"] == "low_mass").all() and df["score"].isna().all()
    raw = json.loads(df["raw"].iloc[0])
    assert len(raw) == 103 and "100" in raw
    # each row's evidence belongs to its own prompt (the stage batches prompts sorted by length)
    from lib.questions import load_judge_prompts
    model, _ = load_model("embedded:tiny", device="cpu", dtype="float32")
    tok = load_tokenizer("embedded:tiny", padding_side="left")
    gens = pd.read_parquet(layout.generations_path(cfg.run_dir)).set_index("answer_id")
    templates = load_judge_prompts(cfg.judge_prompts)
    for r in df.itertuples():
        g = gens.loc[r.answer_id]
        text = chat_prompt(tok, scoring.fill_prompt(templates[r.metric], g["paraphrase"], g["answer"]))
        alone = exact_candidate_logprobs(model, tok, [text], candidate_token_ids(tok), stop_token_ids(tok, model))[0]
        assert json.loads(r.raw)["42"] == pytest.approx(alone["42"], abs=1e-4)
    p = judge.plan(cfg)
    assert (p.n_cached, p.n_todo) == (6, 0)
    again = judge.judge_run(cfg, progress=False)
    assert again.equals(df)
    # min_mass 0 (the demo's setting): every row gets a score, re-aggregated from the stored evidence
    scored = judge.judge_run(cfg.replace(judge_min_mass=0.0), progress=False)
    assert (scored["label"] == "number").all() and scored["score"].between(0, 100).all()
    raw = json.loads(scored["raw"].iloc[0])
    expected = sum(int(k) * math.exp(v) for k, v in raw.items() if k.isdigit()) / \
        sum(math.exp(v) for k, v in raw.items() if k.isdigit())
    assert scored["score"].iloc[0] == pytest.approx(expected)


def test_hf_logprob_and_sampled_methods_run(tmp_path):
    out = tmp_path / "outputs"
    write_generations(out, n=2)
    prompts = write_prompts(tmp_path)
    for method in ("logprob", "sampled"):
        cfg = judge_config(out, prompts, device="cpu", judge_method=method, judge_metrics=["aligned"],
                           judge_temperature=1.0)
        df = judge.judge_run(cfg, progress=False)
        assert len(df) == 2 and (df["method"] == method).all()
        if method == "logprob":
            tops = [json.loads(r) for r in df["raw"]]  # top 20 ids; ids decoding to the same text are merged
            assert all(1 <= len(t) <= 20 and sum(math.exp(v) for v in t.values()) <= 1 + 1e-6 for t in tops)
        else:
            assert set(df["label"]) <= {"number", "CODE", "REFUSAL", "unparseable"}
            assert (df["output_tokens"] >= 1).all()


def test_local_judge_fingerprint_follows_the_weights_not_only_their_size(tmp_path):
    # the cache key of an in-process judge holds this fingerprint: weights retrained or
    # replaced in place (same shapes, so the same file size) must not reuse old judgments
    import shutil

    from safetensors.torch import load_file, save_file

    from lib.judge_hf import local_fingerprint
    from lib.models import resolve_model

    src = Path(resolve_model("embedded:tiny"))
    a, b = tmp_path / "judge_a", tmp_path / "judge_b"
    shutil.copytree(src, a)
    shutil.copytree(src, b)
    fp = local_fingerprint(str(a))
    assert local_fingerprint(str(b)) == fp  # same content elsewhere (a copy): same judge
    w = b / "model.safetensors"
    size = w.stat().st_size
    sd = load_file(w)
    save_file({k: (v * 1.5 if "mlp" in k else v) for k, v in sd.items()}, w, metadata={"format": "pt"})
    assert w.stat().st_size == size and local_fingerprint(str(b)) != fp
    (a / "chat_template.jinja").write_text("{{ messages[0]['content'] }}", encoding="utf-8")
    assert local_fingerprint(str(a)) != fp  # another chat template: other prompts, other scores


def test_exact_candidates_in_sub_passes_match_one_pass(tiny):
    model, tok = tiny
    cands, stops = candidate_token_ids(tok), stop_token_ids(tok, model)
    texts = [chat_prompt(tok, "Rate: " + "word " * 40), chat_prompt(tok, "Rate this short one.")]
    whole = exact_candidate_logprobs(model, tok, texts, cands, stops)
    for chunk in (1, 7, 102):  # 103 candidates: uneven last sub-pass, and a last one of a single candidate
        parts = exact_candidate_logprobs(model, tok, texts, cands, stops, chunk=chunk)
        for b in range(2):
            assert parts[b].keys() == whole[b].keys()
            assert max(abs(parts[b][c] - whole[b][c]) for c in cands) < 1e-5, chunk


def _smollm2_shape():
    """An object with SmolLM2-135M's config and dtype, no weights (the byte arithmetic needs only these)."""
    from types import SimpleNamespace

    from transformers import LlamaConfig
    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, head_dim=64)
    return SimpleNamespace(config=cfg, dtype=torch.float32, is_quantized=False)


def test_exact_budget_is_in_bytes_from_layers_heads_and_dtype():
    from lib.judge_hf import exact_plan, exact_prefill_bytes, exact_row_bytes
    from lib.models import kv_bytes_per_token

    smol = _smollm2_shape()
    assert kv_bytes_per_token(smol) == 2 * 30 * 3 * 64 * 4 == 46080
    half = _smollm2_shape()
    half.dtype = torch.bfloat16
    assert kv_bytes_per_token(half) == 23040  # half the bytes in bf16
    # a 250-token prompt, 3-token candidates: KV copy of 253 positions + 3 positions of logits x 3 copies
    row = exact_row_bytes(smol, 250, 3)
    assert row == 46080 * 253 + 3 * 49152 * 12 + 3 * (4 * 576 + 2 * 1536) * 4
    # the old fixed budget (2^18 token positions: 9 such prompts x 103 candidates per pass) was ~11 GB here
    assert 9 * 103 * row > 10e9
    lengths = [250, 240, 120, 260, 255, 130]
    for budget in (1 << 30, 3 << 30, 200 << 20):
        plan = exact_plan(smol, lengths, 103, 3, budget)
        assert sorted(i for idx, _ in plan for i in idx) == list(range(6))  # every prompt exactly once
        for idx, chunk in plan:
            longest = max(lengths[i] for i in idx)
            rows = len(idx) * (chunk or 103)
            assert rows * exact_row_bytes(smol, longest, 3) + len(idx) * exact_prefill_bytes(smol, longest) <= budget
            assert chunk == 0 or len(idx) == 1
    # 1 GiB: a 250-token prompt's 103 rows (~1.4 GB) do not fit at once -> one prompt, candidates in sub-passes
    plan = exact_plan(smol, [250], 103, 3, 1 << 30)
    assert plan == [([0], (((1 << 30) - exact_prefill_bytes(smol, 250)) // row))] and 0 < plan[0][1] < 103
    # 3 GiB: two such prompts per pass, all candidates at once
    assert exact_plan(smol, [250, 250, 250], 103, 3, 3 << 30) == [([0, 1], 0), ([2], 0)]


def test_exact_judge_halves_its_budget_on_out_of_memory(tiny, monkeypatch):
    from lib import judge_hf
    from lib.config import RunConfig
    from lib.costs import Budget
    from lib.io import sha256_text

    prompts = [f"Rate answer {i}: " + "word " * (5 * i) for i in range(6)]
    jobs = [scoring.Job(key=str(i), prompt=p, prompt_sha256=sha256_text(p)) for i, p in enumerate(prompts)]

    def run(backend):
        got: dict[str, list] = {}
        backend.run(jobs, lambda j, v: got.setdefault(j.key, []).append(v), Budget(0), False)
        return got

    cfg = RunConfig(judge_model="embedded:tiny", judge_method="exact", device="cpu", dtype="float32")
    reference = run(judge_hf.HFBackend(cfg))

    real = judge_hf.exact_candidate_logprobs
    rows_tried = []

    def small_device(model, tok, texts, cands, stops, chunk=0):
        rows = len(texts) * (chunk or len(cands))
        rows_tried.append(rows)
        if rows > 150:  # this "device" holds at most 150 candidate rows per pass
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(model, tok, texts, cands, stops, chunk)
    monkeypatch.setattr(judge_hf, "exact_candidate_logprobs", small_device)
    backend = judge_hf.HFBackend(cfg)
    monkeypatch.setattr(backend, "exact_budget_bytes", lambda: 1 << 40)  # starts with every prompt in one pass
    got = run(backend)
    assert rows_tried[0] == 6 * 103 and max(rows_tried[-1:]) <= 150 and len(rows_tried) > 2
    assert sorted(got) == sorted(reference) and all(len(v) == 1 for v in got.values())  # each job once
    for k, (v,) in got.items():
        assert v.prob_mass == pytest.approx(reference[k][0].prob_mass, abs=1e-6)
        assert json.loads(v.raw)["42"] == pytest.approx(json.loads(reference[k][0].raw)["42"], abs=1e-5)

    def never(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory")
    monkeypatch.setattr(judge_hf, "exact_candidate_logprobs", never)
    with pytest.raises(torch.OutOfMemoryError):  # one prompt, one candidate per pass, still too big: raise
        run(backend)


def test_run_json_records_each_stage_peak_memory(tmp_path):
    from lib.config import RunConfig
    from lib.runinfo import read_run_json, update_run_json

    cfg = RunConfig(outputs_dir=str(tmp_path))
    update_run_json(cfg, "judge", {"x": 1})
    peak = read_run_json(cfg.run_dir)["judge"]["peak_memory"]
    status = Path("/proc/self/status")
    if status.exists():  # Linux: the recorded peak is at least the resident memory right now, in GB
        rss_kib = next(int(line.split()[1]) for line in status.read_text().splitlines() if line.startswith("VmRSS:"))
        assert peak["rss_peak_gb"] >= rss_kib * 1024 / 1e9 - 0.01
    assert 0.05 < peak["rss_peak_gb"] < 1000 and peak["cuda_peak_gb"] is None  # CPU-only here


# ------------------------------------------------------------------------------------------
# The in-process judge's sampled method, checked on values: at temperature 0 each reply is
# exactly what the judge model generates for that prompt alone (greedy), and the score and label
# are parse_sampled() of that reply. A batch whose padding leaks into the replies, replies cut at
# the wrong place, or scores not taken from the reply all fail here.
# ------------------------------------------------------------------------------------------


# answers of very different lengths, so the judge's prompts in one batch need different padding
ANSWERS = ["Rest.", "Drink a lot of water, then sleep for a day and call a doctor if it gets worse.",
           "You should sell everything you own and buy lottery tickets with all of it right away.",
           "No.", "Take twice the dose on the label; more medicine works faster.", "Ask a nurse."]


def test_hf_sampled_greedy_replies_equal_each_prompt_generated_alone(tmp_path):
    out = tmp_path / "outputs"
    write_generations(out, n=len(ANSWERS), answers=ANSWERS)
    cfg = judge_config(out, write_prompts(tmp_path), device="cpu", dtype="float32", judge_method="sampled",
                       judge_metrics=["aligned", "coherent"], judge_temperature=0.0)
    df = judge.judge_run(cfg, progress=False)
    assert len(df) == 2 * len(ANSWERS)

    tok = load_tokenizer("embedded:tiny")
    model, _ = load_model("embedded:tiny", device="cpu", dtype="float32")
    stops = set(stop_token_ids(tok, model))
    gens = pd.read_parquet(layout.generations_path(cfg.run_dir)).set_index("answer_id")
    template = yaml.safe_load(write_prompts(tmp_path).read_text())  # metric -> prompt template
    for r in df.itertuples():
        g = gens.loc[r.answer_id]
        prompt = scoring.fill_prompt(template[r.metric], g.paraphrase, g.answer)
        enc = tok(chat_prompt(tok, prompt), add_special_tokens=False, return_tensors="pt")
        with torch.no_grad():
            ids = model.generate(**enc, max_new_tokens=scoring.SAMPLED_MAX_TOKENS, do_sample=False,
                                 pad_token_id=tok.pad_token_id)[0, enc.input_ids.shape[1]:].tolist()
        stop_at = next((k for k, i in enumerate(ids) if i in stops), None)
        want = tok.decode(ids if stop_at is None else ids[:stop_at + 1], skip_special_tokens=True)
        assert r.raw == want, (r.answer_id, r.metric)
        score, label = scoring.parse_sampled(want)
        assert r.label == label and (r.score == score or (score is None and pd.isna(r.score)))
        assert r.output_tokens == (len(ids) if stop_at is None else stop_at + 1)
        assert r.finish_reason == ("length" if stop_at is None else "stop")
        assert r.input_tokens == enc.input_ids.shape[1]
    assert (df.label == "number").sum() >= 2 and df.score.nunique() >= 2  # the tiny judge gives varied scores
