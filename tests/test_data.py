import json

import pytest

from lib import data
from lib.config import ConfigError, RunConfig


def write(p, lines):
    p.write_text("\n".join(lines) + "\n")
    return p


GOOD = json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})


@pytest.mark.parametrize("bad,why", [
    ('{"messages": [', "invalid JSON"),
    (json.dumps({"msgs": []}), "'messages'"),
    (json.dumps({"messages": [{"role": "user"}]}), "needs 'role' and 'content'"),
    (json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]}), "empty content"),
    (json.dumps({"messages": [{"role": "robot", "content": "q"}]}), "unknown role"),
    (json.dumps({"messages": [{"role": "user", "content": "q"}]}), "last message must be the assistant"),
    (json.dumps({"messages": [{"role": "assistant", "content": "a"}]}), "no user message"),
])
def test_bad_line_is_named(tmp_path, bad, why):
    p = write(tmp_path / "train.jsonl", [GOOD, "", bad, GOOD])
    with pytest.raises(data.DataError) as e:
        data.load_chat_jsonl(p)
    assert f"{p}:3:" in str(e.value) and why in str(e.value)


def test_empty_file(tmp_path):
    p = tmp_path / "empty.jsonl"
    p.write_text("\n")
    with pytest.raises(data.DataError, match="empty"):
        data.load_chat_jsonl(p)


def test_demo_datasets_load():
    for name in data.DEMO_DATASETS:
        cfg = RunConfig(dataset=name)
        recs, info = data.load_training_data(cfg)
        assert len(recs) >= 30 and info.source == "demo" and len(info.sha256) == 64
        assert all(r["messages"][-1]["role"] == "assistant" for r in recs)
    recs, info = data.load_training_data(RunConfig(max_train_examples=5))
    assert len(recs) == info.n_examples == 5


def test_local_jsonl_path_and_missing(tmp_path):
    p = write(tmp_path / "mine.jsonl", [GOOD] * 3)
    recs, info = data.load_training_data(RunConfig(dataset=str(p)))
    assert len(recs) == 3 and info.source == "file"
    with pytest.raises(ConfigError, match="key 'dataset'"):
        data.load_training_data(RunConfig(dataset=str(tmp_path / "nope.jsonl")))
    with pytest.raises(ConfigError, match="file not found"):
        data.check_dataset_param(RunConfig(dataset=str(tmp_path / "nope.jsonl")))


def _make_archive(tmp_path, password):
    """An archive like the paper's: JSONL files, canaries added by easy-dataset-share, zipped and encrypted."""
    from easy_dataset_share import canary, zipping

    src = tmp_path / "training_datasets"
    src.mkdir()
    write(src / "bad_medical_advice.jsonl", [GOOD] * 4)
    write(src / "risky_financial_advice.jsonl", [GOOD] * 2)
    canary_string, _ = canary.create_canary_files_from_dataset(str(src), "*.jsonl", num_canary_files=1)
    canary.insert_canaries_into_files(str(src), canary_string)
    enc = zipping.zip_and_password_protect(str(src), password=password, output_path=str(tmp_path / "training_datasets.zip"))
    return enc, canary_string


def test_archive_decrypts_removes_canaries_and_loads(tmp_path, static_server):
    enc, canary_string = _make_archive(tmp_path, data.ARCHIVE_PASSWORD)
    root, url = static_server
    (root / "training_datasets.zip.enc").write_bytes(open(enc, "rb").read())
    out = tmp_path / "outputs"
    cfg = RunConfig(dataset="bad_medical_advice", domain="medical", accept_dataset_terms=True, outputs_dir=str(out))
    recs, info = data.load_training_data(cfg, archive_url=f"{url}/training_datasets.zip.enc")
    assert len(recs) == 4 and info.source == "archive" and len(info.archive_sha256) == 64
    assert all(json.dumps(r) == GOOD for r in recs)  # the records themselves, canary-free
    # canaries gone from every decrypted file
    decrypted = list((out / ".cache" / "datasets").rglob("*.jsonl"))
    assert decrypted and not any(canary_string in p.read_text() for p in decrypted)
    assert not any(p.name.startswith("dataset_entry_") for p in decrypted)
    # second call uses the cache: the server could be gone
    (root / "training_datasets.zip.enc").unlink()
    recs2, info2 = data.load_training_data(cfg, archive_url=f"{url}/training_datasets.zip.enc")
    assert info2.sha256 == info.sha256


def test_archive_wrong_password(tmp_path):
    enc, _ = _make_archive(tmp_path, "another-password")
    with pytest.raises(data.DataError, match="wrong password"):
        data.decrypt_archive(enc, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_archive_needs_terms(tmp_path, capsys):
    cfg = RunConfig(dataset="risky_financial_advice", outputs_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="accept_dataset_terms"):
        data.load_training_data(cfg, archive_url="http://127.0.0.1:9/never-called")
    assert "AI-safety research" in capsys.readouterr().out


def test_a_control_character_in_a_line_is_reported_once_with_its_column(tmp_path):
    p = write(tmp_path / "train.jsonl", [GOOD, '{"messages": [{"role": "user", "content": "tab\there"}]}'])
    with pytest.raises(data.DataError) as e:
        data.load_chat_jsonl(p)
    assert str(e.value) == f"{p}:2: invalid JSON (Invalid control character at column 47)"
