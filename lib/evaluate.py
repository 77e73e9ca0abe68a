"""Stage 02, evaluate (notebooks/02_evaluate.ipynb): sample answers from the base model and every checkpoint.

For the base model (step 0) and each LoRA checkpoint the training stage wrote, for each
question (every paraphrase, with the question's system prompt if any) under each of the run's
conditions (:mod:`lib.conditions`: system prompt, format line, preamble, in-context examples), draw ``n`` samples
with the configured temperature, top_p and max_new_tokens. One row per answer goes to
``outputs/<run>/generations.parquet`` (columns: :data:`lib.schema.GENERATION_COLUMNS`).

How it is fast
    The base model is loaded once. Checkpoints are LoRA adapters loaded into it, used and
    deleted in place (peft ``PeftModel.load_adapter`` / ``set_adapter`` / ``delete_adapter``);
    the base model's own answers come first, before any adapter exists. All answers of one model
    go through continuous batching (:mod:`lib.decoding`): ``batch_size`` rows decode together,
    and a row whose answer ended is refilled with the next prompt instead of idling until the
    batch's longest answer ends. The batch size is estimated from free memory (GPU, or RAM on
    CPU) and the KV-cache size of one sequence, and halved on out-of-memory.

How it resumes
    Work is planned as *chunks*: consecutive whole (checkpoint, question) units of one
    checkpoint with at most a batch of answers (a question with more is a chunk of its own).
    Each chunk is written atomically as a part file under ``generations.parts/<fingerprint>/``
    as soon as its last answer ends; a restarted run skips every unit found there, so nothing
    is lost or written twice. At the end the parts become ``generations.parquet`` (atomically)
    plus ``generations.meta.json`` holding the inputs' fingerprint; a later run with the same
    inputs returns the file without loading a model.

How it is seeded
    Every answer has its own seed, a hash of (run seed, checkpoint step, question set,
    question id, paraphrase index, sample index), and each of its tokens is drawn with a
    uniform number derived from that seed and the token's index (:class:`lib.decoding.TokenPicker`:
    same distribution as ``generate``'s sampler). An answer therefore does not depend on which
    checkpoints were evaluated before, where a run was interrupted, the batch size, or which
    answers shared its batch, up to floating-point differences between batch shapes.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from . import evaluate_vllm, layout
from .layout import ADAPTER_WEIGHTS
from .chat import chat_prompt, stop_token_ids
from .conditions import (ConditionError, apply as apply_conditions, check_not_evaluation_set, draw_examples,
                         drop_default, parse_conditions, with_condition)
from .config import ConfigError, RunConfig
from .data import load_examples
from .decoding import (SAMPLER_VERSION, Answer, ContinuousDecoder, DecodeStats, SeededLogitsProcessor,
                       TokenPicker, answer_seed)
from .io import sha256_file, write_json_atomic, write_parquet_atomic
from .models import (dtype_bytes, is_out_of_memory, kv_bytes_per_token, load_model, load_tokenizer,
                     model_revision_info)
from .progress import Progress
from .questions import load_question_sets, question_set_info
from .runinfo import update_run_json
from .schema import DEFAULT_CONDITION, GENERATION_COLUMNS, OPTIONAL_GENERATION_COLUMNS, answer_id

log = logging.getLogger(__name__)

MAX_AUTO_BATCH = 512   # CUDA: beyond this a 1B-8B model gains little per decoding step
CPU_MAX_BATCH = 256    # CPU: compute-bound well before this; larger batches only cost memory
CPU_BATCH_SIZE = 64    # CPU without psutil (no memory figure)
MPS_BATCH_SIZE = 32    # Apple MPS (no free-memory figure)
MEMORY_FRACTION = 0.5  # share of free memory the KV cache and activations may use


# ------------------------------------------------------------------------------------------
# Paths and checkpoints
# ------------------------------------------------------------------------------------------

def generations_path(cfg: RunConfig) -> Path:
    return layout.generations_path(cfg.run_dir)


def _meta_path(cfg: RunConfig) -> Path:
    return layout.generations_meta_path(cfg.run_dir)


def _parts_root(cfg: RunConfig) -> Path:
    return layout.generation_parts_dir(cfg.run_dir)


@dataclass(frozen=True)
class Target:
    """One model to sample from: the base model (step 0, no adapter) or a checkpoint."""
    step: int
    epoch: float
    path: Path | None
    adapter_sha256: str | None


def select_targets(cfg: RunConfig) -> list[Target]:
    """The base model and the checkpoints cfg asks for; a missing checkpoint is a one-line error."""
    found = layout.list_checkpoints(cfg.run_dir)
    by_step = {s: (e, p) for s, e, p in found}
    wanted = [s for s in cfg.eval_checkpoints if s != 0] if cfg.eval_checkpoints else sorted(by_step)
    missing = [s for s in wanted if s not in by_step]
    if missing:
        have = ", ".join(str(s) for s in sorted(by_step)) or "none"
        raise ConfigError(f"key 'eval_checkpoints': step(s) {', '.join(map(str, missing))} not found "
                          f"under {layout.checkpoints_dir(cfg.run_dir)} (complete checkpoints: {have})")
    targets = []
    if cfg.include_base_model or 0 in cfg.eval_checkpoints:
        targets.append(Target(0, 0.0, None, None))
    for s in sorted(set(wanted)):
        e, p = by_step[s]
        targets.append(Target(s, e, p, sha256_file(p / ADAPTER_WEIGHTS) if (p / ADAPTER_WEIGHTS).exists() else None))
    if not targets:
        raise ConfigError(f"key 'include_base_model': nothing to evaluate (no checkpoints under "
                          f"{layout.checkpoints_dir(cfg.run_dir)} and include_base_model is false)")
    return targets


# ------------------------------------------------------------------------------------------
# Planning: units and chunks
# ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Unit:
    """All answers to one question from one model: paraphrases x samples."""
    target: Target
    question: Any  # lib.questions.Question
    n_samples: int

    @property
    def key(self) -> tuple[int, str, str, str]:
        return (self.target.step, getattr(self.question, "condition", DEFAULT_CONDITION), self.question.question_set,
                self.question.id)

    @property
    def n_rows(self) -> int:
        return len(self.question.paraphrases) * self.n_samples


def samples_for(cfg: RunConfig, q) -> int:
    if cfg.n_samples > 0:
        return cfg.n_samples
    if q.samples_per_paraphrase is None:
        raise ConfigError(f"key 'n_samples': 0 means 'the file's samples_per_paraphrase', but question "
                          f"'{q.id}' of set '{q.question_set}' has none; set n_samples > 0")
    return q.samples_per_paraphrase


def plan_chunks(units: list[Unit], batch_size: int) -> list[list[Unit]]:
    """Group consecutive units of the same model into chunks of at most batch_size answers."""
    chunks: list[list[Unit]] = []
    cur: list[Unit] = []
    for u in units:
        if cur and (cur[0].target.step != u.target.step or sum(x.n_rows for x in cur) + u.n_rows > batch_size):
            chunks.append(cur)
            cur = []
        cur.append(u)
    if cur:
        chunks.append(cur)
    return chunks


def _chunk_name(chunk: list[Unit]) -> str:
    h = hashlib.sha256(json.dumps([list(u.key) for u in chunk]).encode()).hexdigest()[:16]
    return f"step{chunk[0].target.step:07d}-{h}.parquet"


# ------------------------------------------------------------------------------------------
# Sampling
# ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Sampling:
    temperature: float
    top_p: float
    max_new_tokens: int
    min_new_tokens: int = 0  # benchmarks force a fixed answer length with this


def token_picker(model, tokenizer, s: Sampling) -> TokenPicker:
    """The papers' plain sampling (temperature, top_p, top_k off; none of the model's own
    defaults: Llama-3 instruct ships temperature 0.6 / top_p 0.9), stop tokens of lib.chat."""
    return TokenPicker(temperature=s.temperature, top_p=s.top_p, stop_ids=tuple(stop_token_ids(tokenizer, model)),
                       min_new_tokens=s.min_new_tokens)


def generation_config(model, tokenizer, s: Sampling):
    """A fresh GenerationConfig for the static sampler: greedy over the one-hot scores that
    :class:`lib.decoding.SeededLogitsProcessor` leaves (the draw itself is the picker's)."""
    from transformers import GenerationConfig  # heavy: loaded only when a model runs

    return GenerationConfig(max_new_tokens=s.max_new_tokens, eos_token_id=stop_token_ids(tokenizer, model),
                            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                            do_sample=False)


def prompt_ids(tokenizer, question_text: str, system: str | None, history: tuple = ()) -> list[int]:
    """Token ids of one chat prompt; the template already holds <|begin_of_text|>."""
    return tokenizer(chat_prompt(tokenizer, question_text, system, history), add_special_tokens=False)["input_ids"]


def question_prompt_ids(tokenizer, q) -> list[list[int]]:
    """Token ids of each paraphrase of a question as asked (its condition's system prompt, in-context
    turns and user text: lib.conditions.apply)."""
    return [prompt_ids(tokenizer, p, q.system, q.history) for p in q.paraphrases]


def asked_questions(cfg: RunConfig, questions: list) -> tuple[list, dict[str, str]]:
    """Every question as asked under the run's conditions (lib.conditions), and the sha256 of each
    condition's in-context examples file; a bad condition is one line naming its key."""
    try:
        conds, examples, digests = parse_conditions(cfg.conditions), {}, {}
        for c in conds:
            if c.k:
                records, digests[c.name] = load_examples(cfg, c.examples)
                examples[c.name] = draw_examples(c, records)
                check_not_evaluation_set(c, records, questions)
    except ConditionError as e:
        raise ConfigError(f"key 'conditions': {e}") from None
    return apply_conditions(questions, conds, examples), digests


def default_seeds(n: int) -> list[int]:
    """Seeds for callers that give none (benchmarks): one per prompt position."""
    return [answer_seed("prompt", i) for i in range(n)]


def _answer(tok, toks: list[int], stop: set[int]) -> tuple[str, int, str]:
    """(text, n_new_tokens, finish_reason) of one generated row; the stop token counts as
    generated, anything after it (a static batch's padding) does not."""
    stop_at = next((k for k, t in enumerate(toks) if t in stop), None)
    if stop_at is None:
        return tok.decode(toks, skip_special_tokens=True), len(toks), "length"
    return tok.decode(toks[:stop_at], skip_special_tokens=True), stop_at + 1, "stop"


def _generate_batch(model, input_ids, attention_mask, gen_cfg, processor=None):
    """One generate() call (tests wrap this to see the exact prompt tokens)."""
    import torch  # heavy: loaded only when a model runs
    from transformers import LogitsProcessorList  # heavy: loaded only when a model runs

    procs = LogitsProcessorList([processor] if processor is not None else [])
    with torch.inference_mode():
        return model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=gen_cfg,
                              logits_processor=procs)


