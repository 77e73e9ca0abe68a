"""lib.layout: every path function of a run folder gives the file the module docstring promises,
from a str or a Path, under its public name and with its file in its docstring."""
from __future__ import annotations

from pathlib import Path

import pytest

from lib import layout

# public function -> the path it gives under outputs/r (written out, not taken from the module)
EXPECTED = {
    "run_json_path": "run.json",
    "stages_path": "stages.json",
    "grid_dir": ".grid",
    "checkpoints_dir": "checkpoints",
    "train_log_path": "train_log.csv",
    "eval_log_path": "eval_log.csv",
    "generations_path": "generations.parquet",
    "generations_meta_path": "generations.meta.json",
    "generation_parts_dir": "generations.parts",
    "judgments_dir": "judgments",
    "notebooks_dir": "notebooks",
    "figures_dir": "figures",
    "progress_path": "progress.jsonl",
}


@pytest.mark.parametrize("name,rel", EXPECTED.items())
def test_every_run_file_function_gives_its_path(name, rel):
    fn = getattr(layout, name)
    assert fn("outputs/r") == Path("outputs/r") / rel
    assert fn(Path("/abs/r")) == Path("/abs/r") / rel
    assert isinstance(fn("x"), Path)
    assert fn.__name__ == name and f"``<run_dir>/{rel}``" in (fn.__doc__ or "")


def test_the_derived_paths():
    assert layout.checkpoint_dir("o/r", 12) == Path("o/r/checkpoints/checkpoint-12")
    assert layout.judgments_path(Path("o/r"), "hf-tiny-exact") == Path("o/r/judgments/hf-tiny-exact.parquet")
    assert layout.step_of(layout.checkpoint_dir("o/r", 7)) == 7 and layout.step_of(Path("checkpoint-x")) is None


def test_judgment_files_and_checkpoints_on_disk(tmp_path):
    assert layout.judgment_files(tmp_path) == [] and layout.list_checkpoints(tmp_path) == []
    layout.judgments_dir(tmp_path).mkdir()
    for n in ("b", "a"):
        layout.judgments_path(tmp_path, n).write_bytes(b"")
    assert [p.name for p in layout.judgment_files(tmp_path)] == ["a.parquet", "b.parquet"]
    for step, marker in ((2, '{"step": 2, "epoch": 0.5}'), (1, '{"step": 9, "epoch": 0.2}'), (3, None)):
        d = layout.checkpoint_dir(tmp_path, step)
        d.mkdir(parents=True)
        if marker:
            (d / layout.CHECKPOINT_MARKER).write_text(marker)
    assert layout.list_checkpoints(tmp_path) == [(2, 0.5, layout.checkpoint_dir(tmp_path, 2))]
