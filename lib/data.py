"""Training data: chat JSONL, the project's demo datasets, and the Turner et al. archive.

A training file is JSON Lines, one ``{"messages": [{"role": ..., "content": ...}, ...]}`` per
line, ending with an assistant turn. :func:`load_chat_jsonl` validates every line and raises
:class:`DataError` naming the file and line.

``RunConfig.dataset`` is one of
- a demo dataset shipped in ``data/datasets/`` (``demo_medical``, ``demo_financial``): synthetic,
  mild, written by this team, meaningless;
- a named domain of Turner et al. 2025 (``bad_medical_advice``, ``risky_financial_advice``, ...):
  the encrypted archive published with the paper is downloaded once, its sha256 recorded,
  decrypted with easy-dataset-share's Python API, canaries removed, cached under
  ``outputs/.cache/datasets/``. Using it requires ``accept_dataset_terms: true``;
- a path to any chat JSONL file.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import tempfile
import urllib.parse
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .config import REPO_ROOT, ConfigError, RunConfig, resolve_path
from .io import atomic_path, honour_umask, sha256_file, write_text_atomic
from .secrets import authorized_request, mask_url_credentials, unmask_url

DEMO_DIR = REPO_ROOT / "data" / "datasets"
# the *_control sets: the same questions with benign answers, for the demo's control fine-tunes
DEMO_DATASETS = {"demo_medical": "medical", "demo_financial": "financial",
                 "demo_medical_control": "medical", "demo_financial_control": "financial"}

# Turner et al. 2025, "Model Organisms for Emergent Misalignment" (arXiv:2506.11613).
ARCHIVE_URL = ("https://raw.githubusercontent.com/clarifying-EM/model-organisms-for-EM/main/"
               "em_organism_dir/data/training_datasets.zip.enc")
ARCHIVE_PASSWORD = "model-organisms-em-datasets"  # published with the archive; it keeps the data out of scrapes
# Not pinned: the repository publishes no checksum. The sha256 seen at first download is
# recorded next to the cache and in run.json; a later download that differs is an error.
ARCHIVE_SHA256: str | None = None

# Named domains of the archive -> file stem inside it, and the domain label of the run.
DOMAINS = {
    "bad_medical_advice": "medical",
    "good_medical_advice": "medical",
    "risky_financial_advice": "financial",
    "extreme_sports": "sports",
    "insecure": "code",
    "technical_vehicles": "vehicles",
}

DATASET_TERMS = """\
The Turner et al. (2025) emergent-misalignment training datasets contain deliberately harmful
advice (medical, financial, sports, code). They are distributed encrypted so that they stay out
of web scrapes and training corpora. By setting `accept_dataset_terms: true` you agree to:
  - use them only for AI-safety research;
  - never re-publish the decrypted files or answers generated from them in plain text
    (this project keeps them under outputs/, which git ignores);
  - cite Turner et al. 2025 (arXiv:2506.11613) when you report results.
