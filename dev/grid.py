"""Labelled image grids for the demo and the benchmarks, and the fidelity × editability plot.

``python3 -m dev.grid LOG [LOG …] --out OUT.png [--rows base,cd,ico+dci_a0.5_l2_base]`` redraws a bench-quality
plot from the ``fidelity_floor=…`` and ``method=…`` lines runs printed (``--rows``: a chosen subset, in that
order; several logs: runs on the same scale whose shared rows agree), so a figure needs no rerun.

``python3 -m dev.grid LOG --samples GRID.png --out OUT.png --rows … --cols 0,4,8`` cuts the chosen rows and
columns (prompt indices, 0-based) out of the sample grid the same run wrote with ``--grid`` (its rows are the
log's ``method=`` rows, in order) and saves them labelled, in 256 colours.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np


def labelled_grid(rows: Sequence[tuple[str, np.ndarray]], label_width: int = 150, scale: int = 1,
                  headers: Sequence[tuple[int, str]] = (), margin: int = 0):
    """Image rows [H, W, 3] (uint8) stacked top to bottom, each with its label at the left; optional column
    headers ``(x in the rows' pixels, text)`` above; rows enlarged ``scale`` times. Returns a PIL image."""
    from PIL import Image, ImageDraw

    top = 28 if headers else 0
    width = label_width + scale * max(r.shape[1] for _, r in rows) + margin
    height = top + scale * sum(r.shape[0] for _, r in rows) + margin
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for x, text in headers:
        draw.text((label_width + x * scale + 10, 8), text, fill="black")
    y = top
    for name, row in rows:
        image = Image.fromarray(row)
        if scale != 1:
            image = image.resize((row.shape[1] * scale, row.shape[0] * scale), Image.NEAREST)
        canvas.paste(image, (label_width, y))
        draw.text((6, y + image.height // 2 - 6), name, fill="black")
        y += image.height
    return canvas


def scatter_plot(points: dict[str, tuple[float, float]], fidelity_ends: tuple[float, float] | None = None,
                 size: tuple[int, int] = (760, 560)):
    """Fidelity (x) × editability (y), one labelled dot per method (labels placed clear of each other, with a
    leader line where a label had to move away), with the fidelity scale's floor and ceiling as dashed vertical
    lines. Axes span the data with a margin (not 0..1), so close methods stay apart."""
    from PIL import Image, ImageDraw

    w, h = size
    left, right, top, bottom = 70, 30, 30, 60
    xs = [p[0] for p in points.values()] + [v for v in (fidelity_ends or ()) if np.isfinite(v)]
    ys = [p[1] for p in points.values()]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    pad_x, pad_y = max(0.02, 0.08 * (x1 - x0)), max(0.02, 0.08 * (y1 - y0))
    x0, x1, y0, y1 = x0 - pad_x, x1 + pad_x, y0 - pad_y, min(1.0, y1 + pad_y) if y1 < 1 else y1 + pad_y

    def px(x: float, y: float) -> tuple[float, float]:
        return (left + (x - x0) / (x1 - x0) * (w - left - right), h - bottom - (y - y0) / (y1 - y0) * (h - top - bottom))

    canvas = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(canvas)
    d.rectangle([left, top, w - right, h - bottom], outline="black")
    for k in range(6):
        fx, fy = x0 + k * (x1 - x0) / 5, y0 + k * (y1 - y0) / 5
        gx, _ = px(fx, y0)
        _, gy = px(x0, fy)
        d.line([gx, h - bottom, gx, h - bottom + 5], fill="black")
        d.text((gx - 14, h - bottom + 8), f"{fx:.2f}", fill="black")
        d.line([left - 5, gy, left, gy], fill="black")
        d.text((left - 42, gy - 6), f"{fy:.2f}", fill="black")
    d.text(((left + w - right) / 2 - 60, h - 26), "fidelity (higher: more like the instance)", fill="black")
    d.text((6, top - 22), "editability (higher: follows the prompt)", fill="black")
    reserved = []  # the scale lines' captions: no dot label goes over them
    for value, name in zip(fidelity_ends or (), ("floor", "ceiling"), strict=False):
        if not np.isfinite(value):
            continue
        gx, _ = px(value, y0)
        for yy in range(top, h - bottom, 8):
            d.line([gx, yy, gx, min(yy + 4, h - bottom)], fill=(120, 120, 120))
        d.text((gx + 3, top + 3), f"fidelity {name}", fill=(90, 90, 90))
        reserved.append(d.textbbox((gx + 3, top + 3), f"fidelity {name}"))
    palette = [(200, 40, 40), (40, 90, 200), (30, 150, 60), (150, 60, 190), (230, 130, 20), (20, 150, 160)]
    dots = [px(x, y) for x, y in points.values()]
    taken = [(cx - 5, cy - 5, cx + 5, cy + 5) for cx, cy in dots] + reserved
    for i, (name, (cx, cy)) in enumerate(zip(points, dots, strict=True)):
        colour = palette[i % len(palette)]
        d.ellipse([cx - 4, cy - 4, cx + 4, cy + 4], fill=colour)
        box = label_box(d, name, (cx, cy), taken, (left, top, w - right, h - bottom))
        taken.append(box)
        if abs(box[0] - cx) > 12 and abs(box[2] - cx) > 12 or abs((box[1] + box[3]) / 2 - cy) > 12:
            # to the label box's nearest point, so the line never runs through the label's text
            d.line([cx, cy, min(max(cx, box[0]), box[2]), min(max(cy, box[1]), box[3])], fill=colour)
        d.text((box[0], box[1]), name, fill=colour)
    return canvas


def _overlaps(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def label_box(d, text: str, at: tuple[float, float], taken: list, frame: tuple[float, float, float, float]):
    """Where a dot's label goes: the first spot beside the dot, then further out (right, left, above, below),
    whose box overlaps no dot or label placed before and stays in the frame; beside the dot if none does."""
    x0, y0, x1, y1 = d.textbbox((0, 0), text)
    tw, th = x1 - x0, y1 - y0 + 2
    cx, cy = at
    for step in range(0, 14):
        r = 6 + step * 10
        for dx, dy in ((r, -th / 2), (-r - tw, -th / 2), (-tw / 2, -r - th), (-tw / 2, r),
                       (r, -th / 2 - r), (r, r - th / 2), (-r - tw, -th / 2 - r), (-r - tw, r - th / 2)):
            box = (cx + dx, cy + dy, cx + dx + tw, cy + dy + th)
            inside = box[0] >= frame[0] and box[2] <= frame[2] and box[1] >= frame[1] and box[3] <= frame[3]
            if inside and not any(_overlaps(box, t) for t in taken):
                return box
    return (cx + 6, cy - th / 2, cx + 6 + tw, cy + th / 2)


def read_bench_log(text: str) -> tuple[dict[str, tuple[float, float]], tuple[float, float]]:
    """The rows (method → (fidelity, editability)) and the scale's ends of one bench-quality run's output.
    A log holding more than one run's summary is refused: rows of different runs share no scale."""
    ends = re.findall(r"^fidelity_floor=(\S+) fidelity_ceiling=(\S+)\r?$", text, flags=re.M)
    if len(ends) != 1:
        raise ValueError(f"expected one 'fidelity_floor=… fidelity_ceiling=…' line (one run), found {len(ends)}")
    points = {}
    for m in re.finditer(r"^method=(\S+) fidelity=(\S+) editability=(\S+) ", text, flags=re.M):
        if m.group(1) in points:
            raise ValueError(f"method {m.group(1)!r} appears twice: the log holds more than one run")
        points[m.group(1)] = (float(m.group(2)), float(m.group(3)))
    if not points:
        raise ValueError("no 'method=… fidelity=… editability=…' lines in the log")
    return points, (float(ends[0][0]), float(ends[0][1]))


def merge_logs(logs: Sequence[tuple[str, str]]) -> tuple[dict[str, tuple[float, float]], tuple[float, float]]:
    """The rows of several runs ``(name, text)`` on one plot: only runs on the same scale (equal floor and
    ceiling), and a row two runs share must agree to the printed digit (the runs repeat each other), else
    ``ValueError``."""
    points: dict[str, tuple[float, float]] = {}
    ends = None
    for name, text in logs:
        try:
            more, these = read_bench_log(text)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
        if ends is not None and these != ends:
            raise ValueError(f"{name}: its scale (floor {these[0]}, ceiling {these[1]}) differs from the first "
                             f"log's ({ends[0]}, {ends[1]}); rows of different scales cannot share a plot")
        ends = these
        for row, xy in more.items():
            if row in points and points[row] != xy:
                raise ValueError(f"{name}: row {row!r} is {xy}, another log has {points[row]}; the runs differ")
            points[row] = xy
    if ends is None:
        raise ValueError("no log given")
    return points, ends


def cut_sample_grid(grid: np.ndarray, methods: Sequence[str], rows: Sequence[str], cols: Sequence[int],
                    tile: int = 128, label_width: int = 150):
    """Rows (by method name) and columns (by prompt index) of a bench's ``--grid`` image [H, W, 3], whose rows
    are ``methods`` in order, each ``tile`` pixels high after a ``label_width`` label; returns a PIL image
    (labelled again, 256 colours). ``ValueError`` when the image does not have that layout or a row or column
    is not in it."""
    if grid.ndim != 3 or grid.shape[0] != len(methods) * tile or (grid.shape[1] - label_width) % tile:
        raise ValueError(f"the sample grid is {grid.shape[1]}×{grid.shape[0]} px; a grid of the log's "
                         f"{len(methods)} rows is {len(methods) * tile} px high and {label_width} px + whole "
                         f"{tile}-px tiles wide: was it written by the same run?")
    count = (grid.shape[1] - label_width) // tile
    unknown = [r for r in rows if r not in methods]
    if unknown:
        raise ValueError(f"rows {', '.join(unknown)} are not in the log")
    outside = [c for c in cols if not 0 <= c < count]
    if outside or not cols:
        raise ValueError(f"columns must be prompt indices 0..{count - 1}; got {list(cols)}")
    cut = []
    for name in rows:
        i = methods.index(name)
        band = grid[i * tile:(i + 1) * tile]
        cut.append((name, np.concatenate([band[:, label_width + c * tile:label_width + (c + 1) * tile]
                                          for c in cols], axis=1)))
    return labelled_grid(cut, label_width=label_width).quantize(256)


def _publish(image, out: Path) -> None:
    """Write a PNG via a temporary file linked into place: never half-written, never over an existing file."""
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        image.save(tmp, format="PNG", optimize=True)
        os.link(tmp, out)  # publishes the whole file, and never over one that appeared meanwhile
    except FileExistsError:
        sys.exit(f"{out} exists; remove it or choose another name")
    finally:
        tmp.unlink(missing_ok=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="redraw a bench-quality fidelity × editability plot from its log(s)")
    p.add_argument("logs", type=Path, nargs="+",
                   help="bench-quality runs' printed output (several: runs on the same prompts, seeds and scale)")
    p.add_argument("--out", type=Path, required=True, help="the PNG to write (an existing file is refused)")
    p.add_argument("--rows", default="", help="comma list of method= names to plot, in that order (default: all)")
    p.add_argument("--samples", type=Path, default=None,
                   help="instead of the plot, cut --rows and --cols out of this sample grid (the run's --grid PNG)")
    p.add_argument("--cols", default="", help="with --samples: comma list of prompt columns (0-based) to keep")
    a = p.parse_args(argv)
    try:
        points, ends = merge_logs([(str(f), f.read_text(encoding="utf-8", errors="replace")) for f in a.logs])
    except (OSError, ValueError) as e:
        sys.exit(str(e))
    rows = [r.strip() for r in a.rows.split(",") if r.strip()] or list(points)
    missing = [r for r in rows if r not in points]
    if missing:
        sys.exit(f"--rows: {', '.join(missing)} not in the logs; they have {', '.join(points)}")
    if a.out.suffix.lower() != ".png":
        sys.exit(f"{a.out}: the output is written as PNG; give a .png name")
    if not a.out.parent.is_dir():
        sys.exit(f"{a.out.parent} is not a folder; create it first")
    if a.out.exists():
        sys.exit(f"{a.out} exists; remove it or choose another name")
    if a.cols and a.samples is None:
        sys.exit("--cols goes with --samples (the sample grid to cut)")
    if a.samples is not None:
        if len(a.logs) != 1:
            sys.exit("--samples: give the one log of the run that wrote the grid")
        try:
            from PIL import Image

            cols = [int(c) for c in a.cols.split(",") if c.strip()]
            grid = np.asarray(Image.open(a.samples).convert("RGB"))
            image = cut_sample_grid(grid, list(points), rows, cols)
        except (OSError, ValueError) as e:
            sys.exit(f"--samples: {e}")
        _publish(image, a.out)
        print(f"sample grid: {a.out} ({len(rows)} rows × {len(cols)} columns)")
        return
    _publish(scatter_plot({r: points[r] for r in rows}, ends), a.out)
    print(f"plot: {a.out} ({len(rows)} rows)")


if __name__ == "__main__":
    main()
