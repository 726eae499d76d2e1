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


LOG = """fidelity scale: floor 0.360 (class prompt) ...
fidelity_floor=0.360 fidelity_ceiling=0.920
method=base fidelity=0.360 editability=0.986 prompt_acc=0.585 fid_norm=0.000
method=cd fidelity=0.501 editability=0.415 prompt_acc=0.467 fid_norm=0.251
method=ico+dci_a0.5_l2_base fidelity=0.538 editability=0.639 prompt_acc=0.540 fid_norm=0.317
"""


def test_the_plot_is_redrawn_from_a_run_log_with_chosen_rows(tmp_path) -> None:
    from dev.grid import main, read_bench_log

    points, ends = read_bench_log(LOG)
    assert ends == (0.360, 0.920)
    assert read_bench_log(LOG.replace("\n", "\r\n")) == (points, ends)  # a log saved with CRLF line ends
    assert points == {"base": (0.360, 0.986), "cd": (0.501, 0.415), "ico+dci_a0.5_l2_base": (0.538, 0.639)}
    (tmp_path / "run.log").write_text(LOG)
    out = tmp_path / "plot.png"
    main([str(tmp_path / "run.log"), "--out", str(out), "--rows", "base,ico+dci_a0.5_l2_base"])
    assert Image.open(out).size == (760, 560)
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_log_of_two_runs_or_an_unknown_row_is_refused(tmp_path) -> None:
    import pytest

    from dev.grid import main, read_bench_log

    with pytest.raises(ValueError, match="one run"):
        read_bench_log(LOG + LOG)
    (tmp_path / "run.log").write_text(LOG)
    with pytest.raises(SystemExit, match="infusion not in the log"):
        main([str(tmp_path / "run.log"), "--out", str(tmp_path / "p.png"), "--rows", "base,infusion"])
    (tmp_path / "p.png").write_bytes(b"keep")
    with pytest.raises(SystemExit, match="exists"):
        main([str(tmp_path / "run.log"), "--out", str(tmp_path / "p.png")])
    assert (tmp_path / "p.png").read_bytes() == b"keep"
    with pytest.raises(SystemExit, match="not a folder"):
        main([str(tmp_path / "run.log"), "--out", str(tmp_path / "no" / "p.png")])
    assert not list(tmp_path.glob(".*.tmp"))


def test_runs_on_one_scale_merge_and_disagreeing_runs_are_refused() -> None:
    import pytest

    from dev.grid import merge_logs

    other = LOG.replace("method=cd fidelity=0.501 editability=0.415 prompt_acc=0.467 fid_norm=0.251\n", "") + (
        "method=ico+dci_a0.7_l2_base fidelity=0.527 editability=0.743 prompt_acc=0.591 fid_norm=0.298\n")
    points, ends = merge_logs([("a", LOG), ("b", other)])
    assert ends == (0.360, 0.920) and set(points) == {"base", "cd", "ico+dci_a0.5_l2_base", "ico+dci_a0.7_l2_base"}
    with pytest.raises(ValueError, match="scale"):
        merge_logs([("a", LOG), ("b", LOG.replace("fidelity_floor=0.360", "fidelity_floor=0.370"))])
    with pytest.raises(ValueError, match="the runs differ"):
        merge_logs([("a", LOG), ("b", LOG.replace("editability=0.415", "editability=0.416"))])


def _sample_grid(rows: int, cols: int) -> np.ndarray:
    """A bench-style --grid image: white 150-px label band, then 128-px tiles, tile (r, c) filled with a colour
    that encodes r and c."""
    grid = np.full((rows * 128, 150 + cols * 128, 3), 255, np.uint8)
    for r in range(rows):
        for c in range(cols):
            grid[r * 128:(r + 1) * 128, 150 + c * 128:150 + (c + 1) * 128] = (40 * r + 10, 30 * c + 20, 200)
    return grid


def test_a_sample_grid_is_cut_to_the_chosen_rows_and_columns(tmp_path) -> None:
    from dev.grid import cut_sample_grid, main

    grid = _sample_grid(3, 4)
    methods = ["base", "cd", "ico+dci_a0.5_l2_base"]
    cut = np.asarray(cut_sample_grid(grid, methods, ["ico+dci_a0.5_l2_base", "base"], [3, 1]).convert("RGB"))
    assert cut.shape == (256, 150 + 256, 3)
    centre = lambda r, c: tuple(cut[r * 128 + 64, 150 + c * 128 + 64])  # noqa: E731
    assert centre(0, 0) == (90, 110, 200) and centre(0, 1) == (90, 50, 200)
    assert centre(1, 0) == (10, 110, 200) and centre(1, 1) == (10, 50, 200)
    (tmp_path / "run.log").write_text(LOG)
    Image.fromarray(grid).save(tmp_path / "grid.png")
    out = tmp_path / "cut.png"
    main([str(tmp_path / "run.log"), "--samples", str(tmp_path / "grid.png"), "--out", str(out), "--rows", "cd",
          "--cols", "0,2"])
    assert Image.open(out).size == (150 + 256, 128)
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_sample_grid_of_another_run_or_a_missing_column_is_refused(tmp_path) -> None:
    import pytest

    from dev.grid import cut_sample_grid, main

    methods = ["base", "cd", "ico+dci_a0.5_l2_base"]
    with pytest.raises(ValueError, match="same run"):
        cut_sample_grid(_sample_grid(4, 4), methods, ["cd"], [0])  # a grid with one row more than the log
    with pytest.raises(ValueError, match="0..3"):
        cut_sample_grid(_sample_grid(3, 4), methods, ["cd"], [4])
    with pytest.raises(ValueError, match="infusion"):
        cut_sample_grid(_sample_grid(3, 4), methods, ["infusion"], [0])
    (tmp_path / "run.log").write_text(LOG)
    with pytest.raises(SystemExit, match="--cols goes with --samples"):
        main([str(tmp_path / "run.log"), "--out", str(tmp_path / "p.png"), "--cols", "0"])
    Image.fromarray(_sample_grid(2, 4)).save(tmp_path / "grid.png")
    with pytest.raises(SystemExit, match="same run"):
        main([str(tmp_path / "run.log"), "--samples", str(tmp_path / "grid.png"), "--out", str(tmp_path / "p.png"),
              "--cols", "0"])
    assert not (tmp_path / "p.png").exists()
