"""A kill -9 stand-in for the evaluate stage: it dies after a number of answer part files were written."""
from __future__ import annotations

import pandas as pd
import pytest

from lib import evaluate


def evaluate_killed_after_parts(monkeypatch: pytest.MonkeyPatch, cfg, n_parts: int) -> pd.DataFrame:
    """Run ``cfg``'s evaluate stage until ``n_parts`` part files are written, then interrupt it (as a kill
    would); check that it left no generations file and exactly those parts, restore the real writer,
    and return the answers the parts hold (what a resumed run must keep)."""
    real_write, writes = evaluate._write_part, []

    def dying_write(path, rows):
        if len(writes) == n_parts:
            raise KeyboardInterrupt("killed")
        writes.append(len(rows))
        real_write(path, rows)
    monkeypatch.setattr(evaluate, "_write_part", dying_write)
    with pytest.raises(KeyboardInterrupt):
        evaluate.evaluate_run(cfg, progress=False)
    assert not evaluate.generations_path(cfg).exists()
    parts = sorted((cfg.run_dir / "generations.parts").rglob("step*.parquet"))
    assert len(parts) == n_parts
    monkeypatch.setattr(evaluate, "_write_part", real_write)
    return pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True)
