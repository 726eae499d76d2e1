"""Template thumbnails: ``workflows/<name>.jpg``, which the front end's template browser shows beside each workflow
(it asks the server for ``/api/workflow_templates/<pack>/<name>.jpg``).

Each thumbnail is the graph as the real front end draws it: the browser test (``tests/e2e/test_browser.py``)
loads every workflow into ComfyUI's page and saves a screenshot to ``test-artifacts/browser/<name>.png``; this
script crops the drawn graph out of each screenshot (no side bar, tabs, menu or empty canvas) and writes it as a
JPEG.

    python3 dev/host.py python -m pytest tests/e2e/test_browser.py     # the screenshots
    python3 dev/host.py python -m dev.thumbnails                       # workflows/*.jpg from them
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHOTS = REPO / "test-artifacts" / "browser"
WORKFLOWS = REPO / "workflows"
CANVAS = (0.035, 0.09, 0.86, 0.9)  # left, top, right, bottom of the graph canvas, as fractions of the page
SIZE = (640, 400)
MARGIN = 12  # pixels of canvas kept around the graph


def thumbnail(screenshot: Path, target: Path) -> None:
    from PIL import Image

    page = Image.open(screenshot).convert("RGB")
    w, h = page.size
    box = (int(CANVAS[0] * w), int(CANVAS[1] * h), int(CANVAS[2] * w), int(CANVAS[3] * h))
    canvas = page.crop(box)
    import numpy as np

    a = np.asarray(canvas).astype(np.int16)
    background = np.median(a.reshape(-1, 3), axis=0)
    ys, xs = np.nonzero(np.abs(a - background).max(axis=2) > 24)  # anything drawn on the empty canvas
    if len(xs):
        canvas = canvas.crop((max(0, xs.min() - MARGIN), max(0, ys.min() - MARGIN),
                              min(canvas.width, xs.max() + MARGIN), min(canvas.height, ys.max() + MARGIN)))
    canvas.thumbnail(SIZE, Image.Resampling.LANCZOS)
    tmp = target.with_name(f".{target.name}.tmp")
    canvas.save(tmp, format="JPEG", quality=85, optimize=True)
    os.replace(tmp, target)


def main() -> int:
    names = sorted(p.stem for p in WORKFLOWS.glob("*.json"))
    missing = [n for n in names if not (SHOTS / f"{n}.png").is_file()]
    if missing:
        print(f"no screenshot for {', '.join(missing)} in {SHOTS}: run tests/e2e/test_browser.py first",
              file=sys.stderr)
        return 1
    for name in names:
        thumbnail(SHOTS / f"{name}.png", WORKFLOWS / f"{name}.jpg")
        print((WORKFLOWS / f"{name}.jpg").relative_to(REPO))
    return 0


if __name__ == "__main__":
    sys.exit(main())