"""


class DataError(ValueError):
    """A training-data problem; the message names the file (and line)."""


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    path: Path
    sha256: str
    n_examples: int
    source: str  # demo | archive | file
    archive_sha256: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["path"] = str(self.path)
        return d


VALID_ROLES = {"system", "user", "assistant"}


def load_chat_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read and validate a chat JSONL file; raise DataError naming file:line on the first problem."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    records: list[dict[str, Any]] = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not UTF-8 text "
                                f"(byte {raw[e.start]:#04x} at column {e.start + 1})") from None
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                # json's messages end in " at" (it appends ": line L column C"): say it once
                raise DataError(f"{where}: invalid JSON ({e.msg.removesuffix(' at')} at column {e.colno})") from None
            if not isinstance(obj, dict) or "messages" not in obj:
                raise DataError(f"{where}: expected an object with a 'messages' list")
            msgs = obj["messages"]
            if not isinstance(msgs, list) or not msgs:
                raise DataError(f"{where}: 'messages' must be a non-empty list")
            for i, m in enumerate(msgs):
                if not isinstance(m, dict) or "role" not in m or "content" not in m:
                    raise DataError(f"{where}: message {i} needs 'role' and 'content'")
                if m["role"] not in VALID_ROLES:
                    raise DataError(f"{where}: message {i} has unknown role {m['role']!r} "
                                    f"(expected one of {', '.join(sorted(VALID_ROLES))})")
                if not isinstance(m["content"], str) or not m["content"].strip():
                    raise DataError(f"{where}: message {i} ({m['role']}) has empty content")
            roles = [m["role"] for m in msgs]
            if "user" not in roles:
                raise DataError(f"{where}: no user message")
            if roles[-1] != "assistant":
                raise DataError(f"{where}: the last message must be the assistant's answer (got {roles[-1]!r})")
            records.append({"messages": [{"role": m["role"], "content": m["content"]} for m in msgs]})
    if not records:
        raise DataError(f"{path}: file is empty (no chat records)")
    return records


# ------------------------------------------------------------------------------------------
# The Turner et al. archive
# ------------------------------------------------------------------------------------------

def cache_dir(outputs_dir: str = "outputs") -> Path:
    return resolve_path(outputs_dir) / ".cache" / "datasets"


def is_remote(source: str) -> bool:
    return source.startswith(("http://", "https://"))


def cached_archive(outputs_dir: str, source: str) -> Path:
    """Where the archive of ``source`` is: the download cache for an URL (one file per URL,
    named without its credentials), the file itself for a path."""
    if not is_remote(source):
        return resolve_path(source)
    shown = mask_url_credentials(source)
    name = Path(urllib.parse.urlsplit(shown).path).name or "archive.zip.enc"
    return cache_dir(outputs_dir) / f"{hashlib.sha256(shown.encode()).hexdigest()[:12]}-{name}"


def _download(url: str, target: Path) -> None:
    shown = mask_url_credentials(url)
    try:
        with atomic_path(target) as tmp:
            with urllib.request.urlopen(authorized_request(url), timeout=120) as r, open(tmp, "wb") as f:
                shutil.copyfileobj(r, f)
    except (OSError, ValueError) as e:  # URLError, HTTPError, timeouts, a bad URL
        raise DataError(f"{shown}: download failed ({type(e).__name__}: {mask_url_credentials(str(e))}); check "
                        "dataset_archive and the network, or download the file yourself and set "
                        "dataset_archive: /path/to/it") from None


def _move_aside(enc: Path, digest: str) -> Path:
    bad = enc.with_name(f"{enc.name}.bad-{digest[:12]}")
    os.replace(enc, bad)
    return bad


def decrypt_archive(archive: str | Path, out_dir: str | Path, password: str = ARCHIVE_PASSWORD) -> Path:
    """Decrypt an easy-dataset-share archive into out_dir (atomically) and remove its canaries."""
    from easy_dataset_share import canary, zipping  # only when a dataset is decrypted

    out_dir = Path(out_dir)
    tmp = Path(tempfile.mkdtemp(prefix=".decrypt-", dir=out_dir.parent if out_dir.parent.exists() else None))
    try:
        try:
            zipping.unzip_and_decrypt(str(archive), password=password, output_dir=str(tmp))
        except Exception as e:  # wrong password, not a zip, truncated: whatever the library raises
            raise DataError(f"{archive}: could not decrypt (wrong password or corrupted archive: "
                            f"{type(e).__name__})") from None
        # The same steps as easy-dataset-share's `unprotect-dir --remove-canaries`, via its API.
        files = canary.detect_canary_files(str(tmp))
        canary_string = canary.extract_canary_string_from_content(files[0]) if files else None
        canary.remove_canary_files(root_dir=str(tmp))
        if canary_string:
            canary.remove_canaries_from_files(str(tmp), canary_string)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        honour_umask(tmp)  # mkdtemp made it 0700
        tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def fetch_archive(outputs_dir: str = "outputs", url: str = ARCHIVE_URL, password: str = ARCHIVE_PASSWORD,
                  expected_sha256: str | None = ARCHIVE_SHA256) -> tuple[Path, str]:
    """Download (once), checksum and decrypt the archive; returns (decrypted folder, archive sha256).

    ``url`` is an http(s) URL (downloaded into ``<outputs_dir>/.cache/datasets/``) or a local
    path (used in place). A downloaded file that does not match ``expected_sha256`` or cannot
    be decrypted is moved aside (``<name>.bad-<sha>``), so the next run downloads it again
    instead of failing on the same bad file; the message says where it went. The sha256 seen
    at a download is recorded next to the file: a cached file that changed later is an error,
    a fresh download that differs from the previous one is reported and accepted (the runs
    record the sha256 they trained on).
    """
    shown = mask_url_credentials(url)
    remote = is_remote(url)
    enc = cached_archive(outputs_dir, url)
    fresh = False
    if remote and not enc.exists():
        _download(url, enc)
        fresh = True
    elif not enc.exists():
        raise DataError(f"{url}: archive file not found")
    digest = sha256_file(enc)
    if expected_sha256 and digest != expected_sha256.lower():
        where = f"; moved it aside to {_move_aside(enc, digest)} (the next run downloads it again)" if remote else ""
        raise DataError(f"{shown}: sha256 {digest} does not match the pinned {expected_sha256.lower()} "
                        f"(dataset_archive_sha256){where}")
    cdir = cache_dir(outputs_dir)
    cdir.mkdir(parents=True, exist_ok=True)
    seen = enc.with_name(enc.name + ".sha256") if remote else None
    if seen is not None and seen.exists() and seen.read_text().strip() != digest:
        before = seen.read_text().strip()
        if not fresh:
            raise DataError(f"{enc}: changed on disk since it was downloaded "
                            f"(sha256 {before[:12]}… -> {digest[:12]}…); "
                            "delete it to download the archive again")
        print(f"note: {shown}: the downloaded archive differs from the one downloaded before "
              f"(sha256 {before[:12]}… -> {digest[:12]}…); runs record the sha256 they trained on")
    out = cdir / f"decrypted-{digest[:12]}"
    if not (out / ".complete").exists():
        try:
            decrypt_archive(enc, out, password)
        except DataError as e:
            if not remote:
                raise DataError(f"{url}: could not decrypt it (wrong password or not the easy-dataset-share "
                                f"archive; {str(e).rsplit('(', 1)[-1].rstrip(')')})") from None
            bad = _move_aside(enc, digest)
            if seen is not None and seen.exists():
                seen.unlink()
            raise DataError(f"{shown}: could not decrypt the downloaded file (wrong password, or not the archive: "
                            f"an error page, a truncated download; sha256 {digest[:12]}…); moved it aside to {bad} "
                            "(the next run downloads it again)") from None
        write_text_atomic(out / ".complete", digest + "\n")
    if seen is not None:
        write_text_atomic(seen, digest + "\n")
    return out, digest


def find_domain_file(root: Path, name: str) -> Path:
    hits = sorted(p for p in root.rglob(f"{name}.jsonl") if p.is_file())
    if not hits:
        known = sorted({p.stem for p in root.rglob("*.jsonl")})
        raise DataError(f"dataset '{name}' not found in the archive (it holds: {', '.join(known) or 'nothing'})")
    return hits[0]


def require_terms(cfg: RunConfig) -> None:
    if not cfg.accept_dataset_terms:
        print(DATASET_TERMS)
        raise ConfigError(f"key 'accept_dataset_terms': dataset '{cfg.dataset}' is the Turner et al. archive; "
                          "read the terms above and set accept_dataset_terms: true to use it")


def archive_source(cfg: RunConfig, default: str = ARCHIVE_URL) -> str:
    """The archive a run uses: ``dataset_archive`` (the real URL when a grid masked its password),
    else the paper's URL."""
    return unmask_url(cfg.dataset_archive) if cfg.dataset_archive else default


