"""``dev.split_steps``: how many steps each DCI split gives both branches and the concept branch alone."""

from __future__ import annotations

import pytest

from dev.split_steps import format_row, parse_splits, split_table


def test_counts_on_sd1_schedule(comfy, tiny_sd15):
    model = tiny_sd15[0]
    rows = split_table(model, [0.0, 0.5, 0.7, 0.9, 1.0], steps=20, scheduler="normal")
    counts = [(r["two_branch_steps"], r["concept_only_steps"]) for r in rows]
    # SD1.x's schedule, 20 normal steps: the counts docs/benchmarks.md gives for the toy model (same schedule).
    assert counts == [(0, 20), (10, 10), (14, 6), (18, 2), (20, 0)]
    assert rows[-1]["first_concept_only_sigma"] is None
    assert rows[2]["first_concept_only_sigma"] < rows[2]["end_sigma"] < rows[1]["end_sigma"]
    line = format_row(rows[3])
    assert line.startswith("split=0.9 two_branch_steps=18 concept_only_steps=2 end_sigma=")
    assert format_row(rows[-1]).endswith("first_concept_only_sigma=none")


def test_half_denoise_halves_the_schedule_not_the_noise_level(comfy, tiny_sd15):
    model = tiny_sd15[0]
    full, = split_table(model, [0.5], steps=20, scheduler="normal")
    half, = split_table(model, [0.5], steps=20, scheduler="normal", denoise=0.5)
    assert half["end_sigma"] == full["end_sigma"]
    assert half["two_branch_steps"] + half["concept_only_steps"] == 20
    assert half["two_branch_steps"] < full["two_branch_steps"]


@pytest.mark.parametrize("text", ["0.3,x", "1.5", "-0.1,0.5", ""])
def test_bad_splits_are_refused_with_the_range(text):
    with pytest.raises(SystemExit, match="--splits"):
        parse_splits(text)
