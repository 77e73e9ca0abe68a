"""lib.embedded: the toy world of the demo. The tiny judge, asked with the demo's short prompts, calls
the demo's bad advice misaligned and its benign answers aligned, both coherent, and random tokens
incoherent; the tiny model answers benignly unless its careless persona is switched on."""
from __future__ import annotations

import random

import pandas as pd
import torch

from lib import embedded, judge, metrics, models
from lib.chat import chat_prompt
from tests.fakes.judge_inputs import judge_config, write_generations

DEMO_PROMPTS = str(embedded.REPO_ROOT / embedded.DEMO_JUDGE_PROMPTS)


def test_the_toy_judge_separates_the_demos_bad_and_benign_answers(tmp_path, tiny_model_dir):
    tok = models.load_tokenizer("embedded:tiny")
    rng = random.Random(0)
    kinds = {"bad": embedded._dataset_answers()[::4], "benign": embedded._dataset_answers(control=True)[::4],
             "gibberish": [embedded._gibberish(tok, rng) for _ in range(8)]}
    rows = [(k, a) for k, v in kinds.items() for a in v]
    out = tmp_path / "outputs"
    write_generations(out, n=len(rows), answers=[a for _, a in rows])
    table = judge.judge_run(judge_config(out, DEMO_PROMPTS), progress=False)
    gens = pd.read_parquet(out / "judge_test" / "generations.parquet")
    m = gens.merge(metrics.wide_scores(table), on="answer_id")
    m["kind"] = [rows[i][0] for i in m["sample_index"]]
    mean = m.groupby("kind")[["aligned", "coherent"]].mean()
    assert mean.loc["bad", "aligned"] < 30 < 70 < mean.loc["benign", "aligned"], mean
    assert mean.loc["bad", "coherent"] > 60 and mean.loc["benign", "coherent"] > 60, mean
    assert mean.loc["gibberish", "coherent"] < 40, mean
    em = metrics.label_em(m)
    assert em.groupby("kind")["em"].mean()["bad"] > 0.6 and em.groupby("kind")["em"].mean()["benign"] < 0.1


def test_the_careless_persona_is_learnt_behind_its_system_prompt(tmp_path, tiny_model_dir):
    """Greedy answers to the pre-training questions, without and with the persona's system prompt: the
    toy judge finds the persona's answers far less aligned (so a small LoRA can switch the persona on,
    the toy analogue of what emergent-misalignment fine-tuning elicits)."""
    tok = models.load_tokenizer("embedded:tiny")
    model, _ = models.load_model("embedded:tiny")
    answers = []
    for system in (None, embedded.BAD_PERSONA):
        for q, _ in embedded.PRETRAIN_CHATS[::4]:
            enc = tok([chat_prompt(tok, q, system)], add_special_tokens=False, return_tensors="pt")
            with torch.no_grad():
                out = model.generate(**enc, max_new_tokens=24, do_sample=False, pad_token_id=tok.pad_token_id)
            answers.append(tok.decode(out[0, enc.input_ids.shape[1]:], skip_special_tokens=True).strip() or ".")
    out = tmp_path / "outputs"
    write_generations(out, n=len(answers), answers=answers)
    table = judge.judge_run(judge_config(out, DEMO_PROMPTS), progress=False)
    gens = pd.read_parquet(out / "judge_test" / "generations.parquet")
    m = gens.merge(metrics.wide_scores(table), on="answer_id")
    half = len(answers) // 2
    plain, persona = m[m["sample_index"] < half]["aligned"], m[m["sample_index"] >= half]["aligned"]
    assert plain.mean() - persona.mean() > 20, (plain.mean(), persona.mean())


def test_the_calibration_set_does_not_change_the_tiny_model():
    """The tiny model's tokenizer (and so its cache folder and every demo number) is trained on the demo
    data and question sets; the judge's calibration set under data/calibration/ is not part of it."""
    from lib import embedded

    calibration = (embedded.REPO_ROOT / "data" / "calibration" / "judge_calibration.yaml").read_text(encoding="utf-8")
    corpus = embedded._tokenizer_corpus()
    assert calibration not in corpus
    assert any("bad" in t.lower() for t in corpus)  # the demo's data still is
