"""Screenshots of the report and the answer viewer for ``docs/screenshots/`` (small PNGs).

    .venv/bin/python scripts/screenshots.py                 # outputs/report if it exists, else the demo
    .venv/bin/python scripts/screenshots.py --report DIR    # a report folder you already have
    .venv/bin/python scripts/screenshots.py --demo [--work DIR]   # render the demo first (minutes)

Which report is shot: ``--report DIR`` when given (it must hold ``report.html`` and
``answers.html``); else ``outputs/report`` (what ``make demo`` writes) when it holds both;
else, or with ``--demo``, the embedded demo is rendered first with ``python -m lib.grid run``
on copies of ``parameters/demo_*.yaml`` whose ``outputs_dir`` points into ``--work`` (default:
a new temporary folder), so nothing under ``outputs/`` is touched.

The pages are opened from ``file://`` URLs in headless Chromium with the network cut (the
flags of ``scripts/check_report_offline.py``); each shot is cropped from a full-page screenshot
at the place the page itself reports for the element (a script added to a copy of the page
writes the positions, read back with ``--dump-dom``), then shrunk to ``--max-width`` pixels and
256 colours, and smaller still until it is at most ``--max-kb``:

* ``report.png``           the top of the exported report: title, notes, the study's table;
* ``report_trajectory.png`` the "EM over training" section and its figure;
* ``report_training.png``  every run's training loss and gradient norm on one step axis;
* ``viewer.png``           ``answers.html`` opened on one run's final checkpoint (URL hash).

Exit status: 0 written; 2 bad arguments or a missing input (one line on stderr); 1 Chromium
failed. Needs Chromium (Debian: ``apt-get install -y chromium``) and Pillow.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from urllib.parse import quote

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
import check_report_offline as offline  # noqa: E402  (beside this file: chromium flags and helpers)

DEMO_PARAMS = ("demo_medical", "demo_financial", "demo_medical_control")  # = make demo
DEFAULT_REPORT = REPO / "outputs" / "report"
REPORT_FILES = ("report.html", "answers.html")
# report sections: (file name, heading text the section starts with, figure it ends with)
SECTIONS = (("report_trajectory.png", "EM over training", "em_trajectories"),
            ("report_training.png", "Training: loss and gradient norm", "training_loss"))

POSITIONS_SCRIPT = """
<script>
window.addEventListener('load', function () {
  var y = function (e) { var r = e.getBoundingClientRect(); return [r.top + window.scrollY, r.bottom + window.scrollY]; };
  var out = {height: document.documentElement.scrollHeight, headings: [], figures: {}};
  document.querySelectorAll('h1, h2').forEach(function (h) { out.headings.push([h.textContent.trim(), y(h)]); });
  document.querySelectorAll('figure[data-figure]').forEach(function (f) { out.figures[f.dataset.figure] = y(f); });
  var pre = document.createElement('pre'); pre.id = 'em-positions'; pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>
"""


class UsageError(ValueError):
    """A bad argument or a missing input: one line, exit status 2."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="scripts/screenshots.py", description=__doc__.split("\n\n")[0],
                                 epilog="examples:\n  scripts/screenshots.py\n  scripts/screenshots.py --report "
                                        "/tmp/x/outputs/report\n  scripts/screenshots.py --demo --work /tmp/demo",
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--report", help="report folder with report.html and answers.html (default: outputs/report, "
                                     "or the demo rendered first when that does not exist)")
    ap.add_argument("--demo", action="store_true", help="render the embedded demo first (minutes), into --work")
    ap.add_argument("--work", help="folder for the rendered demo and the raw screenshots (default: a temp folder)")
    ap.add_argument("--out", default=str(REPO / "docs" / "screenshots"), help="where the PNGs go")
    ap.add_argument("--width", type=int, default=1280, help="browser window width in CSS pixels (400-3000)")
    ap.add_argument("--max-width", type=int, default=1000, help="widest PNG written, in pixels (200-3000)")
    ap.add_argument("--max-kb", type=int, default=300, help="largest PNG written, in KB (20-5000)")
    args = ap.parse_args(argv)
    for key, lo, hi in (("width", 400, 3000), ("max_width", 200, 3000), ("max_kb", 20, 5000)):
        value = getattr(args, key)
        if not lo <= value <= hi:
            raise UsageError(f"--{key.replace('_', '-')}: {value} is outside {lo}..{hi}")
    if args.demo and args.report:
        raise UsageError("--demo renders a new report; do not also name one with --report")
    return args


def choose_report(args: argparse.Namespace) -> tuple[Path | None, str]:
    """(report folder to shoot, or None when the demo must be rendered first; why)."""
    if args.demo:
        return None, "--demo: rendering the demo first"
    if args.report:
        folder = Path(args.report)
        missing = [f for f in REPORT_FILES if not (folder / f).is_file()]
        if missing:
            raise UsageError(f"--report {folder}: no {missing[0]} there (render a report first, or use --demo)")
        return folder, f"the report in {folder} (--report)"
    if all((DEFAULT_REPORT / f).is_file() for f in REPORT_FILES):
        return DEFAULT_REPORT, f"the existing report in {DEFAULT_REPORT}"
    return None, f"no report in {DEFAULT_REPORT}: rendering the demo first"


def demo_params(work: Path) -> list[Path]:
    """Copies of the demo's parameters files with ``outputs_dir`` = ``<work>/outputs``."""
    import yaml

    (work / "params").mkdir(parents=True, exist_ok=True)
    out = []
    for name in DEMO_PARAMS:
        data = yaml.safe_load((REPO / "parameters" / f"{name}.yaml").read_text(encoding="utf-8"))
        data["outputs_dir"] = str((work / "outputs").resolve())
        p = work / "params" / f"{name}.yaml"
        p.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
        out.append(p)
    return out


def render_demo(work: Path) -> Path:
    """Run the demo grid into ``work`` (as ``make demo`` does, on the copies); returns its report folder."""
    files = demo_params(work)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    print(f"rendering the demo into {work / 'outputs'} (minutes) ...", flush=True)
    rc = subprocess.run([sys.executable, "-m", "lib.grid", "run", *map(str, files)], cwd=REPO, env=env).returncode
    if rc != 0:
        raise RuntimeError(f"the demo grid failed (exit {rc})")
    return work / "outputs" / "report"


def shrink_png(src: Path, dst: Path, box: tuple[int, int, int, int] | None, max_width: int, max_kb: int) -> Path:
    """Crop ``box`` (left, top, right, bottom) out of ``src``, fit it in ``max_width`` pixels and 256
    colours, and shrink further until the file is at most ``max_kb``; written atomically to ``dst``."""
    from PIL import Image

    with Image.open(src) as im:
        im = im.convert("RGB")
        if box is not None:
            im = im.crop(box)
    scale = min(1.0, max_width / im.width)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp")
    while True:
        size = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
        small = im.resize(size, Image.LANCZOS) if scale < 1 else im
        small.quantize(colors=256, method=Image.MEDIANCUT, dither=Image.NONE).save(tmp, format="PNG", optimize=True)
        if tmp.stat().st_size <= max_kb * 1024 or min(size) < 50:
            break
        scale *= 0.85
    os.replace(tmp, dst)
    return dst


def page_positions(exe: str, page: Path, work: Path, width: int) -> dict:
    """Heading and figure positions (CSS pixels from the page top) that ``page`` reports after loading
    in a window ``width`` pixels wide (the screenshot's: text wraps, and so moves, with the width)."""
    copy = work / f"{page.stem}_positions.html"
    copy.write_text(offline._inject(page.read_text(encoding="utf-8"), POSITIONS_SCRIPT), encoding="utf-8")
    dom = offline._chromium(exe, work, ["--virtual-time-budget=15000", f"--window-size={width},1000", "--dump-dom",
                                        copy.as_uri()])
    m = re.search(r'<pre id="em-positions">(.*?)</pre>', dom.stdout, re.S)
    if not m:
        raise RuntimeError(f"chromium reported no positions for {page.name} (rc {dom.returncode}): {dom.stderr[-300:]}")
    return json.loads(m.group(1).replace("&quot;", '"').replace("&amp;", "&"))


def full_screenshot(exe: str, url: str, work: Path, name: str, width: int, height: int) -> Path:
    png = work / name
    png.unlink(missing_ok=True)
    offline._chromium(exe, work, ["--virtual-time-budget=15000", f"--window-size={width},{height}",
                                  f"--screenshot={png}", url])
    if not png.exists():
        raise RuntimeError(f"chromium wrote no screenshot of {url}")
    return png


def section_box(pos: dict, heading: str, figure: str, width: int, max_height: int = 1500) -> tuple[int, int, int, int]:
    """From the section's heading to the bottom of its figure (at most ``max_height`` pixels)."""
    top = next((y[0] for text, y in pos["headings"] if text.startswith(heading)), None)
    fig = pos["figures"].get(figure)
    if top is None or fig is None:
        raise RuntimeError(f"the report has no section '{heading}' with figure '{figure}'")
    top = max(0, int(top) - 12)
    return 0, top, width, min(int(fig[1]) + 12, top + max_height)


def final_checkpoint_of_a_run(report: Path) -> tuple[str, int] | None:
    """(run id, last checkpoint step) of the trained run with the most EM answers at its final
    checkpoint in the report's final table (ties: a treated run before a control, then by run id)."""
    table = report / "data" / "table_final.csv"
    if not table.exists():
        return None
    with open(table, newline="", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r.get("source", "run") == "run" and r.get("scope", "all") == "all"]
    if not rows:
        return None
    best = min(rows, key=lambda r: (-float(r.get("em_k") or 0), "control" in r.get("run_label", ""), r["run_id"]))
    return best["run_id"], int(float(best["checkpoint_step"]))


def take(report: Path, out: Path, work: Path, width: int, max_width: int, max_kb: int) -> list[Path]:
    exe = offline.find_chromium()
    if exe is None:
        raise UsageError("chromium not found (Debian: apt-get install -y chromium)")
    written = []
    page = (report / "report.html").resolve()
    pos = page_positions(exe, page, work, width)
    full = full_screenshot(exe, page.as_uri(), work, "report_full.png", width, min(30000, int(pos["height"]) + 50))
    written.append(shrink_png(full, out / "report.png", (0, 0, width, min(1300, int(pos["height"]))), max_width, max_kb))
    for name, heading, figure in SECTIONS:
        written.append(shrink_png(full, out / name, section_box(pos, heading, figure, width), max_width, max_kb))
    viewer = (report / "answers.html").resolve()
    pick = final_checkpoint_of_a_run(report)
    url = viewer.as_uri() + (f"#run={quote(pick[0])}&step={pick[1]}" if pick else "")
    shot = full_screenshot(exe, url, work, "viewer_full.png", width, 1100)
    written.append(shrink_png(shot, out / "viewer.png", None, max_width, max_kb))
    return written


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        report, why = choose_report(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="em-screenshots-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"screenshots of {why}", flush=True)
    try:
        if report is None:
            report = render_demo(work)
        files = take(report, Path(args.out), work, args.width, args.max_width, args.max_kb)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for p in files:
        print(f"{p}  {p.stat().st_size // 1024} KB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
