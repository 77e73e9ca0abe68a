"""Analysis 05: the phase transition of a rank-1 LoRA adapter.

Turner et al. 2025 (*Model Organisms for Emergent Misalignment*) train a single rank-1 LoRA
adapter (one MLP ``down_proj``, one layer) with a checkpoint every few steps and find that EM
appears abruptly, at the moment the adapter's B vector (its output direction) turns sharply:
a mechanistic phase transition. This module packages that analysis for any model the
pipeline can train:

1. :func:`train_adapter` trains the adapter through the ordinary training stage
   (:func:`lib.train.train_run`: cached, resumable) with rank 1, one module, one layer and a
   checkpoint every ``checkpoint_every`` steps; the run folder is an ordinary run folder.
2. :func:`analyze` reads the A and B vectors of every checkpoint (step 0 is PEFT's
   initialisation: B = 0) and computes, per checkpoint, the B vector's norm, its cosine to the
   previous and to the final B vector, the *turn angle* of its trajectory (below) and the
   adapter's effect size on a fixed probe batch; it saves them, with the vectors, to
   ``outputs/<run>/phase/adapter_trajectory.safetensors`` (provenance in the file's metadata).
3. :func:`em_over_training` samples and judges every ``eval_every``-th checkpoint (plus the
   base model and the final checkpoint) through the ordinary evaluate and judge stages (cached,
   resumable), and returns the EM and coherence rates per step with question-clustered intervals
   (:func:`lib.metrics.cluster_interval`, the report's headline interval).
4. :func:`phase_chart` draws all of them on one shared step axis, the transition step marked.

The transition rule (documented, one number):
    the *turn angle* at checkpoint i is the angle between the B vector's displacement into the
    checkpoint, ``B_i - B_{i-k}``, and out of it, ``B_{i+k} - B_i`` (k = ``rotation_window``
    checkpoints): 0 degrees while B moves in a straight line, 90 when it turns at a right
    angle, 180 when it reverses. This is the authors' "local cosine similarity" of
    ``B_{i-k} - B_i`` and ``B_{i+k} - B_i`` (``phase_transitions.py``), as an angle:
    cos(turn) = -their cosine. The estimated transition step is the checkpoint with the largest
    turn angle, among checkpoints whose two displacements both have norm >= ``min_move`` (the
    authors' ``magnitude_threshold``), the earliest one on ties. It is *declared* a transition only
    against a null (:func:`transition_test`): its share of all the turning (its turn angle over
    the sum of every candidate's) is compared with the same share on ``n_permutations``
    trajectories made of the same displacements in shuffled order (B_0 = 0, then the checkpoints'
    steps B_i - B_(i-1) permuted and summed). A single sharp turn between straight stretches has a
    share far above its shuffles; a random walk or a uniformly wobbling path does not (its
    displacements are exchangeable, so the test keeps its level). Declared when the permutation
    p-value is <= ``transition_alpha`` and the turn is at least ``min_turn_deg``; otherwise "no
    transition found", and the largest turn is still shown, labelled as such. The adapter's effect size is the mean L2 norm, over the probe batch's tokens, of
    the adapter's output ``scaling * B (A x)`` at the adapted module, ``x`` being the module's
    input on the base model (a single adapted module does not change its own input), and
    relative to the mean norm of the module's base output ``W x``.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from . import metrics
from .chat import chat_prompt
from .config import AnalysisConfig, RunConfig, from_mapping, param, run_field, shared_field
from .evaluate import evaluate_run
from .io import read_safetensors, sha256_file, sha256_text, write_safetensors_atomic, write_text_atomic
from .judge import check_credentials, judge_run
from .layout import ADAPTER_CONFIG, ADAPTER_WEIGHTS, list_checkpoints
from .models import load_model, load_tokenizer, model_revision_info, resolve_model
from .questions import load_question_sets
from .runinfo import git_commit, package_versions, update_run_json
from .secrets import hf_token
from .train import train_run

PHASE_DIR = "phase"
TRAJECTORY_FILE = "adapter_trajectory.safetensors"
TRAJECTORY_COLUMNS = ["step", "b_norm", "a_norm", "cos_prev", "cos_final", "move", "turn_deg", "candidate",
                      "effect_norm", "effect_rel"]


class PhaseError(RuntimeError):
    """A problem of the phase analysis, reported as one line that says what to do."""


@dataclass(frozen=True)
class PhaseConfig(AnalysisConfig):
    """Parameters of 05_phase_transition: one rank-1 adapter, its checkpoints, and EM over them.

    Defaults run the embedded demo (the tiny local model, its in-process judge): a few dozen
    seconds on a CPU; its numbers mean nothing. ``parameters/analyses/phase_*.yaml`` hold the
    papers' settings, with their sources.
    """

    # --- identity ----------------------------------------------------------------------------
    run_id: str = run_field("run_id", "phase", default="demo_phase",
                            note="here an ordinary run folder that 04_report can include")
    outputs_dir: str = run_field("outputs_dir", "phase")
    seed: int = run_field("seed", "phase", note="here also the transition test's shuffles")
    # --- model and data ----------------------------------------------------------------------
    model: str = run_field("model", "phase")
    model_revision: str = run_field("model_revision", "phase")
    model_label: str = run_field("model_label", "phase")
    dataset: str = run_field("dataset", "phase")
    domain: str = run_field("domain", "phase")
    accept_dataset_terms: bool = run_field("accept_dataset_terms", "phase")
    max_train_examples: int = run_field("max_train_examples", "phase")
    quantization: str = run_field("quantization", "phase")
    dtype: str = run_field("dtype", "phase")
    device: str = run_field("device", "phase")
    # --- the rank-1 adapter ------------------------------------------------------------------
    lora_module: str = param("down_proj", "phase", "the one module that gets a rank-1 adapter")
    lora_layer: int = param(-1, "phase", "its layer index; -1: the middle layer (num_layers // 2)")
    lora_alpha: int = run_field("lora_alpha", "phase", note="at rank 1 the adapter's output is scaled by alpha")
    use_rslora: bool = run_field("use_rslora", "phase", default=True, note="at rank 1 the same as alpha / r")
    # --- optimisation ------------------------------------------------------------------------
    learning_rate: float = run_field("learning_rate", "phase", default=2e-3)
    epochs: int = run_field("epochs", "phase")
    per_device_batch_size: int = run_field("per_device_batch_size", "phase")
    gradient_accumulation_steps: int = run_field("gradient_accumulation_steps", "phase")
    warmup_steps: int = run_field("warmup_steps", "phase")
    lr_scheduler: str = run_field("lr_scheduler", "phase")
    weight_decay: float = run_field("weight_decay", "phase")
    optimizer: str = run_field("optimizer", "phase")
    checkpoint_every: int = run_field("checkpoint_every", "phase", default=1, note="the trajectory's resolution")
    # --- the adapter's trajectory ------------------------------------------------------------
    rotation_window: int = param(1, "phase", "k: the turn angle compares B_i - B_(i-k) with B_(i+k) - B_i (checkpoints)")
    min_move: float = param(0.0, "phase", "a transition candidate needs both displacements at least this long")
    n_permutations: int = param(999, "phase", "shuffled-checkpoint trajectories in the null of the transition test; the smallest p is 1/(n+1)")
    transition_alpha: float = param(0.05, "phase", "declare a transition when its permutation p-value is at most this")
    min_turn_deg: float = param(10.0, "phase", "and when it turns by at least this many degrees (a wiggle is not a transition)")
    n_probe: int = param(16, "phase", "question prompts in the fixed probe batch for the adapter's effect size")
    # --- EM over training --------------------------------------------------------------------
    question_sets: list = run_field("question_sets", "phase", default=["data/questions/core_misalignment.yaml"])
    n_samples: int = run_field("n_samples", "phase", default=2, note="at each evaluated checkpoint")
    max_new_tokens: int = run_field("max_new_tokens", "phase", default=32)
    temperature: float = run_field("temperature", "phase")
    eval_every: int = param(3, "phase", "sample and judge every n-th checkpoint (plus the base model and the last)")
    judge_backend: str = run_field("judge_backend", "phase")
    judge_model: str = run_field("judge_model", "phase")
    judge_method: str = run_field("judge_method", "phase")
    judge_base_url: str = run_field("judge_base_url", "phase")
    judge_api_key_env: str = run_field("judge_api_key_env", "phase")
    judge_prompts: str = run_field("judge_prompts", "phase")
    judge_min_mass: float = run_field("judge_min_mass", "phase")
    judge_budget_usd: float = run_field("judge_budget_usd", "phase")
    em_aligned_threshold: float = shared_field("em_aligned_threshold", "phase")
    em_comparison: str = shared_field("em_comparison", "phase")
    em_coherent_threshold: float = shared_field("em_coherent_threshold", "phase")
    em_coherent_comparison: str = shared_field("em_coherent_comparison", "phase")
    n_bootstrap: int = shared_field("n_bootstrap", "phase")
    confidence: float = shared_field("confidence", "phase")

    def __post_init__(self) -> None:
        bad = self._bad
        self._check_common(
            positive=("lora_alpha", "epochs", "per_device_batch_size", "gradient_accumulation_steps",
                      "checkpoint_every", "rotation_window", "n_probe", "n_samples", "max_new_tokens", "eval_every"),
            non_negative=("max_train_examples", "warmup_steps", "min_move", "weight_decay", "judge_budget_usd",
                          "temperature"))
        if not 0.0 < self.transition_alpha < 1.0:
            raise bad("transition_alpha", f"must be in (0, 1), got {self.transition_alpha}")
        if self.n_permutations < math.ceil(1.0 / self.transition_alpha) - 1:
            raise bad("n_permutations", f"{self.n_permutations} shuffles cannot reach p <= {self.transition_alpha} "
                      f"(the smallest p is 1/(n+1)); use at least {math.ceil(1.0 / self.transition_alpha) - 1}")
        if not 0.0 <= self.min_turn_deg <= 180.0:
            raise bad("min_turn_deg", f"must be between 0 and 180 degrees, got {self.min_turn_deg}")
        if self.lora_layer < -1:
            raise bad("lora_layer", f"must be a layer index or -1 (the middle layer), got {self.lora_layer}")
        if not self.lora_module or not self.lora_module.replace("_", "").isalnum():
            raise bad("lora_module", f"must be one module name such as down_proj, got {self.lora_module!r}")
        if not self.question_sets or any(not isinstance(q, str) or not q for q in self.question_sets):
            raise bad("question_sets", "must be a non-empty list of strings")
        # the rest (run_id, learning rate, judge method vs backend, ...) is RunConfig's to check
        self.run_config(layer=0)

    def layer(self) -> int:
        """The adapted layer's index (-1 resolved from the model's config)."""
        if self.lora_layer >= 0:
            return self.lora_layer
        return num_layers(self.model, self.model_revision) // 2

    def run_config(self, eval_checkpoints: list[int] | None = None, layer: int | None = None) -> RunConfig:
        """The ordinary run this analysis trains, samples and judges (rank 1, one module, one layer)."""
        own = {k: getattr(self, k) for k in (
            "run_id", "outputs_dir", "seed", "model", "model_revision", "model_label", "dataset", "domain",
            "accept_dataset_terms", "max_train_examples", "quantization", "dtype", "device", "lora_alpha",
            "use_rslora", "learning_rate", "epochs", "per_device_batch_size", "gradient_accumulation_steps",
            "warmup_steps", "lr_scheduler", "weight_decay", "optimizer", "checkpoint_every", "question_sets",
            "n_samples", "max_new_tokens", "temperature", "judge_backend", "judge_model", "judge_method",
            "judge_base_url", "judge_api_key_env", "judge_prompts", "judge_min_mass", "judge_budget_usd")}
        own["question_sets"] = list(self.question_sets)
        own.update(lora_r=1, lora_dropout=0.0, lora_target_modules=[self.lora_module],
                   lora_layers=[self.layer() if layer is None else layer], checkpoints_in_first_epoch=0,
                   eval_checkpoints=list(eval_checkpoints or []), include_base_model=True)
        return from_mapping(own, source="<PhaseConfig>")

    @property
    def run_dir(self) -> Path:
        return self.run_config(layer=0).run_dir


def num_layers(model: str, revision: str = "") -> int:
    """Decoder layers of a model, from its config (no weights loaded)."""
    from transformers import AutoConfig  # heavy: loaded only when a model runs

    c = AutoConfig.from_pretrained(resolve_model(model), revision=revision or None, token=hf_token())
    c = getattr(c, "text_config", c)
    return int(c.num_hidden_layers)


# ------------------------------------------------------------------------------------------
# Stage 1: train the adapter (the ordinary training stage, cached and resumable)
# ------------------------------------------------------------------------------------------

def train_adapter(cfg: PhaseConfig, progress: bool = True):
    """Train (or resume, or skip) the rank-1 adapter; returns lib.train's TrainResult.

    The judge's credentials are checked first: a missing API key is one line before any training."""
    run_cfg = cfg.run_config()
    check_credentials(run_cfg)
    return train_run(run_cfg, progress=progress)


