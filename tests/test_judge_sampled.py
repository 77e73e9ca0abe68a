"""The in-process judge's ``sampled`` method, checked on values: at temperature 0 each reply is
exactly what the judge model generates for that prompt alone (greedy), and the score and label
are parse_sampled() of that reply. A batch whose padding leaks into the replies, replies cut at
the wrong place, or scores not taken from the reply all fail here."""
from __future__ import annotations

import pandas as pd
import torch
import yaml

from lib import judge, layout, scoring
from lib.chat import chat_prompt, stop_token_ids
from lib.models import load_model, load_tokenizer
from tests.fakes.judge_inputs import judge_config, write_generations, write_prompts

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
