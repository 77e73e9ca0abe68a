"""Are the figures in docs/benchmarks.md still about the code as it is?

Each measured section of docs/benchmarks.md carries one record line:

    Measured at: commit <sha>; modules: <path> <path> ...; content sha256: <12 hex digits>

The content hash is sha256 over the listed files' bytes, in the listed order (each preceded by
its path), as they were when the figures were measured. This script recomputes it for the
files as they are now: a section whose modules changed since is *stale* (re-run its benchmark
and update the section and its record). It prints, per record, fresh or stale and the last
commit that touched the modules, and exits 1 when one is stale. Not part of ``make test``
(other engineers' edits to a measured module must not turn the suite red); run it before
quoting a figure, and after changing a measured module.

    python bench/stale_figures.py            # every record of docs/benchmarks.md
    python bench/stale_figures.py --record   # print the record line for: --modules a.py b.py

Last line: ``stale benchmark records: <k> of <n> (goal 0)``.
"""
from __future__ import annotations

import argparse
import hashlib
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NOT_YET = re.compile(r"^Measured at: not yet \(([^)]*)\); modules: ([^;]+?)\s*$", re.M)
RECORD = re.compile(r"^Measured at: commit ([0-9a-f]{7,40}); modules: ([^;]+); content sha256: ([0-9a-f]{12})\s*$", re.M)


def content_hash(modules: list[str], root: Path = ROOT) -> str:
    h = hashlib.sha256()
    for m in modules:
        h.update(m.encode() + b"\0")
        h.update((root / m).read_bytes())
    return h.hexdigest()[:12]


def last_change(modules: list[str], root: Path = ROOT) -> str:
    r = subprocess.run(["git", "log", "-1", "--format=%h %cs %s", "--", *modules], cwd=root,
                       capture_output=True, text=True)
    return r.stdout.strip()[:100] if r.returncode == 0 else "(no git history)"


def check(doc: Path, root: Path = ROOT) -> tuple[int, int]:
    """(stale, total) records in doc; prints one line per record."""
    text = doc.read_text(encoding="utf-8")
    records = RECORD.findall(text)
    for why, mods in NOT_YET.findall(text):
        print(f"not measured ({why}): {mods}")
    stale = 0
    for commit, mods, recorded in records:
        modules = mods.split()
        missing = [m for m in modules if not (root / m).exists()]
        if missing:
            stale += 1
            print(f"STALE  {commit}: measured modules no longer exist: {' '.join(missing)}")
            continue
        now = content_hash(modules, root)
        if now != recorded:
            stale += 1
            print(f"STALE  measured at {commit}; since changed: {' '.join(modules)} "
                  f"(last change: {last_change(modules, root)})")
        else:
            print(f"fresh  measured at {commit}: {' '.join(modules)}")
    return stale, len(records)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--doc", default=str(ROOT / "docs" / "benchmarks.md"))
    ap.add_argument("--record", action="store_true", help="print a record line for --modules at HEAD")
    ap.add_argument("--modules", nargs="*", default=[])
    args = ap.parse_args(argv)
    if args.record:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True).stdout.strip()
        print(f"Measured at: commit {head}; modules: {' '.join(args.modules)}; "
              f"content sha256: {content_hash(args.modules)}")
        return 0
    stale, total = check(Path(args.doc))
    print(f"stale benchmark records: {stale} of {total} (goal 0)")
    return 1 if stale or total == 0 else 0


if __name__ == "__main__":
    sys.exit(main())
