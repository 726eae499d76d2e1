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


def test_encoder_rows_follow_the_trained_ones_with_their_budgets():
    from types import SimpleNamespace

    from dev.bench_rows import EncoderRows

    class Rows(EncoderRows):
        args = SimpleNamespace(train_steps=600)

        def __init__(self):
            self.calls, self.fisher = [], {}

        def train(self, mode, name, concept, label="", steps=0, **extra):
            self.calls.append((mode, label or mode, steps or 600, sorted(extra)))
            return "model", "clip", label or mode

        def encoded(self, name, concept):
            self.calls.append(("encode",))
            return "base", "clip+", "encoded"

    rows = Rows()
    out = [r[0] for r in rows.trained_rows(["ico", "ico_quarter", "encoder", "ico_from_encoder"], "badge", None)]
    assert out == ["ico", "ico_quarter", "encoder", "ico_from_encoder_quarter", "ico_from_encoder"]
    assert rows.calls == [("ico", "ico", 600, []), ("ico", "ico_quarter", 150, []), ("encode",),
                          ("ico", "ico_from_encoder_quarter", 150, ["start_concept"]),
                          ("ico", "ico_from_encoder", 600, ["start_concept"])]
    assert rows.fisher == {("encoder", "badge"): (0.0, 0.0)}  # no weight change: not measured
    assert [r[0] for r in Rows().trained_rows(["cd"], "badge", None)] == ["cd"]