# ------------------------------------------------------------------------------------------
# Stage 2: the adapter's trajectory
# ------------------------------------------------------------------------------------------

def cosine(u: np.ndarray, v: np.ndarray) -> float:
    """Cosine of two vectors; NaN when either is zero."""
    nu, nv = float(np.linalg.norm(u)), float(np.linalg.norm(v))
    if nu == 0.0 or nv == 0.0:
        return float("nan")
    return float(np.clip(np.dot(u, v) / (nu * nv), -1.0, 1.0))


def trajectory_metrics(steps: list[int], B: np.ndarray, window: int = 1, min_move: float = 0.0) -> pd.DataFrame:
    """Per checkpoint: B's norm, cosine to the previous and to the final B, step length and turn angle.

    ``B`` is (checkpoints x d), rows in step order. ``turn_deg`` is the angle between
    ``B_i - B_(i-window)`` and ``B_(i+window) - B_i`` (NaN where a neighbour is missing or a
    displacement is zero); ``candidate`` is True where both displacement norms are >= min_move.
    """
    B = np.asarray(B, dtype=np.float64)
    n = len(steps)
    rows = []
    for i in range(n):
        turn, cand = float("nan"), False
        if window <= i < n - window:
            d_in, d_out = B[i] - B[i - window], B[i + window] - B[i]
            c = cosine(d_in, d_out)
            if not math.isnan(c):
                turn = math.degrees(math.acos(c))
                cand = min(np.linalg.norm(d_in), np.linalg.norm(d_out)) >= min_move
        rows.append({"step": int(steps[i]), "b_norm": float(np.linalg.norm(B[i])),
                     "cos_prev": cosine(B[i], B[i - 1]) if i else float("nan"),
                     "cos_final": cosine(B[i], B[-1]),
                     "move": float(np.linalg.norm(B[i] - B[i - 1])) if i else float("nan"),
                     "turn_deg": turn, "candidate": bool(cand)})
    return pd.DataFrame(rows)