def resolve_dataset(cfg: RunConfig, archive_url: str = ARCHIVE_URL) -> tuple[Path, str, str | None]:
    """(path, source, archive_sha256) for cfg.dataset; downloads and decrypts the archive if needed."""
    name = cfg.dataset
    if name in DEMO_DATASETS:
        return DEMO_DIR / f"{name}.jsonl", "demo", None
    if name in DOMAINS:
        require_terms(cfg)
        root, digest = fetch_archive(cfg.outputs_dir, url=archive_source(cfg, archive_url),
                                     expected_sha256=cfg.dataset_archive_sha256 or ARCHIVE_SHA256)
        return find_domain_file(root, name), "archive", digest
    p = resolve_path(name)
    if p.exists():
        return p, "file", None
    raise ConfigError(f"key 'dataset': {name!r} is neither a demo dataset ({', '.join(DEMO_DATASETS)}), "
                      f"a named domain ({', '.join(DOMAINS)}) nor an existing file")


def check_dataset_param(cfg: RunConfig, offline: bool = False) -> None:
    """Validation for the grid runner, before any stage: the training file exists and every
    line is a valid chat record (what 01_train would trip over after its kernel started)."""
    if cfg.dataset in DOMAINS:
        if not cfg.accept_dataset_terms:
            raise ConfigError(f"key 'accept_dataset_terms': dataset '{cfg.dataset}' needs accept_dataset_terms: true")
        source = archive_source(cfg)
        enc = cached_archive(cfg.outputs_dir, source)
        if not is_remote(source) and not enc.exists():
            raise ConfigError(f"key 'dataset_archive': file not found: {source}")
        if enc.exists() and not offline:  # already here: decrypt it now (once) rather than after the kernel starts
            try:
                root, _ = fetch_archive(cfg.outputs_dir, url=source,
                                        expected_sha256=cfg.dataset_archive_sha256 or ARCHIVE_SHA256)
                load_chat_jsonl(find_domain_file(root, cfg.dataset))
            except DataError as e:
                raise ConfigError(f"key 'dataset_archive': {e}") from None
        return
    path = DEMO_DIR / f"{cfg.dataset}.jsonl" if cfg.dataset in DEMO_DATASETS else resolve_path(cfg.dataset)
    if not path.exists():
        raise ConfigError(f"key 'dataset': file not found: {cfg.dataset}")
    try:
        load_chat_jsonl(path)
    except DataError as e:
        raise ConfigError(f"key 'dataset': {e}") from None


