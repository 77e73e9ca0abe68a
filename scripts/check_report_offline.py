"""Open an exported report in headless Chromium with the network cut off; check its charts show.

    .venv/bin/python scripts/check_report_offline.py [outputs/report/report.html] [--keep DIR]

Needs Chromium (Debian: ``apt-get install -y chromium``). Two checks, both on a copy of the
report opened from a file:// URL, with every request outside the file routed to a dead proxy
and every host name unresolvable (so a chart that needs a CDN cannot load):

1. DOM check: a script appended to the copy counts the figure images (``<img alt="figure: ...">``,
   as lib.plots.show writes them) and how many decoded (``complete && naturalWidth > 0``);
   ``chromium --dump-dom`` returns the count after the page's load event.
2. Screenshot check: a screenshot of the whole page, and one of the same page with the figure
   images hidden; the figures must add a clear amount of visible (non-white) pixels. The
   number of coloured pixels (chart marks) they add is reported as well.

Prints one JSON line with the numbers and, last, ``offline report check: ok|FAILED``; exit 1 on failure.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")
OFFLINE_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
    "--disable-extensions", "--mute-audio",
    # "network off": every non-file request goes to a closed local port, every name fails to resolve
    "--proxy-server=http://127.0.0.1:9", "--proxy-bypass-list=<-loopback>",
    "--host-resolver-rules=MAP * ~NOTFOUND",
]
CHECK_SCRIPT = """
<script>
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.querySelectorAll('img[alt^="figure:"]'));
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; });
  var pre = document.createElement('pre');
  pre.id = 'em-offline-check';
  pre.textContent = JSON.stringify({figures: imgs.length, decoded: ok.length,
                                    height: document.documentElement.scrollHeight,
                                    names: imgs.map(function (i) { return i.alt; })});
  document.body.appendChild(pre);
});
</script>
"""
HIDE_FIGURES = '<style>img[alt^="figure:"] { visibility: hidden !important; }</style>'


def find_chromium() -> str | None:
    for c in CHROMIUM_CANDIDATES:
        if Path(c).exists():
            return c
    return shutil.which("chromium")


def _inject(html: str, snippet: str) -> str:
    i = html.rfind("</body>")
    return html[:i] + snippet + html[i:] if i >= 0 else html + snippet


def _chromium(exe: str, workdir: Path, args: list[str], timeout: int = 120) -> subprocess.CompletedProcess:
    profile = tempfile.mkdtemp(prefix="chromium-profile-", dir=workdir)
    cmd = [exe, *OFFLINE_FLAGS, f"--user-data-dir={profile}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def ink_pixels(png: Path) -> int:
    """Pixels that are not near-white (text, axes, gridlines, marks) in a screenshot."""
    from PIL import Image

    grey = Image.open(png).convert("L")
    return sum(grey.histogram()[:230])  # grey levels 0..229 of 255


def coloured_pixels(png: Path) -> tuple[int, int]:
    """(pixels that are clearly coloured, i.e. chart marks, total pixels) of a screenshot."""
    from PIL import Image

    im = Image.open(png).convert("RGB")
    hsv = im.convert("HSV")
    s, v = hsv.getchannel("S"), hsv.getchannel("V")
    # saturation > 60/255 and not too dark: bars, lines, points, heatmap cells; text is grey/black
    mask = Image.eval(s, lambda x: 255 if x > 60 else 0)
    bright = Image.eval(v, lambda x: 255 if x > 60 else 0)
    from PIL import ImageChops

    both = ImageChops.multiply(mask, bright)
    total = im.width * im.height
    return total - both.histogram()[0], total


def check(html_path: str | Path, workdir: str | Path, width: int = 1400, max_height: int = 30000) -> dict:
    """Run both checks on ``html_path``; returns the numbers and ``ok``."""
    exe = find_chromium()
    if exe is None:
        raise FileNotFoundError("chromium not found (Debian: apt-get install -y chromium)")
    html_path, workdir = Path(html_path).resolve(), Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    text = html_path.read_text(encoding="utf-8")
    page = workdir / "report_check.html"
    page.write_text(_inject(text, CHECK_SCRIPT), encoding="utf-8")
    hidden = workdir / "report_hidden.html"
    hidden.write_text(_inject(text, HIDE_FIGURES), encoding="utf-8")

    dom = _chromium(exe, workdir, ["--virtual-time-budget=15000", "--dump-dom", page.as_uri()])
    m = re.search(r'<pre id="em-offline-check">(.*?)</pre>', dom.stdout, re.S)
    result: dict = {"html": str(html_path), "chromium": exe}
    if not m:
        result.update(ok=False, error=f"no check output from chromium (rc {dom.returncode}): {dom.stderr[-500:]}")
        return result
    result.update(json.loads(m.group(1).replace("&quot;", '"').replace("&amp;", "&")))

    height = min(max_height, int(result.get("height") or 10000) + 200)  # the whole page, in one shot
    shots = {}
    for name, src in (("with_figures", page), ("figures_hidden", hidden)):
        png = workdir / f"{name}.png"
        _chromium(exe, workdir, ["--virtual-time-budget=15000", f"--window-size={width},{height}",
                                 f"--screenshot={png}", src.as_uri()])
        if not png.exists():
            result.update(ok=False, error=f"chromium wrote no screenshot {png.name}")
            return result
        shots[name] = (*coloured_pixels(png), ink_pixels(png))
    (c_with, total, ink_with), (c_without, _, ink_without) = shots["with_figures"], shots["figures_hidden"]
    result.update(screenshot=str(workdir / "with_figures.png"), coloured_with_figures=c_with,
                  coloured_figures_hidden=c_without, ink_with_figures=ink_with, ink_figures_hidden=ink_without,
                  pixels=total)
    # Each figure must add visible ink to the page: 2,000 pixels per figure (a 45 x 45 px patch)
    # is far below a chart's axes, labels and marks, and far above what a broken-image icon adds.
    # Coloured pixels (chart marks) are reported too; a chart with no data (every answer
    # excluded) has axes and titles but no marks, and still counts as shown.
    result["ok"] = bool(result["figures"] > 0 and result["decoded"] == result["figures"]
                        and ink_with - ink_without > 2000 * result["figures"])
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("html", nargs="?", default="outputs/report/report.html")
    ap.add_argument("--keep", help="folder for the screenshots (default: a temporary folder)")
    args = ap.parse_args(argv)
    if not Path(args.html).exists():
        print(f"error: {args.html}: file not found (run `make demo` first)", file=sys.stderr)
        return 2
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="report-check-"))
    try:
        res = check(args.html, work)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(res))
    print(f"offline report check: {'ok' if res['ok'] else 'FAILED'}")
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