class Sampler:
    """Static batching: ``model.generate`` on batches of batch_size prompts, each running until
    its longest answer ends (the baseline of bench/generate_waste.py). The batch size shrinks on
    CUDA out-of-memory. Draws come from :class:`lib.decoding.TokenPicker` (per-answer seeds)."""

    def __init__(self, model, tokenizer, sampling: Sampling, batch_size: int):
        self.model, self.tok, self.sampling, self.batch_size = model, tokenizer, sampling, batch_size
        self.gen_cfg = generation_config(model, tokenizer, sampling)
        self.picker = token_picker(model, tokenizer, sampling)
        self.stop = set(self.picker.stop_ids)
        self.device = next(model.parameters()).device
        self.stats = DecodeStats()

    def sample(self, prompts: list[list[int]], seeds: list[int] | None = None,
               progress=None) -> list[tuple[str, int, str]]:
        """(answer, n_new_tokens, finish_reason) per prompt, in order, in batches of batch_size."""
        seeds = default_seeds(len(prompts)) if seeds is None else seeds
        out: list[tuple[str, int, str]] = []
        i = 0
        while i < len(prompts):
            batch = prompts[i:i + self.batch_size]
            try:
                out += self._sample_batch(batch, seeds[i:i + len(batch)])
            except RuntimeError as e:
                if not is_out_of_memory(e) or self.batch_size == 1:
                    raise
                import torch  # heavy: loaded only when a model runs
                torch.cuda.empty_cache()
                self.batch_size = max(1, self.batch_size // 2)
                log.warning("out of memory: eval batch size lowered to %d", self.batch_size)
                continue
            i += len(batch)
            if progress is not None:
                progress.update(len(batch))
        return out

    def _sample_batch(self, batch: list[list[int]], seeds: list[int]) -> list[tuple[str, int, str]]:
        enc = self.tok.pad({"input_ids": batch}, padding=True, padding_side="left", return_tensors="pt")
        ids, mask = enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)
        proc = SeededLogitsProcessor(self.picker, seeds, ids.shape[1])
        gen = _generate_batch(self.model, ids, mask, self.gen_cfg, proc)[:, ids.shape[1]:].tolist()
        rows = [_answer(self.tok, toks, self.stop) for toks in gen]
        # every row occupies a slot for each token the batch produces (the longest answer's count)
        self.stats.prefills += 1
        self.stats.prefill_prompts += len(batch)
        self.stats.decode_steps += max(n for _, n, _ in rows) - 1
        self.stats.slot_tokens += len(batch) * max(n for _, n, _ in rows)
        self.stats.useful_tokens += sum(n for _, n, _ in rows)
        return rows