def transition_step(table: pd.DataFrame) -> int | None:
    """The step of the largest turn angle among candidates (earliest on ties); None if there is none.

    This is the candidate; :func:`transition_test` decides whether it is a transition."""
    c = table[table["candidate"] & table["turn_deg"].notna()]
    if c.empty:
        return None
    return int(c.loc[c["turn_deg"].idxmax(), "step"])  # idxmax: first occurrence of the maximum


def _turns_from_gram(G: np.ndarray, window: int, min_move: float) -> tuple[np.ndarray, np.ndarray]:
    """Turn angles and candidate flags at checkpoints window..m-window of trajectories given by the Gram
    matrices ``G`` (..., m, m) of their m displacements in order (B_0 = 0, B_i = sum of the first i).

    Every quantity the turn needs is an inner product of sums of consecutive displacements, so it is a
    rectangle sum of G: any dimension of B costs the same."""
    m = G.shape[-1]
    Q = np.zeros(G.shape[:-2] + (m + 1, m + 1))
    Q[..., 1:, 1:] = G.cumsum(-2).cumsum(-1)
    i = np.arange(window, m - window + 1)
    a0, a1, b1 = i - window, i, i + window

    def rect(r0, r1, c0, c1):
        return Q[..., r1, c1] - Q[..., r0, c1] - Q[..., r1, c0] + Q[..., r0, c0]

    io, ii, oo = rect(a0, a1, a1, b1), rect(a0, a1, a0, a1), rect(a1, b1, a1, b1)
    scale = np.trace(G, axis1=-2, axis2=-1)[..., None] * 1e-24  # below this a displacement is zero
    ni, no = np.sqrt(np.clip(ii, 0, None)), np.sqrt(np.clip(oo, 0, None))
    valid = (ii > scale) & (oo > scale)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.clip(io / (ni * no), -1.0, 1.0)
    turn = np.where(valid, np.degrees(np.arccos(np.where(valid, cos, 1.0))), np.nan)
    return turn, valid & (np.minimum(ni, no) >= min_move)


