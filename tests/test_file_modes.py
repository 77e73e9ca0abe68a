"""Outputs honour the umask like any other file: 0644 under the usual 022, so collaborators on a
shared machine can read them. Atomic writes used to leave mkstemp's 0600 (run.json, parquet
files, adapters, report.html) and mkdtemp's 0700 (the decrypted archive, the embedded model)."""
from __future__ import annotations

import os
import stat

import pandas as pd
import pytest

from lib import io as lio
from lib import judge
from tests.fakes.chat_server import ChatServer
from tests.fakes.judge_inputs import judge_config, write_generations, write_prompts


@pytest.fixture
def umask():
    old = os.umask(0o022)

    def set_(mask: int) -> None:
        os.umask(mask)

    yield set_
    os.umask(old)


def mode(p) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


@pytest.mark.parametrize("mask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750),
                                                       (0o002, 0o664, 0o775)])
def test_atomic_writes_get_the_mode_open_would_give(tmp_path, umask, mask, file_mode, dir_mode):
    import torch

    umask(mask)
    assert lio.current_umask() == mask
    written = [lio.write_text_atomic(tmp_path / "a.txt", "x"), lio.write_json_atomic(tmp_path / "run.json", {"a": 1}),
               lio.write_parquet_atomic(pd.DataFrame({"a": [1]}), tmp_path / "t.parquet"),
               lio.write_safetensors_atomic({"w": torch.zeros(2)}, tmp_path / "adapter.safetensors", {})]
    assert [oct(mode(p)) for p in written] == [oct(file_mode)] * 4
    d = tmp_path / "built"
    import tempfile
    tmp = tempfile.mkdtemp(dir=tmp_path)
    (open(os.path.join(tmp, "f"), "w")).close()
    lio.honour_umask(tmp)
    os.rename(tmp, d)
    assert oct(mode(d)) == oct(dir_mode) and oct(mode(d / "f")) == oct(file_mode)


def test_a_judge_run_leaves_every_output_readable_by_others(tmp_path, umask, monkeypatch):
    monkeypatch.setenv("EM_LAB_TEST_JUDGE_KEY", "dummy")
    out = tmp_path / "outputs"
    write_generations(out, n=4)
    with ChatServer() as server:
        cfg = judge_config(out, write_prompts(tmp_path), judge_backend="openai", judge_method="logprob",
                           judge_model="gpt-4o-mini-2024-07-18", judge_base_url=server.url,
                           judge_api_key_env="EM_LAB_TEST_JUDGE_KEY")
        judge.judge_run(cfg, progress=False)
    files = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.name == "run.json" for p in files) and any(p.suffix == ".parquet" for p in files)
    unreadable = {str(p.relative_to(out)): oct(mode(p)) for p in files if mode(p) & 0o044 != 0o044}
    assert not unreadable


def test_checkpoint_files_honour_the_umask(tmp_path, umask):
    """safetensors' save_file and torch.save write 0600 whatever the umask; a checkpoint's adapter,
    optimizer state and marker come out 0644 under umask 022 (0640 under 027), like every other output."""
    import json

    from lib.config import RunConfig
    from lib.train import train_run

    records = [{"messages": [{"role": "user", "content": f"question {i}?"},
                             {"role": "assistant", "content": f"answer number {i}."}]} for i in range(4)]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    for mask, want in ((0o022, 0o644), (0o027, 0o640)):
        umask(mask)
        cfg = RunConfig(run_id=f"m{mask:o}", outputs_dir=str(tmp_path / "out"), dataset=str(data), epochs=1,
                        per_device_batch_size=2, checkpoints_in_first_epoch=1, lora_r=2, lora_alpha=4,
                        max_seq_length=256, device="cpu", warmup_steps=0)
        train_run(cfg, progress=False)
        files = [p for p in (cfg.run_dir / "checkpoints").rglob("*") if p.is_file()]
        adapters = [p for p in files if p.name == "adapter_model.safetensors"]
        assert adapters and {oct(mode(p)) for p in files} == {oct(want)}, {p.name: oct(mode(p)) for p in files}
