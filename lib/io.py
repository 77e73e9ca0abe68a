"""Small file helpers every stage shares: atomic writes and content hashes.

Anything a stage writes goes to a temporary file in the same folder first and is then
renamed over the target, so a killed process never leaves a half-written file behind. The
temporary file (``mkstemp``: mode 0600) gets the mode a plain ``open()`` would have given it
(0666 minus the umask, so 0644 under the usual 022) before the rename: collaborators who can
read the outputs folder can read its files.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


def current_umask() -> int:
    """The process's umask, read without changing it where /proc allows (os.umask() sets it,
    briefly, for every thread)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def honour_umask(path: str | Path) -> None:
    """Give a file (0666) or folder (0777, recursively) made by mkstemp/mkdtemp the mode that
    open()/mkdir() would have given it under the current umask."""
    path = Path(path)
    mask = current_umask()
    if path.is_dir():
        for p in [path, *path.rglob("*")]:
            if not p.is_symlink():
                os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)
    else:
        os.chmod(path, 0o666 & ~mask)


@contextmanager
def atomic_path(target: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success rename it over ``target`` (with the
    mode a plain open() would give it)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix or ".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.exists():
            honour_umask(tmp_path)
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text_atomic(target: str | Path, text: str) -> Path:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(target)


def write_bytes_atomic(target: str | Path, data: bytes) -> Path:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)
    return Path(target)


def write_json_atomic(target: str | Path, data: Any) -> Path:
    return write_text_atomic(target, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def write_parquet_atomic(df, target: str | Path) -> Path:
    """DataFrame -> parquet, atomically."""
    with atomic_path(target, suffix=".parquet") as tmp:
        df.to_parquet(tmp, index=False)
    return Path(target)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


PROVENANCE_KEY = "provenance"  # safetensors metadata key holding the JSON provenance


def write_safetensors_atomic(tensors: dict, target: str | Path, provenance: dict[str, Any]) -> Path:
    """Tensors -> a .safetensors file, atomically, with ``provenance`` (JSON) in its metadata.

    safetensors metadata is str -> str, so the provenance dict is stored as one JSON string
    under :data:`PROVENANCE_KEY`; any safetensors reader sees it (``safe_open(...).metadata()``).
    """
    from safetensors.torch import save_file  # heavy: loaded only when a model runs

    plain = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    meta = {PROVENANCE_KEY: json.dumps(provenance, sort_keys=True, default=str)}
    with atomic_path(target, suffix=".safetensors") as tmp:
        save_file(plain, str(tmp), metadata=meta)
    return Path(target)


def read_safetensors(path: str | Path) -> tuple[dict, dict[str, Any]]:
    """(tensors, provenance) of a file written by :func:`write_safetensors_atomic`."""
    from safetensors import safe_open  # heavy: loaded only when a model runs

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return tensors, json.loads(meta.get(PROVENANCE_KEY, "{}"))