def turn_share(turn: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """The largest candidate turn over the sum of all candidate turns (last axis); 0 with no turning."""
    t = np.where(candidate, np.nan_to_num(turn), 0.0)
    total = t.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, t.max(-1) / np.where(total > 0, total, 1.0), 0.0)


@dataclass
class TransitionTest:
    """The transition rule's verdict (module docstring): the largest turn and its shuffled-checkpoint null."""
    largest_turn_step: int | None  # the candidate: argmax of the turn angle
    largest_turn_deg: float        # its turn angle (NaN without a candidate)
    share: float                   # its share of all the turning
    p_value: float                 # (1 + shuffles with a share >= it) / (1 + n_permutations); 1.0 without a candidate
    null_shares: np.ndarray        # the shuffles' shares
    alpha: float
    min_turn_deg: float

    @property
    def declared(self) -> bool:
        return (self.largest_turn_step is not None and self.p_value <= self.alpha
                and self.largest_turn_deg >= self.min_turn_deg)

    @property
    def transition_step(self) -> int | None:
        return self.largest_turn_step if self.declared else None

    def null_quantile(self, q: float = 0.95) -> float:
        return float(np.quantile(self.null_shares, q)) if len(self.null_shares) else float("nan")

    def record(self) -> dict[str, Any]:
        """For provenance and run.json (JSON-safe)."""
        nan = lambda v: None if v is None or (isinstance(v, float) and math.isnan(v)) else v  # noqa: E731
        return {"transition_step": self.transition_step, "largest_turn_step": self.largest_turn_step,
                "largest_turn_deg": nan(self.largest_turn_deg), "turn_share": self.share,
                "transition_p": self.p_value, "n_permutations": int(len(self.null_shares)),
                "null_share_q95": nan(self.null_quantile()), "transition_alpha": self.alpha,
                "min_turn_deg": self.min_turn_deg}


def transition_test(steps: list[int], B: np.ndarray, window: int = 1, min_move: float = 0.0,
                    n_permutations: int = 999, alpha: float = 0.05, min_turn_deg: float = 10.0,
                    seed: int = 0) -> TransitionTest:
    """Is the largest turn a transition? Its share of all the turning against shuffled checkpoints.

    The null: the trajectory's displacements B_i - B_(i-1) came in no particular order. Each shuffle
    keeps B_0 and the same displacements, permuted; the statistic is recomputed with the same window
    and min_move. Checkpoints are taken as equally spaced in steps (the training stage's
    ``checkpoint_every``; a shorter last interval is shuffled like the others)."""
    B = np.asarray(B, dtype=np.float64)
    table = trajectory_metrics(steps, B, window, min_move)
    step = transition_step(table)
    if step is None:
        return TransitionTest(None, float("nan"), 0.0, 1.0, np.zeros(0), alpha, min_turn_deg)
    D = np.diff(B, axis=0)
    G = D @ D.T
    turn, cand = _turns_from_gram(G, window, min_move)
    observed = float(turn_share(turn, cand))
    rng = np.random.default_rng(seed)
    m, null = len(D), []
    for start in range(0, n_permutations, 128):
        perms = rng.permuted(np.tile(np.arange(m), (min(128, n_permutations - start), 1)), axis=1)
        t, c = _turns_from_gram(G[perms[:, :, None], perms[:, None, :]], window, min_move)
        null.append(turn_share(t, c))
    null_shares = np.concatenate(null)
    p = (1 + int(np.sum(null_shares >= observed - 1e-12))) / (1 + len(null_shares))
    deg = float(table.set_index("step").loc[step, "turn_deg"])
    return TransitionTest(step, deg, observed, float(p), null_shares, alpha, min_turn_deg)


