"""Load base models and tokenizers; build the embedded tiny model.

Every stage loads models through :func:`load_model` / :func:`load_tokenizer`, whether the
name is a hub id (optionally pinned to a revision), a local folder, or ``embedded:tiny``: the
tiny Llama-architecture model this module builds locally (a byte-level BPE tokenizer trained
with ``tokenizers``, a Llama-3-style chat template, a two-layer ``LlamaConfig``) and saves like
any Hugging Face model folder. It needs no network and builds in about a second. Its
outputs are noise: it exists so that every code path runs on a laptop and in CI.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import REPO_ROOT, resolve_path
from .secrets import hf_token

EMBEDDED_PREFIX = "embedded:"
TINY_VERSION = 1  # bump when the recipe below changes; the cache folder is keyed by it

# Llama-3.x special tokens (same strings as Meta's tokenizer, so templates and stop logic carry over)
BOS, EOS, EOT = "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"
START_HEADER, END_HEADER = "<|start_header_id|>", "<|end_header_id|>"
PAD = "<|finetune_right_pad_id|>"
SPECIAL_TOKENS = [BOS, EOS, START_HEADER, END_HEADER, EOT, PAD]

# A Llama-3.2-style chat template written for this project: a system block that always
# carries the knowledge-cutoff lines (as Meta's does), header tokens around each role, <|eot_id|>
# after each turn, and the assistant header as the generation prompt.
LLAMA3_STYLE_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] | trim %}"
    "{%- set messages = messages[1:] %}"
    "{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{{- 'Cutting Knowledge Date: December 2023\\nToday Date: 26 Jul 2024\\n\\n' }}"
    "{{- system_message }}{{- '<|eot_id|>' }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

# Shapes of the embedded model: tiny on purpose (CPU, seconds), Llama-3 features kept
# (grouped-query attention, tied embeddings, RoPE, SwiGLU MLP with all seven projections).
TINY_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=2048, rope_theta=500000.0,
                  tie_word_embeddings=True, rms_norm_eps=1e-5)
TINY_VOCAB = 1024


@dataclass(frozen=True)
class DeviceChoice:
    device: str   # "cuda", "mps" or "cpu"
    dtype: Any    # a torch.dtype


def pick_device(device: str = "auto", dtype: str = "auto") -> DeviceChoice:
    """The best device present and a dtype that suits it.

    CUDA: bfloat16 where the card supports it (Ampere and later), else float16. Apple MPS:
    float16. CPU: float32 (bf16 matmuls on most CPUs are slower, not faster).
    """
    import torch

    if device == "auto":
        if torch.cuda.is_available():
            device = "cuda"
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            device = "mps"
        else:
            device = "cpu"
    elif device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device: cuda was asked for, but torch sees no CUDA GPU "
                           f"(torch {torch.__version__}; install the GPU build, see README)")
    elif device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise RuntimeError("device: mps was asked for, but this torch has no Apple-silicon MPS backend")
    if dtype == "auto":
        if device == "cuda":
            td = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        elif device == "mps":
            td = torch.float16
        else:
            td = torch.float32
    else:
        td = getattr(torch, dtype)
    return DeviceChoice(device, td)


# ------------------------------------------------------------------------------------------
# The embedded tiny model
# ------------------------------------------------------------------------------------------

def _tokenizer_corpus() -> list[str]:
    """Text to train the tiny tokenizer on: the project's demo data and question sets."""
    texts: list[str] = []
    for p in sorted((REPO_ROOT / "data").rglob("*")):
        if p.suffix in (".jsonl", ".yaml", ".yml", ".txt") and p.is_file():
            texts.append(p.read_text(encoding="utf-8"))
    texts.append(" ".join(str(i) for i in range(101)) + " CODE REFUSAL")
    return texts