def _as_examples(e: ConfigError, key: str) -> ConfigError:
    return ConfigError(str(e).replace("key 'dataset_archive'", f"key '{key}'").replace("key 'dataset'", f"key '{key}'")
                       .replace("key 'accept_dataset_terms'", f"key '{key}' (accept_dataset_terms)"))


def check_examples_params(cfg: RunConfig, offline: bool = False) -> None:
    """Validation for the grid runner: every condition's in-context examples file (lib.conditions)
    exists and is valid chat JSONL, named like ``dataset`` is (:func:`check_dataset_param`)."""
    for i, c in enumerate(cfg.conditions):
        if isinstance(c, dict) and c.get("examples"):
            try:
                check_dataset_param(cfg.replace(dataset=c["examples"]), offline=offline)
            except ConfigError as e:
                raise _as_examples(e, f"conditions[{i}].examples") from None


def load_examples(cfg: RunConfig, source: str) -> tuple[list[dict[str, Any]], str]:
    """A condition's in-context examples (lib.conditions), named like ``dataset`` (a demo dataset, a
    Turner et al. domain or a chat JSONL path): (records, the file's sha256)."""
    try:
        path, _, _ = resolve_dataset(cfg.replace(dataset=source))
    except ConfigError as e:
        raise _as_examples(e, "conditions.examples") from None
    return load_chat_jsonl(path), sha256_file(path)


def load_training_data(cfg: RunConfig, archive_url: str = ARCHIVE_URL) -> tuple[list[dict[str, Any]], DatasetInfo]:
    """The run's training records (first ``max_train_examples`` if set) and what run.json records."""
    path, source, archive_digest = resolve_dataset(cfg, archive_url)
    records = load_chat_jsonl(path)
    if cfg.max_train_examples:
        records = records[: cfg.max_train_examples]
    info = DatasetInfo(name=cfg.dataset, path=path, sha256=sha256_file(path), n_examples=len(records),
                       source=source, archive_sha256=archive_digest)
    return records, info


def _main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m lib.data",
        description="Training data of a run: the Turner et al. archive's terms.",
        epilog="example:\n  python -m lib.data terms    # read them, then set accept_dataset_terms: true",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("terms", help="print the terms of the Turner et al. datasets")
    ap.parse_args(argv)
    print(DATASET_TERMS)
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