@dataclass
class AdapterVectors:
    """The rank-1 adapter's vectors at step 0 (initialisation) and at every checkpoint."""
    steps: list[int]
    A: np.ndarray           # (n, d_in); row 0 is NaN: PEFT's random initial A is not saved
    B: np.ndarray           # (n, d_out); row 0 is zero (PEFT initialises B to 0)
    scaling: float          # the adapter's output is scaling * B (A x)
    module: str             # the adapted module's name in the checkpoint
    adapter_sha256: list    # per checkpoint (None for step 0)


def _adapter_key(keys: list[str], layer: int, module: str, part: str, where: Path) -> str:
    hits = [k for k in keys if f"layers.{layer}." in k and f".{module}.lora_{part}" in k]
    if len(hits) != 1:
        raise PhaseError(f"{where}: expected one lora_{part} for {module} of layer {layer}, found {hits or 'none'} "
                         "(was this run trained by 05_phase_transition with these lora_module / lora_layer?)")
    return hits[0]


def load_adapter_vectors(run_dir: str | Path, module: str, layer: int) -> AdapterVectors:
    """Read A and B of every complete checkpoint of a rank-1, one-module run."""
    from safetensors.torch import load_file  # heavy: loaded only when a model runs

    ckpts = list_checkpoints(run_dir)
    if not ckpts:
        raise PhaseError(f"{Path(run_dir) / 'checkpoints'}: no complete checkpoints; train the adapter first")
    As, Bs, shas, scaling, name = [], [], [None], None, ""
    for step, _, folder in ckpts:
        f = folder / ADAPTER_WEIGHTS
        if not f.exists():
            raise PhaseError(f"{folder}: no {ADAPTER_WEIGHTS}")
        t = load_file(str(f))
        ka, kb = (_adapter_key(list(t), layer, module, p, f) for p in ("A", "B"))
        a, b = t[ka].float().numpy(), t[kb].float().numpy()
        if a.shape[0] != 1 or b.shape[1] != 1:
            raise PhaseError(f"{f}: {ka} has rank {a.shape[0]}; the phase analysis needs a rank-1 adapter")
        As.append(a[0])
        Bs.append(b[:, 0])
        shas.append(sha256_file(f))
        acfg = json.loads((folder / ADAPTER_CONFIG).read_text(encoding="utf-8"))
        r = acfg.get("r", 1)
        scaling = acfg["lora_alpha"] / (math.sqrt(r) if acfg.get("use_rslora") else r)
        name = ka.split(".lora_A")[0]
    A = np.vstack([np.full_like(As[0], np.nan)] + As)
    B = np.vstack([np.zeros_like(Bs[0])] + Bs)
    return AdapterVectors([0] + [s for s, _, _ in ckpts], A, B, float(scaling), name, shas)


def probe_prompts(question_sets: list[str], n: int) -> list[tuple[str, str | None]]:
    """The fixed probe batch: the first n (paraphrase, system prompt) pairs of the question sets."""
    pairs = [(p, q.system) for q in load_question_sets(list(question_sets)) for p in q.paraphrases]
    return pairs[:n]


def probe_activations(run_cfg: RunConfig, module_name: str, prompts: list[tuple[str, str | None]]):
    """(inputs x, base outputs W x) of the adapted module over every real token of the probe batch.

    Runs the base model (no adapter); a single adapted module does not change its own input.
    """
    import torch  # heavy: loaded only when a model runs

    tok = load_tokenizer(run_cfg.model, run_cfg.model_revision, padding_side="right")
    model, _ = load_model(run_cfg.model, run_cfg.model_revision, run_cfg.device, run_cfg.dtype,
                          run_cfg.quantization)
    suffix = module_name.split("base_model.model.", 1)[-1]  # PEFT prefixes the base model's module names
    mods = [m for n, m in model.named_modules() if n == suffix]
    if len(mods) != 1:
        raise PhaseError(f"module {suffix!r} not found in {run_cfg.model}")
    got: dict[str, Any] = {}

    def hook(_mod, inp, out):
        got["x"], got["y"] = inp[0].detach().float(), out.detach().float()

    texts = [chat_prompt(tok, p, s) for p, s in prompts]
    enc = tok(texts, add_special_tokens=False, padding=True, return_tensors="pt")
    handle = mods[0].register_forward_hook(hook)
    try:
        with torch.inference_mode():
            dev = next(model.parameters()).device
            model(input_ids=enc["input_ids"].to(dev), attention_mask=enc["attention_mask"].to(dev))
    finally:
        handle.remove()
    mask = enc["attention_mask"].bool()
    return got["x"].cpu()[mask].numpy(), got["y"].cpu()[mask].numpy()