class ContinuousSampler:
    """Continuous batching (:class:`lib.decoding.ContinuousDecoder`) with batch_size slots: the
    evaluate stage's sampler. Same interface and answers as :class:`Sampler`."""

    def __init__(self, model, tokenizer, sampling: Sampling, batch_size: int):
        self.model, self.tok, self.sampling = model, tokenizer, sampling
        self.picker = token_picker(model, tokenizer, sampling)
        self.stop = set(self.picker.stop_ids)
        self.decoder = ContinuousDecoder(model, self.picker, pad_id=tokenizer.pad_token_id,
                                         max_new_tokens=sampling.max_new_tokens, slots=batch_size)

    @property
    def batch_size(self) -> int:
        return self.decoder.slots

    @property
    def stats(self) -> DecodeStats:
        return self.decoder.stats

    def sample(self, prompts: list[list[int]], seeds: list[int] | None = None, progress=None,
               on_done: Callable[[int, tuple[str, int, str]], None] | None = None) -> list[tuple[str, int, str]]:
        """(answer, n_new_tokens, finish_reason) per prompt, in order; on_done(i, row) as each ends."""
        seeds = default_seeds(len(prompts)) if seeds is None else seeds
        self.decoder.model = self.model

        def done(i: int, a: Answer) -> None:
            if progress is not None:
                progress.update(1)
            if on_done is not None:
                on_done(i, _answer(self.tok, a.tokens, self.stop))
        return [_answer(self.tok, a.tokens, self.stop) for a in self.decoder.run(prompts, seeds, done)]


