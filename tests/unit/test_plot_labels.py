"""The bench's fidelity × editability plot places each dot's label clear of the other dots and labels."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from dev.grid import _overlaps, label_box, scatter_plot


def test_labels_of_a_tight_cluster_do_not_overlap() -> None:
    d = ImageDraw.Draw(Image.new("RGB", (760, 560), "white"))
    frame = (70, 30, 730, 500)
    dots = [(400 + 3 * i, 200 + 2 * i) for i in range(9)]  # nine rows within a few pixels, as Infusion's were
    taken = [(x - 5, y - 5, x + 5, y + 5) for x, y in dots]
    boxes = []
    for i, at in enumerate(dots):
        box = label_box(d, f"infusion+dci_row_{i}", at, taken, frame)
        assert frame[0] <= box[0] and box[2] <= frame[2] and frame[1] <= box[1] and box[3] <= frame[3]
        assert not any(_overlaps(box, t) for t in taken)
        taken.append(box)
        boxes.append(box)
    assert len(set(boxes)) == len(boxes)


def test_the_plot_draws_every_row() -> None:
    points = {f"m{i}": (0.4 + 0.001 * i, 0.97) for i in range(6)} | {"base": (0.36, 0.99)}
    image = scatter_plot(points, (0.36, 0.92))
    assert image.size == (760, 560)
    colours = {tuple(c) for c in np.asarray(image).reshape(-1, 3)}
    assert len(colours) > 6  # the six palette colours and the axes, not a blank canvas