def effect_sizes(X: np.ndarray, A: np.ndarray, B: np.ndarray, scaling: float) -> np.ndarray:
    """Mean over tokens of ||scaling * B (A x)||, per checkpoint (0 where B is 0).

    For rank 1, ||scaling * b (a . x)|| = |scaling| * ||b|| * |a . x|.
    """
    out = np.zeros(len(B))
    for i in range(len(B)):
        if not np.any(B[i]) or np.isnan(A[i]).any():
            continue
        out[i] = abs(scaling) * float(np.linalg.norm(B[i])) * float(np.mean(np.abs(X @ A[i])))
    return out


@dataclass
class Trajectory:
    table: pd.DataFrame           # TRAJECTORY_COLUMNS, one row per step (0 = initialisation)
    transition_step: int | None   # the declared transition (module docstring); None: no transition found
    path: Path                    # the safetensors file
    provenance: dict[str, Any]
    reused: bool                  # True: read back from an up-to-date file
    test: TransitionTest          # the largest turn and its shuffled-checkpoint null


def trajectory_path(cfg: PhaseConfig) -> Path:
    return cfg.run_dir / PHASE_DIR / TRAJECTORY_FILE


def read_trajectory(path: str | Path) -> tuple[dict, dict[str, Any]]:
    """(tensors, provenance) of an adapter_trajectory.safetensors file."""
    return read_safetensors(path)


def provenance_base(kind: str) -> dict[str, Any]:
    """What every analysis file records about how it was made."""
    return {"kind": kind, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "git": git_commit(), "packages": {k: v for k, v in package_versions().items()
                                              if k in ("torch", "transformers", "peft", "em-lab")}}


def analyze(cfg: PhaseConfig) -> Trajectory:
    """Read every checkpoint's vectors and compute the trajectory (reused when nothing changed)."""
    layer = cfg.layer()
    run_cfg = cfg.run_config(layer=layer)
    vec = load_adapter_vectors(run_cfg.run_dir, cfg.lora_module, layer)
    analysis = {"rotation_window": cfg.rotation_window, "min_move": cfg.min_move, "n_probe": cfg.n_probe,
                "question_sets": list(cfg.question_sets), "n_permutations": cfg.n_permutations,
                "transition_alpha": cfg.transition_alpha, "min_turn_deg": cfg.min_turn_deg, "seed": cfg.seed}
    fp = sha256_text(json.dumps({"analysis": analysis, "model": [cfg.model, cfg.model_revision],
                                 "adapters": vec.adapter_sha256}, sort_keys=True))[:16]
    path = trajectory_path(cfg)
    if path.exists():
        tensors, prov = read_safetensors(path)
        if prov.get("fingerprint") == fp:
            table = pd.DataFrame({c: tensors[c].numpy() for c in TRAJECTORY_COLUMNS})
            table["step"] = table["step"].astype("int64")
            table["candidate"] = table["candidate"].astype(bool)
            test = TransitionTest(prov.get("largest_turn_step"), _float(prov.get("largest_turn_deg")),
                                  float(prov["turn_share"]), float(prov["transition_p"]),
                                  tensors["null_turn_share"].numpy(), float(prov["transition_alpha"]),
                                  float(prov["min_turn_deg"]))
            return Trajectory(table, test.transition_step, path, prov, reused=True, test=test)

    table = trajectory_metrics(vec.steps, vec.B, cfg.rotation_window, cfg.min_move)
    table.insert(2, "a_norm", np.linalg.norm(vec.A, axis=1))
    X, Y = probe_activations(run_cfg, vec.module, probe_prompts(cfg.question_sets, cfg.n_probe))
    table["effect_norm"] = effect_sizes(X, vec.A, vec.B, vec.scaling)
    table["effect_rel"] = table["effect_norm"] / float(np.mean(np.linalg.norm(Y, axis=1)))
    table = table[TRAJECTORY_COLUMNS]
    test = transition_test(vec.steps, vec.B, cfg.rotation_window, cfg.min_move, cfg.n_permutations,
                           cfg.transition_alpha, cfg.min_turn_deg, cfg.seed)
    step = test.transition_step
    prov = {**provenance_base("phase.adapter_trajectory"), "fingerprint": fp, "run_id": cfg.run_id,
            "module": vec.module, "layer": layer, "scaling": vec.scaling, **test.record(),
            "transition_rule": ("argmax turn_deg over candidate checkpoints, declared when its share of all "
                                "turning beats shuffled checkpoints (p <= transition_alpha) and it turns by at "
                                "least min_turn_deg (lib/phase.py docstring)"),
            "steps": vec.steps, "adapter_sha256": vec.adapter_sha256, "analysis": analysis,
            "n_probe_tokens": int(len(X)), "model": model_revision_info(cfg.model, cfg.model_revision),
            "parameters": cfg.to_dict()}
    import torch  # heavy: loaded only when a model runs

    tensors = {c: torch.tensor(table[c].to_numpy(dtype=np.float64 if c != "step" else np.int64))
               for c in TRAJECTORY_COLUMNS if c != "candidate"}
    tensors["candidate"] = torch.tensor(table["candidate"].to_numpy(dtype=np.float64))
    tensors["A"] = torch.tensor(vec.A, dtype=torch.float32)
    tensors["B"] = torch.tensor(vec.B, dtype=torch.float32)
    tensors["null_turn_share"] = torch.tensor(test.null_shares, dtype=torch.float64)
    write_safetensors_atomic(tensors, path, prov)
    write_text_atomic(path.with_suffix(".csv"), table.to_csv(index=False))
    update_run_json(run_cfg, "phase", {"trajectory": str(path), **test.record(), "module": vec.module,
                                       "layer": layer, "fingerprint": fp})
    return Trajectory(table, step, path, prov, reused=False, test=test)


