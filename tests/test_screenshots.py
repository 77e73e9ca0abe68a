"""scripts/screenshots.py: its arguments, the report it picks, the demo copies, the PNG shrinking.

Chromium itself is not run here (scripts/check_report_offline.py's checks in tests/test_report.py
drive it); the committed docs/screenshots/*.png are checked for size only.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.fakes.bench import load_script

REPO = Path(__file__).resolve().parent.parent


shots = load_script("screenshots")


@pytest.mark.parametrize("argv, message", [
    (["--max-kb", "0"], "--max-kb: 0 is outside 20..5000"),
    (["--width", "100"], "--width: 100 is outside 400..3000"),
    (["--demo", "--report", "x"], "do not also name one with --report"),
])
def test_bad_arguments_exit_2_with_one_line(argv, message, capsys):
    assert shots.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_a_named_report_folder_must_hold_both_pages(tmp_path, capsys):
    (tmp_path / "report.html").write_text("<html></html>")
    assert shots.main(["--report", str(tmp_path), "--work", str(tmp_path / "w")]) == 2
    assert f"--report {tmp_path}: no answers.html there" in capsys.readouterr().err
    (tmp_path / "answers.html").write_text("<html></html>")
    folder, why = shots.choose_report(shots.parse_args(["--report", str(tmp_path)]))
    assert folder == tmp_path and "--report" in why


def test_the_default_is_outputs_report_else_the_demo(tmp_path, monkeypatch):
    monkeypatch.setattr(shots, "DEFAULT_REPORT", tmp_path / "report")
    assert shots.choose_report(shots.parse_args([]))[0] is None           # no report yet: render the demo
    (tmp_path / "report").mkdir()
    for f in shots.REPORT_FILES:
        (tmp_path / "report" / f).write_text("<html></html>")
    assert shots.choose_report(shots.parse_args([]))[0] == tmp_path / "report"
    assert shots.choose_report(shots.parse_args(["--demo"]))[0] is None   # --demo: always a fresh one


def test_demo_copies_point_outputs_dir_into_the_work_folder_and_change_nothing_else(tmp_path):
    from lib import config

    files = shots.demo_params(tmp_path)
    assert [p.stem for p in files] == list(shots.DEMO_PARAMS)
    for p in files:
        copy, orig = config.load_yaml(p), config.load_yaml(REPO / "parameters" / p.name)
        assert copy["outputs_dir"] == str((tmp_path / "outputs").resolve()) != orig["outputs_dir"]
        assert {k: v for k, v in copy.items() if k != "outputs_dir"} == {k: v for k, v in orig.items()
                                                                          if k != "outputs_dir"}


def test_shrink_png_crops_fits_the_width_and_the_size_limit(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    noisy = rng.integers(0, 255, size=(1600, 1400, 3), dtype=np.uint8)  # incompressible: must be scaled down
    noisy[:100] = 255
    Image.fromarray(noisy).save(tmp_path / "big.png")
    out = shots.shrink_png(tmp_path / "big.png", tmp_path / "o" / "small.png", (0, 100, 1400, 1300), 1000, 100)
    assert out.stat().st_size <= 100 * 1024
    with Image.open(out) as im:
        assert im.width <= 1000 and abs(im.width / im.height - 1400 / 1200) < 0.01  # the crop's proportions
    assert not list((tmp_path / "o").glob(".*tmp"))


def test_section_box_runs_from_the_heading_to_the_figure_bottom():
    pos = {"height": 9000, "headings": [["Intro¶", [0, 30]], ["EM over training¶", [2000, 2040]]],
           "figures": {"em_trajectories": [2300, 2900]}}
    assert shots.section_box(pos, "EM over training", "em_trajectories", 1280) == (0, 1988, 1280, 2912)
    with pytest.raises(RuntimeError, match="no section"):
        shots.section_box(pos, "Training", "training_loss", 1280)


def test_committed_screenshots_are_small_pngs():
    from PIL import Image

    names = ["report.png", "report_trajectory.png", "report_training.png", "viewer.png"]
    folder = REPO / "docs" / "screenshots"
    for name in names:
        p = folder / name
        assert p.stat().st_size <= 300 * 1024, name
        with Image.open(p) as im:
            assert im.format == "PNG" and 400 <= im.width <= 1000 and im.height >= 300
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert all(f"docs/screenshots/{n}" in readme for n in names)


def test_viewer_opens_on_the_run_with_most_em_answers_treated_before_control(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "table_final.csv").write_text(
        "run_id,run_label,source,scope,checkpoint_step,em_k\n"
        "a_control,tiny · medical · control,run,all,18,0\n"
        "b,tiny · medical,run,all,18,0\n"
        "ext_x,x,external,all,-1,9\n"
        "c,tiny · financial,run,in-domain,9,5\n")
    assert shots.final_checkpoint_of_a_run(tmp_path) == ("b", 18)   # all zero: the treated run
    with open(tmp_path / "data" / "table_final.csv", "a") as f:
        f.write("c,tiny · financial,run,all,9,2\n")
    assert shots.final_checkpoint_of_a_run(tmp_path) == ("c", 9)    # most EM answers (scope all)
    assert shots.final_checkpoint_of_a_run(tmp_path / "nothing") is None
