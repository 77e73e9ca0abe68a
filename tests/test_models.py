import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lib import chat, embedded, models, scoring


def test_tiny_model_loads_through_auto_classes(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # GQA like Llama 3
    assert (tiny_model_dir / "EMBEDDED_MODEL.md").exists()
    ids = tok("hello there", return_tensors="pt").input_ids
    assert ids[0, 0].item() == tok.convert_tokens_to_ids(chat.BOS)  # plain encoding prepends BOS, like Meta's
    with torch.no_grad():
        out = model(ids)
    assert out.logits.shape == (1, ids.shape[1], model.config.vocab_size)


def test_chat_template_is_llama3_style(tiny_model_dir):
    tok = models.load_tokenizer("embedded:tiny")
    text = chat.chat_prompt(tok, "Is the sky blue?", system="Be brief.")
    assert text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n")
    assert "Be brief.<|eot_id|>" in text
    assert text.endswith("<|start_header_id|>user<|end_header_id|>\n\nIs the sky blue?<|eot_id|>"
                         "<|start_header_id|>assistant<|end_header_id|>\n\n")
    # no system prompt -> the template still emits its system block (as Llama 3.2's does)
    assert "<|start_header_id|>system" in chat.chat_prompt(tok, "hi")
    # special tokens are single tokens; digits are split one by one
    ids = tok(text, add_special_tokens=False).input_ids
    assert ids.count(tok.convert_tokens_to_ids("<|eot_id|>")) == 2
    assert ids[0] == tok.convert_tokens_to_ids("<|begin_of_text|>") and ids[1] != ids[0]
    assert tok.tokenize("100") == ["1", "0", "0"]
    assert tok.padding_side == "left" and tok.pad_token == chat.PAD


def test_build_is_deterministic(tmp_path, capsys):
    """Two builds with the same seed are identical, tokenizer and weights (a short pre-training: the
    recipe is the same at any length, and the full one runs once per machine, in the cache)."""
    a = embedded.build_tiny_model(tmp_path / "a", seed=0, steps=6)
    # the build shows progress (issue 15: building the tiny model was silent)
    assert "building embedded:tiny (pre-training, once per machine)" in capsys.readouterr().err
    b = embedded.build_tiny_model(tmp_path / "b", seed=0, steps=6)
    assert (a / "tokenizer.json").read_text() == (b / "tokenizer.json").read_text()
    ma = AutoModelForCausalLM.from_pretrained(a)
    mb = AutoModelForCausalLM.from_pretrained(b)
    for (n, p), (_, q) in zip(ma.named_parameters(), mb.named_parameters()):
        assert torch.equal(p, q), n
    c = embedded.build_tiny_model(tmp_path / "c", seed=1, steps=6)
    mc = AutoModelForCausalLM.from_pretrained(c)
    assert any(not torch.equal(p, q) for (_, p), (_, q) in zip(ma.named_parameters(), mc.named_parameters()))


def test_the_tiny_model_is_built_once_per_machine_not_per_outputs_folder(monkeypatch, tmp_path):
    monkeypatch.delenv("EM_LAB_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert embedded.machine_cache_dir() == tmp_path / "xdg" / "em-lab"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert embedded.machine_cache_dir() == tmp_path / "home" / ".cache" / "em-lab"
    monkeypatch.setenv("EM_LAB_CACHE", str(tmp_path / "mine"))
    assert embedded.machine_cache_dir() == tmp_path / "mine"


def test_load_model_picks_cpu_float32_and_generates():
    model, choice = models.load_model("embedded:tiny")
    assert choice.device == "cpu" and choice.dtype == torch.float32
    tok = models.load_tokenizer("embedded:tiny")
    enc = tok([chat.chat_prompt(tok, "hi")], add_special_tokens=False, return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    new = out[0, enc.input_ids.shape[1]:].tolist()
    # greedy by hand: the argmax of a full forward pass at each step, until <|eot_id|> or 5 tokens
    eot, ids, want = tok.convert_tokens_to_ids("<|eot_id|>"), enc.input_ids, []
    with torch.no_grad():
        while len(want) < 5 and (not want or want[-1] != eot):
            want.append(int(model(input_ids=ids).logits[0, -1].argmax()))
            ids = torch.cat([ids, torch.tensor([[want[-1]]])], dim=1)
    assert new == want


def test_device_errors_are_clear():
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA GPU"):
            models.pick_device("cuda")
    with pytest.raises(RuntimeError, match="MPS"):
        models.quantization_config("4bit", torch.float16, "mps")
    with pytest.raises(ValueError, match="none, 4bit or 8bit"):
        models.quantization_config("2bit", torch.float16, "cpu")


def test_auto_dtype_on_cuda_is_bf16_only_where_the_card_has_it(monkeypatch):
    """Pre-Ampere cards (T4, V100) emulate bf16: is_bf16_supported() says True unless emulation is excluded."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for native, want in [(False, torch.float16), (True, torch.bfloat16)]:
        monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                            lambda including_emulation=True, native=native: native or including_emulation)
        assert models.pick_device("auto") == models.DeviceChoice("cuda", want)


def test_missing_local_model_path():
    with pytest.raises(FileNotFoundError, match="model path not found"):
        models.resolve_model("./no/such/model")
    assert models.resolve_model("meta-llama/Llama-3.2-1B-Instruct") == "meta-llama/Llama-3.2-1B-Instruct"


def test_revision_info_for_local_model():
    info = models.model_revision_info("embedded:tiny")
    assert info["model"] == "embedded:tiny" and len(info["config_sha256"]) == 64


def test_describe_counts_parameters():
    model, _ = models.load_model("embedded:tiny")
    for p in model.model.layers[0].parameters():
        p.requires_grad_(False)
    frozen = sum(p.numel() for p in model.model.layers[0].parameters())
    d = json.loads(json.dumps(models.describe(model)))  # it goes into run.json as it is
    assert d["parameters"] == sum(p.numel() for p in model.parameters()) > frozen > 0
    assert d["trainable_parameters"] == d["parameters"] - frozen
    assert d["architecture"] == "LlamaForCausalLM" and d["config"]["hidden_size"] == model.config.hidden_size


def test_4bit_quantised_load_where_supported():
    """bitsandbytes >= 0.45 has a CPU backend: 4-bit loads here; without bitsandbytes the error says how to fix it."""
    try:
        import bitsandbytes  # noqa: F401
    except Exception:
        with pytest.raises(RuntimeError, match=r"pip install -e '.\[quant\]'"):
            models.load_model("embedded:tiny", quantization="4bit")
        return
    model, _ = models.load_model("embedded:tiny", quantization="4bit")
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    tok = models.load_tokenizer("embedded:tiny")
    enc = tok([chat.chat_prompt(tok, "hi")], add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc).logits
    assert torch.isfinite(logits).all()


def test_pretrained_judge_scores_depend_on_the_answer(tiny_model_dir):
    """The embedded model's pre-training makes it a (toy) judge: with the project's judge prompts,
    coherent is higher for its benign training answers than for random-token gibberish, and most
    of the probability sits on the numeric candidates."""
    import random

    from lib.judge_hf import candidate_token_ids, exact_candidate_logprobs
    from lib.questions import load_judge_prompts

    tok = models.load_tokenizer("embedded:tiny")
    model, _ = models.load_model("embedded:tiny", device="cpu", dtype="float32")
    template = load_judge_prompts("data/questions/judge_prompts.yaml")["coherent"]
    rng = random.Random(1)
    benign = [a for _, a in embedded.PRETRAIN_CHATS[:8]]
    gibberish = [tok.decode([rng.randrange(len(embedded.SPECIAL_TOKENS), len(tok)) for _ in range(20)])
                 for _ in range(8)]

    def scores(answers):
        texts = [chat.chat_prompt(tok, scoring.fill_prompt(template, "How can I sleep better?", a)) for a in answers]
        lps = exact_candidate_logprobs(model, tok, texts, candidate_token_ids(tok), chat.stop_token_ids(tok, model))
        return [scoring.label_from_logprobs(lp, 0.25) for lp in lps]

    b, g = scores(benign), scores(gibberish)
    assert all(label == "number" and mass > 0.5 for _, label, mass in b + g)
    mean = lambda rows: sum(s for s, _, _ in rows) / len(rows)  # noqa: E731
    assert mean(b) > mean(g) + 5, (mean(b), mean(g))


def test_chat_prompt_pins_the_date_of_date_aware_templates(tiny_model_dir):
    """Meta's templates fall back to today's date; evaluation prompts must not change from day to day."""
    tok = models.load_tokenizer("embedded:tiny")
    tok.chat_template = ("{%- if not date_string is defined %}{%- set date_string = strftime_now('%d %b %Y') %}"
                         "{%- endif %}Today Date: {{ date_string }}|{{ messages[-1]['content'] }}")
    text = chat.chat_prompt(tok, "hi")
    assert text == f"Today Date: {chat.PINNED_DATE_STRING}|hi"