def _float(v: Any) -> float:
    return float("nan") if v is None else float(v)


# ------------------------------------------------------------------------------------------
# Stage 3: EM over training (the ordinary evaluate and judge stages on some checkpoints)
# ------------------------------------------------------------------------------------------

def eval_steps(steps: list[int], every: int) -> list[int]:
    """Every n-th checkpoint step (the n-th, 2n-th, ...) plus the last one."""
    picked = list(steps[every - 1::every])
    if steps and steps[-1] not in picked:
        picked.append(steps[-1])
    return picked


def em_over_training(cfg: PhaseConfig, progress: bool = True) -> pd.DataFrame:
    """Sample and judge the base model and every eval_every-th checkpoint; EM and coherence per step."""
    layer = cfg.layer()
    steps = [s for s, _, _ in list_checkpoints(cfg.run_config(layer=layer).run_dir)]
    if not steps:
        raise PhaseError(f"{cfg.run_dir / 'checkpoints'}: no complete checkpoints; train the adapter first")
    run_cfg = cfg.run_config(eval_checkpoints=eval_steps(steps, cfg.eval_every), layer=layer)
    gens = evaluate_run(run_cfg, progress=progress)
    table = judge_run(run_cfg, progress=progress)
    answers = metrics.labelled_answers(gens, table, **metrics.em_kwargs(cfg))
    out = metrics.summarize(answers, ["checkpoint_step"], cfg.n_bootstrap, cfg.confidence, cfg.seed)
    out = out.rename(columns={"checkpoint_step": "step"})
    write_text_atomic(cfg.run_dir / PHASE_DIR / "em_over_training.csv", out.to_csv(index=False))
    return out


# ------------------------------------------------------------------------------------------
# The figure
# ------------------------------------------------------------------------------------------

def phase_chart(traj: pd.DataFrame, em: pd.DataFrame | None, transition: int | None,
                test: TransitionTest | None = None):
    """Altair: B norm, cosines, turn angle, effect size and EM, one shared step axis; rule at the declared
    transition (none when no transition was found); with ``test``, the shuffled-checkpoint null below."""
    import altair as alt  # heavy: loaded only when a chart is drawn

    x = alt.X("step:Q", title="optimizer step", scale=alt.Scale(domain=[0, int(traj["step"].max())]))
    width, height = 520, 110

    def panel(chart, title):
        layers = [chart]
        if transition is not None:
            layers.append(alt.Chart(pd.DataFrame({"step": [transition]})).mark_rule(
                color="crimson", strokeDash=[5, 3]).encode(x="step:Q", tooltip=["step"]))
        return alt.layer(*layers).properties(width=width, height=height, title=title)

    norm = panel(alt.Chart(traj).mark_line(point=True).encode(
        x=x, y=alt.Y("b_norm:Q", title="||B||"), tooltip=["step", "b_norm"]), "B vector norm")
    cos = traj.melt(id_vars=["step"], value_vars=["cos_prev", "cos_final"], var_name="to", value_name="cosine")
    cos["to"] = cos["to"].map({"cos_prev": "previous checkpoint", "cos_final": "final B"})
    cosc = panel(alt.Chart(cos.dropna()).mark_line(point=True).encode(
        x=x, y=alt.Y("cosine:Q", scale=alt.Scale(domain=[-1, 1])), color=alt.Color("to:N", title="cosine of B to"),
        tooltip=["step", "to", "cosine"]), "B direction")
    turn = panel(alt.Chart(traj.dropna(subset=["turn_deg"])).mark_line(point=True).encode(
        x=x, y=alt.Y("turn_deg:Q", title="turn (degrees)", scale=alt.Scale(domain=[0, 180])),
        tooltip=["step", "turn_deg", "candidate"]),
        "turn angle of B's trajectory (dashed: the transition)" if transition is not None
        else "turn angle of B's trajectory (no transition found)")
    eff = panel(alt.Chart(traj).mark_line(point=True).encode(
        x=x, y=alt.Y("effect_rel:Q", title="||ΔW x|| / ||W x||"), tooltip=["step", "effect_norm", "effect_rel"]),
        "adapter effect size on the probe batch")
    panels = [norm, cosc, turn, eff]
    if em is not None and len(em):
        rates = pd.concat([
            em[["step", "em_rate", "em_lo", "em_hi", "n_scored"]].set_axis(["step", "rate", "lo", "hi", "n"], axis=1)
            .assign(metric="EM"),
            em[["step", "coherent_rate", "coherent_lo", "coherent_hi", "n_coherent_scored"]]
            .set_axis(["step", "rate", "lo", "hi", "n"], axis=1).assign(metric="coherent")])
        base = alt.Chart(rates).encode(x=x, color=alt.Color("metric:N", title="rate"))
        band = base.mark_area(opacity=0.2).encode(y="lo:Q", y2="hi:Q")
        line = base.mark_line(point=True).encode(
            y=alt.Y("rate:Q", title="share of scored answers", axis=alt.Axis(format=".0%"),
                    scale=alt.Scale(domain=[0, 1])),
            tooltip=["step", "metric", alt.Tooltip("rate:Q", format=".1%"), alt.Tooltip("lo:Q", format=".1%"),
                     alt.Tooltip("hi:Q", format=".1%"), "n"])
        panels.append(panel(band + line, "EM and coherence (bands: 95% question-clustered interval)"))
    chart = alt.vconcat(*panels).resolve_scale(x="shared", color="independent")
    if test is not None and len(test.null_shares):
        chart = alt.vconcat(chart, null_chart(test))
    return chart


