#!/usr/bin/env bash
# Look at an executed notebook as a reader would: render it to HTML with nbconvert, then screenshot it in
# headless Chromium, page by page.
#
#   scripts/render_notebook.sh [NOTEBOOK] [OUT_DIR]
#
# NOTEBOOK defaults to artifacts/local/README.executed.ipynb (what `make demo` writes), OUT_DIR to
# <NOTEBOOK's directory>/render. Writes OUT_DIR/notebook.html and OUT_DIR/page-01.png, page-02.png, ...
# (1280 x 1600 pixels each, top to bottom).
#
# Needs Chromium (Debian: `apt-get install -y chromium`; elsewhere set CHROMIUM=/path/to/chrome).
# nbconvert and Pillow go into a virtualenv of their own (RENDER_VENV, default
# ~/.cache/distill/render-venv): rendering is a developer's tool, and the project's .venv stays exactly
# what requirements.txt pins.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
nb="${1:-$root/artifacts/local/README.executed.ipynb}"
out="${2:-$(dirname "$nb")/render}"
venv="${RENDER_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/distill/render-venv}"
chromium="${CHROMIUM:-$(command -v chromium || command -v chromium-browser || true)}"

[ -f "$nb" ] || { echo "error: no notebook at $nb (run make demo first)" >&2; exit 1; }
[ -n "$chromium" ] || { echo "error: Chromium not found: apt-get install -y chromium (or set CHROMIUM)" >&2; exit 1; }
if ! "$venv/bin/python" -c "import nbconvert, PIL" 2>/dev/null; then
  echo "setting up $venv (nbconvert, Pillow) once"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet nbconvert==7.17.2 pillow==13.0.0
fi

mkdir -p "$out"
rm -f "$out"/page-*.png
"$venv/bin/python" -m nbconvert --log-level WARN --to html --output-dir "$out" --output notebook "$nb"

"$venv/bin/python" - "$chromium" "$out" <<'EOF'
"""Screenshot OUT/notebook.html in pages. Chromium's --screenshot captures one window, so the page is
measured first, then shot in tall windows (each shifted up by the height already shot) and cut into pages."""
import re
import subprocess
import sys
from pathlib import Path

from PIL import Image

chromium, out = sys.argv[1], Path(sys.argv[2]).resolve()  # as_uri() needs an absolute path
WIDTH, PAGE, SHOT = 1280, 1600, 16000  # a window much taller than 16000 px may come out blank
FLAGS = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--mute-audio",
         "--disable-dev-shm-usage", "--no-first-run"]
html = (out / "notebook.html").read_text(encoding="utf-8")


def variant(name: str, extra: str) -> Path:
    """A copy of the page with `extra` (a style or script) at the end of its body."""
    p = out / name
    p.write_text(html.replace("</body>", extra + "</body>", 1), encoding="utf-8")
    return p


# The page's height at this width, once its images are in: a script writes it into the DOM Chromium dumps.
probe = variant("probe.html", "<script>window.addEventListener('load', () => document.body.setAttribute("
                              "'data-height', document.documentElement.scrollHeight));</script>")
dom = subprocess.run([*FLAGS, f"--window-size={WIDTH},{PAGE}", "--dump-dom", probe.as_uri()],
                     capture_output=True, text=True, check=True).stdout
height = int(re.search(r'data-height="(\d+)"', dom).group(1))
probe.unlink()

page = 0
for top in range(0, height, SHOT):
    window = min(SHOT, height - top)
    shifted = variant("shot.html", f"<style>body {{ margin-top: -{top}px !important; }}</style>")
    png = out / "shot.png"
    subprocess.run([*FLAGS, f"--window-size={WIDTH},{window}", f"--screenshot={png}", shifted.as_uri()],
                   capture_output=True, check=True)
    with Image.open(png) as im:
        for y in range(0, window, PAGE):
            page += 1
            im.crop((0, y, WIDTH, min(y + PAGE, window))).save(out / f"page-{page:02d}.png")
    png.unlink()
    shifted.unlink()
print(f"{out / 'notebook.html'}: {height} px high, {page} screenshots: {out}/page-01.png ... page-{page:02d}.png")
EOF
