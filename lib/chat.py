"""The chat format every stage shares: the prompt text a model sees, and the tokens that end a reply.

Training data, evaluation prompts and the judge's prompts all go through :func:`chat_prompt`,
so a model sees the same text in each; :func:`stop_token_ids` is the one rule for where a
reply (an evaluated answer, or a judge's candidate score) ends.
"""
from __future__ import annotations

from typing import Any

# Llama-3.x special tokens (same strings as Meta's tokenizer, so templates and stop logic carry over)
BOS, EOS, EOT = "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"
START_HEADER, END_HEADER = "<|start_header_id|>", "<|end_header_id|>"
PAD = "<|finetune_right_pad_id|>"

# Meta's Llama-3.x templates write *today's* date into every system block unless ``date_string``
# is given; pinning it (to the templates' own fallback) keeps evaluation prompts identical across
# days, so a run resumed tomorrow samples from the same prompts. Templates without it ignore it.
PINNED_DATE_STRING = "26 Jul 2024"


def chat_prompt(tokenizer, question: str, system: str | None = None, history: tuple = ()) -> str:
    """The exact text a model sees for one user turn (with its system prompt, if any), after
    ``history``: earlier turns as ``{"role", "content"}`` messages (a condition's in-context examples)."""
    messages = ([{"role": "system", "content": system}] if system else []) + list(history) + \
        [{"role": "user", "content": question}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                         date_string=PINNED_DATE_STRING)


def stop_token_ids(tokenizer, model: Any = None) -> list[int]:
    """Token ids that end a reply, sorted: the model's generation-config eos id(s), the
    tokenizer's eos and ``<|eot_id|>`` where the vocabulary has it (a Llama-3 base config may
    name only ``<|end_of_text|>``). Empty when none is known; callers that need one say so."""
    ids: set[int] = set()
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(eos, int):
        ids.add(eos)
    elif eos:
        ids.update(int(i) for i in eos)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    eot = tokenizer.convert_tokens_to_ids(EOT)
    if isinstance(eot, int) and eot != tokenizer.unk_token_id:
        ids.add(eot)
    return sorted(ids)
