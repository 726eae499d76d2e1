"""bench-quality's Layout-and-Retouch rows and layout-diversity measure (the parts that need no model)."""

from __future__ import annotations

import numpy as np
import pytest

from dev.bench_rows import layout_diversity, lr_label, lr_sweep, open_prompt, pair_diversity


def test_retouch_sweep_and_row_names():
    rows = lr_sweep("0.2, 0.5,dci:0.3:1")
    assert rows == [("layout", 0.2, 0.0), ("layout", 0.5, 0.0), ("dci", 0.3, 1.0)]
    assert [lr_label(r) for r in rows] == ["lr_s0.2", "lr_s0.5", "lr_dci_a0.3_l1"]
    assert lr_sweep("") == []
    for bad in ("1.5", "dci:0.3", "x"):
        with pytest.raises(SystemExit):
            lr_sweep(bad)


def test_pair_diversity_is_the_share_of_differing_pairs():
    assert pair_diversity(["a", "a", "a"]) == 0.0
    assert pair_diversity(["a", "b", "c"]) == 1.0
    assert pair_diversity(["a", "a", "b", "b"]) == pytest.approx(4 / 6)
    assert np.isnan(pair_diversity(["a"]))
    assert open_prompt("sks circle") == "a sks circle" and open_prompt("orange square") == "an orange square"


def test_layout_diversity_reads_position_size_and_background_from_pixels():
    from dci.toyworld.render import ObjectSpec, SceneSpec, render_scene

    same = np.stack([render_scene(SceneSpec(ObjectSpec(position="left"), background="blue"))] * 3)
    assert layout_diversity(same, "circle") == 0.0
    varied = np.stack([
        render_scene(SceneSpec(ObjectSpec(position="left", size="small"), background="blue")),
        render_scene(SceneSpec(ObjectSpec(position="right", size="large"), background="green")),
    ])
    assert layout_diversity(varied, "circle") == 1.0