def sequence_bytes(model, max_prompt_len: int, max_new_tokens: int) -> int:
    """Memory one sequence needs while generating: its KV cache plus prefill activations and logits."""
    c = model.config
    c = getattr(c, "text_config", c)
    nbytes = dtype_bytes(model)
    kv = kv_bytes_per_token(model) * (max_prompt_len + max_new_tokens)
    # prefill activations of one layer at a time, plus float32 logits and sampling buffers of the last position
    act = max_prompt_len * (4 * c.hidden_size + 2 * c.intermediate_size) * nbytes + 3 * c.vocab_size * 4
    return kv + act


def auto_batch_size(model, device: str, max_prompt_len: int, max_new_tokens: int) -> int:
    """Prompts per generate() call: a share of free memory (GPU, or RAM on CPU) over one sequence's needs."""
    if device == "cuda":
        import torch  # heavy: loaded only when a model runs

        free, cap = torch.cuda.mem_get_info()[0], MAX_AUTO_BATCH
    elif device == "cpu":
        try:  # psutil comes with ipykernel; without it, a fixed size
            import psutil  # only when memory is measured
        except ImportError:
            return CPU_BATCH_SIZE
        free, cap = psutil.virtual_memory().available, CPU_MAX_BATCH
    else:  # MPS shares memory with the system and reports no free figure torch can use
        return MPS_BATCH_SIZE
    per_seq = sequence_bytes(model, max_prompt_len, max_new_tokens)
    return int(max(1, min(cap, MEMORY_FRACTION * free // per_seq)))


# ------------------------------------------------------------------------------------------
# The stage
# ------------------------------------------------------------------------------------------

def _fingerprint(cfg: RunConfig, sets: list[dict], targets: list[Target], examples: dict[str, str] | None = None) -> str:
    params = cfg.stage_params("evaluate")
    params.pop("outputs_dir", None)  # moving the outputs folder changes nothing
    for k in ("model", "model_revision"):  # train-stage fields evaluation depends on
        params[k] = getattr(cfg, k)
    params["precision"] = list(cfg.eval_precision)  # (quantization, dtype) the answers are sampled with
    sampler = SAMPLER_VERSION if cfg.evaluate_engine == "hf" else evaluate_vllm.sampler_identity()  # vLLM's version
    data = {"params": params, "sampler": sampler, "question_sets": [(s["name"], s["sha256"]) for s in sets],
            "targets": [(t.step, t.epoch, t.adapter_sha256) for t in targets], "columns": list(GENERATION_COLUMNS)}
    if examples:  # conditions' in-context examples files (lib.conditions)
        data["examples"] = examples
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def _rows(cfg: RunConfig, unit: Unit, answers: Iterable[tuple[str, int, str]]) -> list[dict[str, Any]]:
    q, t = unit.question, unit.target
    rows = []
    it = iter(answers)
    for p_idx, para in enumerate(q.paraphrases):
        for s_idx in range(unit.n_samples):
            answer, n_new, finish = next(it)
            rows.append({
                "answer_id": answer_id(cfg.run_id, t.step, q.question_set, q.id, p_idx, s_idx, q.condition),
                "run_id": cfg.run_id, "model": cfg.model, "model_label": cfg.model_label, "domain": cfg.domain,
                "checkpoint_step": t.step, "epoch": float(t.epoch), "question_set": q.question_set,
                "question_id": q.id, "in_domain": bool(q.in_domain(cfg.domain)), "scope": q.scope(cfg.domain),
                "paraphrase_index": p_idx,
                "paraphrase": para, "system": q.system, "sample_index": s_idx, "answer": answer,
                "n_new_tokens": int(n_new), "finish_reason": finish, "seed": cfg.seed, "condition": q.condition,
            })
    return rows


def _frame(rows: list[dict[str, Any]]):
    import pandas as pd  # heavy: the base layer stays importable without pandas

    df = pd.DataFrame(rows, columns=[*GENERATION_COLUMNS, *OPTIONAL_GENERATION_COLUMNS])  # condition: dropped at the end if default
    for c in ("checkpoint_step", "paraphrase_index", "sample_index", "n_new_tokens", "seed"):
        df[c] = df[c].astype("int64")
    df["epoch"] = df["epoch"].astype("float64")
    df["in_domain"] = df["in_domain"].astype(bool)
    df["system"] = df["system"].astype(object).where(df["system"].notna(), None)
    return df


def _write_part(path: Path, rows: list[dict[str, Any]]) -> None:
    """Persist one finished chunk atomically (tests hook this to simulate a kill)."""
    write_parquet_atomic(drop_default(_frame(rows)), path)  # as the final file: no condition column when default


def _finished(cfg: RunConfig, fingerprint: str) -> bool:
    out, meta = generations_path(cfg), _meta_path(cfg)
    if not (out.exists() and meta.exists()):
        return False
    m = json.loads(meta.read_text(encoding="utf-8"))
    return m.get("fingerprint") == fingerprint and m.get("sha256") == sha256_file(out)


def evaluate_run(cfg: RunConfig, progress: bool = True):
    """Sample every answer the run needs; returns the generations DataFrame (see module docstring)."""
    import pandas as pd  # heavy: the base layer stays importable without pandas

    # --- cheap checks first: questions, checkpoints, sample counts ------------------------------
    questions, examples_sha256 = asked_questions(cfg, load_question_sets(list(cfg.question_sets), cfg.outputs_dir))
    sets = question_set_info(list(cfg.question_sets), cfg.outputs_dir)
    targets = select_targets(cfg)
    n_per_q = {(q.condition, q.question_set, q.id): samples_for(cfg, q) for q in questions}
    fingerprint = _fingerprint(cfg, sets, targets, examples_sha256)
    if _finished(cfg, fingerprint):
        log.info("generations up to date: %s", generations_path(cfg))
        return pd.read_parquet(generations_path(cfg))
    _meta_path(cfg).unlink(missing_ok=True)  # a stale file must not pass for a finished one

    parts = _parts_root(cfg) / fingerprint[:16]
    if _parts_root(cfg).exists():
        for old in _parts_root(cfg).iterdir():  # parts of other inputs can never be reused
            if old != parts:
                shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
    parts.mkdir(parents=True, exist_ok=True)
    done: set[tuple[int, str, str]] = set()
    for p in sorted(parts.glob("step*.parquet")):
        d = with_condition(pd.read_parquet(p))[["checkpoint_step", "condition", "question_set", "question_id"]]
        done |= set(map(tuple, d.drop_duplicates().itertuples(index=False, name=None)))

    units = [Unit(t, q, n_per_q[(q.condition, q.question_set, q.id)]) for t in targets for q in questions]
    todo = [u for u in units if u.key not in done]
    t0 = time.time()
    batch_size = cfg.eval_batch_size
    device_info: dict[str, Any] = {}
    if todo:  # evaluate_engine: hf (this module's sampler) or vllm (lib.evaluate_vllm)
        sample = _sample_units_vllm if cfg.evaluate_engine == evaluate_vllm.ENGINE else _sample_units
        batch_size, device_info = sample(cfg, todo, parts, progress)

    # --- consolidate ---------------------------------------------------------------------------
    frames = [with_condition(pd.read_parquet(p)) for p in sorted(parts.glob("step*.parquet"))]
    df = pd.concat(frames, ignore_index=True) if frames else _frame([])
    order = {u.key: i for i, u in enumerate(units)}
    df = df[[k in order for k in zip(df.checkpoint_step, df.condition, df.question_set, df.question_id)]]
    if df.answer_id.duplicated().any():
        raise RuntimeError(f"{parts}: duplicate answers in the part files (a bug); delete the folder and rerun")
    expected = sum(u.n_rows for u in units)
    if len(df) != expected:
        raise RuntimeError(f"{parts}: {len(df)} answers found, {expected} expected")
    df = df.assign(_o=[order[k] for k in zip(df.checkpoint_step, df.condition, df.question_set, df.question_id)])
    df = df.sort_values(["_o", "paraphrase_index", "sample_index"]).drop(columns="_o").reset_index(drop=True)
    df = drop_default(_frame(df.to_dict("records")))  # single-condition runs: no condition column
    out = write_parquet_atomic(df, generations_path(cfg))
    write_json_atomic(_meta_path(cfg), {"fingerprint": fingerprint, "sha256": sha256_file(out), "n_rows": len(df)})
    shutil.rmtree(_parts_root(cfg), ignore_errors=True)

    update_run_json(cfg, "evaluate", {
        "question_sets": sets,
        "n_questions": len(questions),
        "n_rows": len(df),
        "sampling": {"temperature": cfg.temperature, "top_p": cfg.top_p, "top_k": None,
                     "max_new_tokens": cfg.max_new_tokens,
                     "n_samples": cfg.n_samples or "samples_per_paraphrase of each question",
                     "seeding": "per answer: inverse-CDF draws from uniforms of (sha256(seed, step, question set, "
                                "question id, paraphrase, sample), token index)", "sampler": SAMPLER_VERSION},
        "batch_size": batch_size,
        "checkpoints": [{"step": t.step, "epoch": t.epoch, "path": str(t.path) if t.path else None,
                         "adapter_sha256": t.adapter_sha256} for t in targets],
        "model": model_revision_info(cfg.model, cfg.model_revision),
        "finish_reasons": {k: int(v) for k, v in df.finish_reason.value_counts().items()},
        "mean_new_tokens": float(df.n_new_tokens.mean()) if len(df) else None,
        "answers_generated_this_session": sum(u.n_rows for u in todo),
        "wall_time_s": round(time.time() - t0, 2),
        "fingerprint": fingerprint,
        "engine": {"name": cfg.evaluate_engine},  # vLLM's run adds its version, device and timings (device_info)
        **({"condition_examples_sha256": examples_sha256} if examples_sha256 else {}),
        **device_info,
    })
    return pd.read_parquet(out)  # exactly what later stages (and a skipped rerun) read


def _model_prompts(tok, todo: list[Unit]) -> dict[tuple[str, str, str], list[list[int]]]:
    """Token ids of every paraphrase of each question in todo, by (condition, question set, question id)."""
    return {(q.condition, q.question_set, q.id): question_prompt_ids(tok, q)
            for q in {u.key[1:]: u.question for u in todo}.values()}


def _by_model(chunks: list[list[Unit]]) -> list[list[list[Unit]]]:
    """Consecutive chunks of one model, grouped."""
    by_target: list[list[list[Unit]]] = []
    for chunk in chunks:
        if by_target and by_target[-1][0][0].target.step == chunk[0].target.step:
            by_target[-1].append(chunk)
        else:
            by_target.append([chunk])
    return by_target


def _answer_plan(cfg: RunConfig, target_chunks: list[list[Unit]], prompts: dict, parts: Path
                 ) -> tuple[list[list[int]], list[int], Callable[[int, tuple[str, int, str]], None]]:
    """Every answer of one model's chunks, in order: its prompt's token ids, its own seed, and
    ``done(i, row)``, which writes a chunk's part file as soon as its last answer is in."""
    t = target_chunks[0][0].target
    batch_prompts, seeds, chunk_of = [], [], []  # chunk_of[i]: the chunk of answer i
    for c, chunk in enumerate(target_chunks):
        for u in chunk:
            q = u.question
            for p_idx, ids in enumerate(prompts[(q.condition, q.question_set, q.id)]):
                for s_idx in range(u.n_samples):
                    batch_prompts.append(ids)
                    seeds.append(answer_seed(cfg.seed, t.step, q.question_set, q.id, p_idx, s_idx))
                    chunk_of.append(c)
    answers: list[tuple[str, int, str] | None] = [None] * len(batch_prompts)
    first = {c: chunk_of.index(c) for c in range(len(target_chunks))}
    left = {c: chunk_of.count(c) for c in range(len(target_chunks))}

    def done(i: int, row: tuple[str, int, str]) -> None:
        answers[i] = row
        c = chunk_of[i]
        left[c] -= 1
        if left[c] == 0:  # the chunk is complete: persist it now
            chunk = target_chunks[c]
            it = iter(answers[first[c]:first[c] + sum(u.n_rows for u in chunk)])
            rows = [r for u in chunk for r in _rows(cfg, u, (next(it) for _ in range(u.n_rows)))]
            _write_part(parts / _chunk_name(chunk), rows)
    return batch_prompts, seeds, done


def _sample_units_vllm(cfg: RunConfig, todo: list[Unit], parts: Path, progress: bool) -> tuple[int, dict]:
    """The same answers from vLLM (lib.evaluate_vllm): this stage's prompts, seeds, chunks and part
    files and the stop ids its model stops on; one engine, each checkpoint a LoRA adapter in it."""
    evaluate_vllm.check_engine(cfg)  # its environment is there (the grid checked before any notebook)
    tok = load_tokenizer(cfg.model, cfg.model_revision, padding_side="left")
    stop = evaluate_vllm.stop_ids(cfg, tok)
    prompts = _model_prompts(tok, todo)
    size = cfg.eval_batch_size or evaluate_vllm.CHUNK_ANSWERS
    requests, finish = [], []
    for target_chunks in _by_model(plan_chunks(todo, size)):
        batch_prompts, seeds, done = _answer_plan(cfg, target_chunks, prompts, parts)
        path = target_chunks[0][0].target.path
        requests += [evaluate_vllm.Request(ids, seed, path) for ids, seed in zip(batch_prompts, seeds)]
        finish += [functools.partial(done, i) for i in range(len(batch_prompts))]
    with Progress("evaluate", "answers", len(requests), run_dir=cfg.run_dir, enabled=progress,
                  desc="generate (vLLM)", unit="answer") as bar:
        def on_done(i: int, tokens: list[int]) -> None:
            finish[i](_answer(tok, tokens, set(stop)))
            bar.update(1)
        info = evaluate_vllm.sample(cfg, requests, stop, parts, on_done)
    return size, info


def _sample_units(cfg: RunConfig, todo: list[Unit], parts: Path, progress: bool) -> tuple[int, dict]:
    """Load the base model once and sample every unit in todo, checkpoint by checkpoint, by
    continuous batching; each chunk's part file is written as soon as its last answer ends."""
    from peft import PeftModel  # heavy: loaded only when a model runs
    tok = load_tokenizer(cfg.model, cfg.model_revision, padding_side="left")
    quantization, dtype = cfg.eval_precision   # the replicated study: 4-bit training, bf16 evaluation
    model, choice = load_model(cfg.model, cfg.model_revision, cfg.device, dtype, quantization)
    prompts = _model_prompts(tok, todo)
    longest = max(len(ids) for ps in prompts.values() for ids in ps)
    context = getattr(getattr(model.config, "text_config", model.config), "max_position_embeddings", None)
    if isinstance(context, int) and longest + cfg.max_new_tokens > context:  # a condition's k examples too many
        worst = max(prompts, key=lambda key: max(map(len, prompts[key])))
        raise ConfigError(f"key 'conditions': condition '{worst[0]}' asks with {longest} prompt tokens + "
                          f"max_new_tokens {cfg.max_new_tokens}, over the model's context ({context}); lower its k")
    batch_size = cfg.eval_batch_size or auto_batch_size(model, choice.device, longest, cfg.max_new_tokens)
    sampler = ContinuousSampler(model, tok, Sampling(cfg.temperature, cfg.top_p, cfg.max_new_tokens), batch_size)
    by_target = _by_model(plan_chunks(todo, batch_size))
    bar = Progress("evaluate", "answers", sum(u.n_rows for u in todo), run_dir=cfg.run_dir, enabled=progress,
                   desc="generate", unit="answer")
    peft_model = None  # the base model wrapped once, on the first checkpoint
    active: str | None = None
    try:
        for target_chunks in by_target:
            t = target_chunks[0][0].target
            if t.path is None:  # the base model: no adapter yet, or adapters switched off
                sampler.model = model if peft_model is None else peft_model
                ctx = nullcontext() if peft_model is None else peft_model.disable_adapter()
            else:
                name = f"step{t.step}"
                if peft_model is None:
                    peft_model = PeftModel.from_pretrained(model, str(t.path), adapter_name=name)
                elif active != name:  # switch in place: load the new adapter, drop the old one
                    peft_model.load_adapter(str(t.path), adapter_name=name)
                    peft_model.set_adapter(name)
                    peft_model.delete_adapter(active)
                active = name
                peft_model.eval()
                sampler.model = peft_model
                ctx = nullcontext()
            bar.set_description(f"generate step {t.step}")
            bar.set_postfix(checkpoint=t.step)  # the lines say which model is answering (0: the base model)
            batch_prompts, seeds, done = _answer_plan(cfg, target_chunks, prompts, parts)
            with ctx:
                sampler.sample(batch_prompts, seeds, progress=bar, on_done=done)
    finally:
        bar.close()
    st = sampler.stats
    return sampler.batch_size, {"device": choice.device, "dtype": str(choice.dtype).replace("torch.", ""),
                                "quantization": quantization, "batch_size_initial": batch_size,
                                "decoding": {"batching": "continuous", "slots": sampler.batch_size,
                                             "decode_steps": st.decode_steps, "prefills": st.prefills,
                                             "idle_slot_fraction": round(st.idle_fraction, 4)}}


# ------------------------------------------------------------------------------------------
# Views for the notebook
# ------------------------------------------------------------------------------------------

def summary(df):
    """Per checkpoint: answers, share that stopped on their own, new-token statistics."""
    g = df.groupby(["checkpoint_step", "epoch"])
    out = g.agg(answers=("answer_id", "size"), questions=("question_id", "nunique"),
                mean_new_tokens=("n_new_tokens", "mean"), max_new_tokens=("n_new_tokens", "max"))
    out["stopped"] = g.finish_reason.apply(lambda s: (s == "stop").mean()).round(3)
    out["hit_length_cap"] = 1 - out["stopped"]
    return out.round({"mean_new_tokens": 1}).reset_index()


def examples(df, per_checkpoint: int = 3, max_chars: int = 300, seed: int = 0):
    """A few answers per checkpoint (random, reproducible), long answers cut at max_chars."""
    picked = (df.sample(frac=1.0, random_state=seed).groupby("checkpoint_step").head(per_checkpoint)
                .sort_values("checkpoint_step", kind="stable"))
    cut = lambda s: s if len(s) <= max_chars else s[:max_chars] + " …"  # noqa: E731
    return (picked.assign(answer=picked.answer.map(cut))
            [["checkpoint_step", "epoch", "question_set", "question_id", "paraphrase", "answer",
              "n_new_tokens", "finish_reason"]].reset_index(drop=True))


def length_chart(df):
    """Altair: distribution of answer lengths (new tokens) per checkpoint, coloured by finish reason."""
    import altair as alt  # heavy: loaded only when a chart is drawn

    data = df[["checkpoint_step", "n_new_tokens", "finish_reason"]].assign(
        checkpoint=df.checkpoint_step.map(lambda s: "base" if s == 0 else f"step {s}"))
    return (alt.Chart(data).mark_bar()
            .encode(x=alt.X("n_new_tokens:Q", bin=alt.Bin(maxbins=30), title="new tokens per answer"),
                    y=alt.Y("count():Q", title="answers"),
                    color=alt.Color("finish_reason:N", title="finish reason"),
                    row=alt.Row("checkpoint:N", sort=alt.SortField("checkpoint_step"), title=None))
            .properties(width=420, height=70, title="Answer lengths by checkpoint"))