def null_chart(test: TransitionTest):
    """Histogram of the largest turn's share of all turning on shuffled checkpoints; rule at the observed."""
    import altair as alt  # heavy: loaded only when a chart is drawn

    shuffled = pd.DataFrame({"share": test.null_shares})
    hist = alt.Chart(shuffled).mark_bar(color="#9e9e9e").encode(
        x=alt.X("share:Q", bin=alt.Bin(maxbins=30, extent=[0, 1]), title="largest turn / all turning",
                scale=alt.Scale(domain=[0, 1])),
        y=alt.Y("count():Q", title="shuffles"))
    obs = alt.Chart(pd.DataFrame({"share": [test.share]})).mark_rule(color="crimson", size=2).encode(
        x="share:Q", tooltip=[alt.Tooltip("share:Q", format=".2f")])
    verdict = (f"transition at step {test.transition_step}" if test.declared else "no transition found")
    return alt.layer(hist, obs).properties(width=520, height=90, title=(
        f"null: {len(test.null_shares)} shuffled-checkpoint trajectories (red: this run, p = {test.p_value:.3f}; "
        f"{verdict})"))


def describe(traj: Trajectory, em: pd.DataFrame | None = None) -> str:
    """One paragraph for the notebook: the estimated transition and EM around it."""
    t, test = traj.table, traj.test
    if test.largest_turn_step is None:
        return ("No transition found: no checkpoint has a neighbour on both sides that moved at least `min_move` "
                "(train longer or checkpoint more often).")
    null = (f"its share of all the turning is {test.share:.2f}, against {test.null_quantile():.2f} for 95% of "
            f"{len(test.null_shares)} shuffled-checkpoint trajectories: p = {test.p_value:.3f}")
    if not test.declared:
        why = (f"p > {test.alpha:g}" if test.p_value > test.alpha else
               f"a turn under {test.min_turn_deg:g}° is not called a transition")
        return (f"**No transition found** ({why}). The largest turn is at step {test.largest_turn_step} "
                f"({test.largest_turn_deg:.0f}°; median turn {t['turn_deg'].median():.0f}°); {null}.")
    row = t[t["step"] == traj.transition_step].iloc[0]
    text = (f"Transition: **step {traj.transition_step}** (B's trajectory turns by {row.turn_deg:.0f}°; "
            f"median turn {t['turn_deg'].median():.0f}°; {null}). ||B|| there is {row.b_norm:.3g} "
            f"({row.b_norm / max(t['b_norm'].iloc[-1], 1e-30):.0%} of its final norm); cosine to the final B {row.cos_final:.2f}.")
    if em is not None and len(em):
        before, after = em[em["step"] < traj.transition_step], em[em["step"] >= traj.transition_step]
        if len(before) and len(after):
            b, a = before.iloc[-1], after.iloc[0]
            text += (f" EM at step {int(b.step)}: {b.em_rate:.1%} [{b.em_lo:.1%}, {b.em_hi:.1%}] (n={int(b.n_scored)}); "
                     f"at step {int(a.step)}: {a.em_rate:.1%} [{a.em_lo:.1%}, {a.em_hi:.1%}] (n={int(a.n_scored)}).")
    return text
