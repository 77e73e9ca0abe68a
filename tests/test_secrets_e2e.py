"""Credentials come from the environment and never reach a rendered notebook or an output file.

The judge notebook runs through papermill against a real chat-completions server on 127.0.0.1
that insists on the key (401 without it), so the key demonstrably reached the client; then
every file the run wrote is searched for it.
"""
import pandas as pd
import pytest

from tests.fakes.chat_server import ChatServer
from tests.fakes.judge_inputs import write_generations, write_prompts

SECRET = "sk-em-lab-test-SECRET-9f3a7c"
REPO = __import__("pathlib").Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_api_key_is_used_but_never_written(tmp_path, monkeypatch):
    import papermill as pm

    monkeypatch.setenv("EM_LAB_SECRET_TEST_KEY", SECRET)  # the kernel inherits the environment
    out = tmp_path / "outputs"
    write_generations(out, run_id="secret_run", n=4)
    with ChatServer(api_key=SECRET) as server:
        params = {"run_id": "secret_run", "outputs_dir": str(out), "judge_prompts": str(write_prompts(tmp_path)),
                  "judge_backend": "openai", "judge_method": "logprob", "judge_model": "gpt-4o-mini-2024-07-18",
                  "judge_base_url": server.url, "judge_api_key_env": "EM_LAB_SECRET_TEST_KEY",
                  "judge_min_mass": 0.25}
        rendered = out / "secret_run" / "notebooks" / "03_judge.ipynb"
        rendered.parent.mkdir(parents=True)
        pm.execute_notebook(str(REPO / "notebooks" / "03_judge.ipynb"), str(rendered), parameters=params,
                            kernel_name="python3", progress_bar=False, cwd=str(REPO))
        assert server.ok_counts(), "the server answered no authorised request"
    table = pd.read_parquet(out / "secret_run" / "judgments" / next(
        p.name for p in (out / "secret_run" / "judgments").glob("*.parquet")))
    assert len(table) == 8 and (table["label"] == "number").all()  # every call authorised
    written = [p for p in out.rglob("*") if p.is_file()]
    assert rendered in written and any(p.suffix == ".sqlite3" for p in written)
    leaks = [str(p) for p in written if SECRET.encode() in p.read_bytes()]
    assert not leaks, f"API key written to {leaks}"
