"""The Turner et al. archive: a ``dataset_archive`` parameter, download errors that name the URL,
a bad file moved aside (not cached forever), a pinned sha256, and validation before any stage.

Before: the archive's location could not be set from parameters; a failed download raised a bare
URLError; a wrong file was cached and every later run said "wrong password or corrupted
archive"; deleting only the cached file then gave "sha256 changed since first download"; a
wrong password failed inside 01_train, after its kernel started.
"""
from __future__ import annotations

import pytest
import yaml

from lib import data, grid
from lib.config import ConfigError, RunConfig
from test_data import _make_archive


def cfg_for(tmp_path, archive: str, **over) -> RunConfig:
    return RunConfig(dataset="bad_medical_advice", domain="medical", accept_dataset_terms=True,
                     outputs_dir=str(tmp_path / "outputs"), dataset_archive=archive, **over)


def test_dataset_archive_parameter_takes_a_path(tmp_path):
    enc, _ = _make_archive(tmp_path, data.ARCHIVE_PASSWORD)
    recs, info = data.load_training_data(cfg_for(tmp_path, str(enc)))
    assert len(recs) == 4 and info.source == "archive" and info.archive_sha256 == data.sha256_file(enc)


def test_download_error_names_the_url_and_what_to_do(tmp_path):
    url = "http://127.0.0.1:9/somewhere/training_datasets.zip.enc"
    with pytest.raises(data.DataError) as e:
        data.load_training_data(cfg_for(tmp_path, url))
    msg = str(e.value)
    assert msg.startswith(f"{url}: download failed (URLError") and "dataset_archive: /path/to/it" in msg
    with pytest.raises(data.DataError, match="http://user:\\*\\*\\*@127.0.0.1:9/x.enc: download failed") as e:
        data.load_training_data(cfg_for(tmp_path, "http://user:hunter2pw@127.0.0.1:9/x.enc"))
    assert "hunter2pw" not in str(e.value)


def test_a_file_that_does_not_decrypt_is_moved_aside_and_the_next_run_downloads_again(tmp_path, static_server):
    root, base = static_server
    url = f"{base}/training_datasets.zip.enc"
    (root / "training_datasets.zip.enc").write_bytes(b"<html>rate limited</html>")
    cfg = cfg_for(tmp_path, url)
    with pytest.raises(data.DataError) as e:
        data.load_training_data(cfg)
    cached = data.cached_archive(cfg.outputs_dir, url)
    msg = str(e.value)
    assert msg.startswith(f"{url}: could not decrypt the downloaded file") and "moved it aside to" in msg
    assert not cached.exists()
    (bad,) = cached.parent.glob(cached.name + ".bad-*")
    assert bad.read_bytes() == b"<html>rate limited</html>" and str(bad) in msg
    # the server now has the real archive (a different file): the next run downloads and uses it
    enc, _ = _make_archive(tmp_path, data.ARCHIVE_PASSWORD)
    (root / "training_datasets.zip.enc").write_bytes(open(enc, "rb").read())
    recs, info = data.load_training_data(cfg)
    assert len(recs) == 4 and cached.exists()


def test_deleting_the_cached_archive_downloads_again_without_a_sha_error(tmp_path, static_server, capsys):
    root, base = static_server
    url = f"{base}/training_datasets.zip.enc"
    (tmp_path / "a").mkdir()
    first, _ = _make_archive(tmp_path / "a", data.ARCHIVE_PASSWORD)
    (root / "training_datasets.zip.enc").write_bytes(open(first, "rb").read())
    cfg = cfg_for(tmp_path, url)
    _, info1 = data.load_training_data(cfg)
    (tmp_path / "b").mkdir()
    second, _ = _make_archive(tmp_path / "b", data.ARCHIVE_PASSWORD)  # same content, new canaries: new bytes
    (root / "training_datasets.zip.enc").write_bytes(open(second, "rb").read())
    data.cached_archive(cfg.outputs_dir, url).unlink()
    _, info2 = data.load_training_data(cfg)
    assert info2.archive_sha256 != info1.archive_sha256
    assert "the downloaded archive differs from the one downloaded before" in capsys.readouterr().out
    # a cached file changed in place (not re-downloaded) is still an error
    cached = data.cached_archive(cfg.outputs_dir, url)
    cached.write_bytes(cached.read_bytes() + b"x")
    with pytest.raises(data.DataError, match="changed on disk since it was downloaded"):
        data.load_training_data(cfg)


def test_pinned_sha256(tmp_path, static_server):
    root, base = static_server
    enc, _ = _make_archive(tmp_path, data.ARCHIVE_PASSWORD)
    (root / "a.zip.enc").write_bytes(open(enc, "rb").read())
    url = f"{base}/a.zip.enc"
    digest = data.sha256_file(enc)
    recs, info = data.load_training_data(cfg_for(tmp_path, url, dataset_archive_sha256=digest.upper()))
    assert info.archive_sha256 == digest
    wrong = "0" * 64
    with pytest.raises(data.DataError) as e:
        data.load_training_data(cfg_for(tmp_path, url, dataset_archive_sha256=wrong))
    assert f"sha256 {digest} does not match the pinned {wrong}" in str(e.value) and "moved it aside" in str(e.value)
    with pytest.raises(ConfigError, match="key 'dataset_archive_sha256': must be 64 hex digits"):
        cfg_for(tmp_path, url, dataset_archive_sha256="abc")


def _params(tmp_path, **over) -> str:
    p = tmp_path / "arch.yaml"
    p.write_text(yaml.safe_dump({"run_id": "arch", "outputs_dir": str(tmp_path / "outputs"), "device": "cpu",
                                 "dataset": "bad_medical_advice", "accept_dataset_terms": True, **over}))
    return str(p)


def test_wrong_password_fails_in_validation_when_the_archive_is_here(tmp_path, capsys, static_server):
    enc, _ = _make_archive(tmp_path, "another-password")
    # a local archive: validation decrypts it, exit 2, one line
    assert grid.main(["run", _params(tmp_path, dataset_archive=str(enc)), "--stages", "train"]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and f"key 'dataset_archive': {enc}: could not decrypt it (wrong password" in err[0]
    # a downloaded one already in the cache: the same, and the file is moved aside
    root, base = static_server
    url = f"{base}/x.zip.enc"
    cached = data.cached_archive(str(tmp_path / "outputs"), url)
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_bytes(open(enc, "rb").read())
    assert grid.main(["run", _params(tmp_path, dataset_archive=url), "--stages", "train"]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and "could not decrypt the downloaded file" in err[0] and "moved it aside" in err[0]
    assert not cached.exists()
    assert not (tmp_path / "outputs" / "arch" / "notebooks").exists()
    # a missing local archive
    assert grid.main(["run", _params(tmp_path, dataset_archive=str(tmp_path / "nope.enc")), "--stages", "train"]) == 2
    assert "key 'dataset_archive': file not found" in capsys.readouterr().err