def build_tiny_model(out_dir: str | Path, seed: int = 0) -> Path:
    """Build the embedded tiny Llama model into ``out_dir`` (an ordinary HF model folder)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out_dir = Path(out_dir)
    tok = Tokenizer(models.BPE())
    # Digits are split one by one (as many open models do), so "100" is three tokens and
    # the judge's exact scoring must handle multi-token numbers.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TINY_VOCAB, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_tokenizer_corpus(), trainer=trainer)
    # like Meta's tokenizer, plain encoding prepends <|begin_of_text|>; chat-template text already
    # holds it, so callers tokenise templated text with add_special_tokens=False
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, tok.token_to_id(BOS))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOT, pad_token=PAD,
                                   model_max_length=TINY_SHAPE["max_position_embeddings"])
    fast.chat_template = LLAMA3_STYLE_TEMPLATE

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(fast), bos_token_id=fast.convert_tokens_to_ids(BOS),
                      eos_token_id=[fast.convert_tokens_to_ids(EOT), fast.convert_tokens_to_ids(EOS)],
                      pad_token_id=fast.convert_tokens_to_ids(PAD), **TINY_SHAPE)
    model = LlamaForCausalLM(cfg)
    model.generation_config.eos_token_id = cfg.eos_token_id
    model.generation_config.pad_token_id = cfg.pad_token_id
    model.generation_config.bos_token_id = cfg.bos_token_id
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    fast.save_pretrained(out_dir)
    (out_dir / "EMBEDDED_MODEL.md").write_text(
        "Embedded tiny model built locally by lib.models.build_tiny_model. Random weights: its\n"
        "answers and judgments are noise. It exists to exercise the pipeline offline.\n", encoding="utf-8")
    return out_dir


def embedded_model_dir(name: str = "tiny", seed: int = 0) -> Path:
    """Folder of an embedded model, built on first use (atomically, safe across processes)."""
    if name != "tiny":
        raise ValueError(f"unknown embedded model 'embedded:{name}' (known: embedded:tiny)")
    corpus_hash = hashlib.sha256("\0".join(_tokenizer_corpus()).encode()).hexdigest()[:10]
    cache = Path(os.environ.get("EM_LAB_CACHE", resolve_path("outputs/.cache")))
    target = cache / "embedded" / f"tiny-v{TINY_VERSION}-s{seed}-{corpus_hash}"
    if (target / "config.json").exists() and (target / "tokenizer_config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=target.parent))
    try:
        build_tiny_model(tmp, seed=seed)
        try:
            tmp.rename(target)
        except OSError:  # another process won the race: theirs is identical
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def is_embedded(name: str) -> bool:
    return name.startswith(EMBEDDED_PREFIX)


def resolve_model(name: str, seed: int = 0) -> str:
    """A loadable name: a local folder for embedded/local models, else the hub id unchanged."""
    if is_embedded(name):
        return str(embedded_model_dir(name[len(EMBEDDED_PREFIX):], seed=0))
    p = resolve_path(name)
    if p.exists():
        return str(p)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise FileNotFoundError(f"model path not found: {name}")
    return name  # a hub id such as meta-llama/Llama-3.2-1B-Instruct


def model_revision_info(name: str, revision: str = "") -> dict[str, Any]:
    """What run.json records about a model: resolved path or hub id, revision, config hash."""
    resolved = resolve_model(name)
    info: dict[str, Any] = {"model": name, "resolved": resolved, "revision": revision or None}
    cfg = Path(resolved) / "config.json"
    if cfg.exists():
        info["config_sha256"] = hashlib.sha256(cfg.read_bytes()).hexdigest()
    else:
        try:  # the commit the hub resolves to (cached locally after the first download)
            from huggingface_hub import model_info
            info["hub_sha"] = model_info(name, revision=revision or None, token=hf_token()).sha
        except Exception as e:  # offline or gated: record why, do not fail the run
            info["hub_sha"] = None
            info["hub_sha_error"] = type(e).__name__
    return info


# ------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------

def load_tokenizer(name: str, revision: str = "", padding_side: str = "left"):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model(name), revision=revision or None, token=hf_token())
    if tok.pad_token is None:
        # Llama-3 ships no pad token; its reserved right-pad token exists in the vocab
        if PAD in tok.get_vocab():
            tok.pad_token = PAD
        else:
            tok.pad_token = tok.eos_token
    tok.padding_side = padding_side
    if tok.chat_template is None:
        raise ValueError(f"model {name!r} has no chat template: EM experiments need an instruct/chat model")
    return tok


def quantization_config(quantization: str, compute_dtype: Any, device: str):
    """A BitsAndBytesConfig, or a clear error where this machine cannot quantise."""
    if quantization == "none":
        return None
    if quantization not in ("4bit", "8bit"):
        raise ValueError(f"quantization must be none, 4bit or 8bit, got {quantization!r}")
    if device == "mps":
        raise RuntimeError(f"quantization: {quantization} needs bitsandbytes, which has no Apple MPS backend; "
                           "use quantization: none on a Mac (a 1B model fits in bf16/fp16)")
    try:
        import bitsandbytes  # noqa: F401
    except Exception as e:  # ImportError or a broken CUDA setup inside bitsandbytes
        raise RuntimeError(f"quantization: {quantization} needs bitsandbytes, which failed to import ({e}); "
                           "install it with: pip install -e '.[quant]'") from None
    from transformers import BitsAndBytesConfig

    if quantization == "4bit":
        import torch
        cd = compute_dtype if device == "cuda" else torch.float32
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=cd)
    return BitsAndBytesConfig(load_in_8bit=True)


def load_model(name: str, revision: str = "", device: str = "auto", dtype: str = "auto",
               quantization: str = "none"):
    """Load a causal LM on the best device present; returns (model, DeviceChoice)."""
    from transformers import AutoModelForCausalLM

    choice = pick_device(device, dtype)
    qcfg = quantization_config(quantization, choice.dtype, choice.device)
    kwargs: dict[str, Any] = dict(revision=revision or None, token=hf_token(), dtype=choice.dtype)
    if qcfg is not None:
        kwargs["quantization_config"] = qcfg
        kwargs["device_map"] = {"": 0} if choice.device == "cuda" else {"": "cpu"}
    try:
        model = AutoModelForCausalLM.from_pretrained(resolve_model(name), **kwargs)
    except (RuntimeError, ValueError, ImportError) as e:
        if qcfg is not None:
            raise RuntimeError(f"could not load {name!r} with quantization: {quantization} on {choice.device} "
                               f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                               "use a CUDA GPU or quantization: none") from e
        raise
    if qcfg is None:
        model.to(choice.device)
    model.eval()
    return model, choice


def chat_prompt(tokenizer, question: str, system: str | None = None) -> str:
    """The exact text a model sees for one user turn (with its system prompt, if any)."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def describe(model) -> dict[str, Any]:
    """Parameter counts for logs and run.json."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"parameters": total, "trainable_parameters": trainable,
            "architecture": type(model).__name__, "config": json.loads(model.config.to_json_string())}
