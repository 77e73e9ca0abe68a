"""run.json: each stage records the parameters it ran with; files of earlier versions still read."""
from __future__ import annotations

import json

import pytest

from lib import layout, runinfo
from lib.config import RunConfig


def test_each_stage_keeps_its_own_parameters(tmp_path):
    cfg = RunConfig(run_id="r", outputs_dir=str(tmp_path))
    runinfo.update_run_json(cfg, "train", {"steps_per_epoch": 9})
    later = cfg.replace(judge_name="second", temperature=0.5)
    runinfo.update_run_json(later, "judge", {"last": "second"})
    info = json.loads((tmp_path / "r" / "run.json").read_text())
    assert info["train"]["steps_per_epoch"] == 9 and info["train"]["parameters"] == cfg.to_dict()
    assert info["judge"]["parameters"]["judge_name"] == "second" and info["judge"]["last"] == "second"
    assert runinfo.stage_parameters(info, "train")["judge_name"] == ""        # not overwritten
    assert runinfo.stage_parameters(info, "train")["temperature"] == 1.0
    assert runinfo.stage_parameters(info)["judge_name"] == ""                # first stage recorded
    assert set(info["environment"]) == {"train", "judge"} and "parameters" not in info
    assert runinfo.read_run_json(tmp_path / "r") == info


def test_stage_parameters_of_a_run_json_of_earlier_versions():
    legacy = {"parameters": {"model": "m", "judge_name": "j"}, "train": {"steps_per_epoch": 3}}
    assert runinfo.stage_parameters(legacy, "train") == {"model": "m", "judge_name": "j"}
    assert runinfo.stage_parameters(legacy, "judge")["judge_name"] == "j"
    assert runinfo.stage_parameters({}, "train") == {}


def test_invalid_run_json_is_one_line_naming_file_and_line(tmp_path):
    (tmp_path / "run.json").write_text('{\n  "run_id": "r",\n  oops\n}\n')
    with pytest.raises(runinfo.RunJsonError, match=r"run\.json: line 3: invalid JSON"):
        runinfo.read_run_json(tmp_path)
    assert runinfo.read_run_json(tmp_path / "missing") == {}


def test_layout_lists_only_complete_checkpoints(tmp_path):
    for step, marker in ((4, {"step": 4, "epoch": 0.5}), (8, {"step": 8, "epoch": 1.0}), (2, None),
                         (6, {"step": 5, "epoch": 0.6})):
        d = layout.checkpoint_dir(tmp_path, step)
        d.mkdir(parents=True)
        if marker:
            (d / layout.CHECKPOINT_MARKER).write_text(json.dumps(marker))
    (layout.checkpoints_dir(tmp_path) / "checkpoint-x").mkdir()
    assert layout.list_checkpoints(tmp_path) == [(4, 0.5, tmp_path / "checkpoints" / "checkpoint-4"),
                                                 (8, 1.0, tmp_path / "checkpoints" / "checkpoint-8")]
    assert layout.list_checkpoints(tmp_path / "nothing") == []
    assert layout.judgments_path(tmp_path, "j") == tmp_path / "judgments" / "j.parquet"
    assert layout.generations_path(tmp_path).name == "generations.parquet"  # the name outputs already have
