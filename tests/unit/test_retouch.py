"""Layout-and-Retouch's maths (dci.method.retouch): two-source attention, the mask rule, trajectories, inversion."""

from __future__ import annotations

import pytest
import torch

from dci.method.retouch import (
    RetouchError,
    RetouchSettings,
    Trajectory,
    invert,
    mask_tokens,
    sample_euler,
    subject_attention,
    subject_mask,
    switch_step,
    two_source_attention,
)

HEADS = 2


def attend(q, k, v):
    b, t, inner = q.shape
    d = inner // HEADS
    qh, kh, vh = (x.reshape(b, -1, HEADS, d).transpose(1, 2) for x in (q, k, v))
    p = torch.softmax(qh @ kh.transpose(-1, -2) * d ** -0.5, dim=-1)
    return (p @ vh).transpose(1, 2).reshape(b, t, inner)


def qkv(seed, b=2, t=16, inner=8):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, t, inner, generator=g) for _ in range(3)]


def test_mask_of_ones_and_no_context_is_plain_attention_over_the_reference():
    q, k, v = qkv(0)
    _, kr, vr = qkv(1)
    ones = torch.ones(2, 16)
    expected = attend(q, kr, vr)
    assert torch.equal(two_source_attention(q, kr, vr, None, None, ones, attend), expected)
    _, kc, vc = qkv(2)
    assert torch.equal(two_source_attention(q, kr, vr, kc, vc, ones, attend), expected)


def test_identical_sources_are_ordinary_self_attention():
    q, k, v = qkv(3)
    mask = (torch.rand(2, 16, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    assert torch.allclose(two_source_attention(q, k, v, k, v, mask, attend), attend(q, k, v), atol=1e-6)


def test_pixels_inside_the_mask_take_the_reference_and_outside_the_context():
    q, _, _ = qkv(4)
    _, kr, vr = qkv(5)
    _, kc, vc = qkv(6)
    mask = torch.zeros(2, 16)
    mask[0, :5] = 1
    mask[1, 10:] = 1
    out = two_source_attention(q, kr, vr, kc, vc, mask, attend)
    ref, ctx = attend(q, kr, vr), attend(q, kc, vc)
    inside = mask.bool()
    assert torch.equal(out[inside], ref[inside]) and torch.equal(out[~inside], ctx[~inside])


def test_rows_stay_separate():
    """Each image row only ever sees its own sources: changing row 1's sources leaves row 0 untouched."""
    q, _, _ = qkv(7)
    _, kr, vr = qkv(8)
    _, kc, vc = qkv(9)
    mask = torch.zeros(2, 16)
    mask[:, 3:9] = 1
    a = two_source_attention(q, kr, vr, kc, vc, mask, attend)
    kr2, kc2 = kr.clone(), kc.clone()
    kr2[1] += 5
    kc2[1] -= 3
    b = two_source_attention(q, kr2, vr, kc2, vc, mask, attend)
    assert torch.equal(a[0], b[0]) and not torch.equal(a[1], b[1])


def test_no_mask_yet_means_the_context_everywhere():
    q, _, _ = qkv(10)
    _, kr, vr = qkv(11)
    _, kc, vc = qkv(12)
    assert torch.equal(two_source_attention(q, kr, vr, kc, vc, None, attend), attend(q, kc, vc))


def test_subject_mask_thresholds_each_map_at_a_share_of_its_maximum():
    maps = torch.zeros(3, 4, 4)
    maps[0, 1, 1], maps[0, 2, 2], maps[0, 0, 0] = 2.0, 1.0, 0.5  # 1.0 is half the peak, 0.5 a quarter
    maps[1] = 7.0  # flat: everything is the peak
    # maps[2] stays zero: no subject found
    m = subject_mask(maps, 0.5)
    assert m[0].sum() == 2 and m[0, 1, 1] == 1 and m[0, 2, 2] == 1 and m[0, 0, 0] == 0
    assert m[1].sum() == 16 and m[2].sum() == 0
    assert subject_mask(maps, 0.2)[0].sum() == 3
    assert subject_mask(maps * 10, 0.5).equal(m)  # only the shape of the map counts, not its scale


def test_mask_tokens_at_a_coarser_layer():
    mask = torch.zeros(1, 8, 8)
    mask[0, :4, :4] = 1  # the top-left quarter
    small = mask_tokens(mask, 2, 2)
    assert small.tolist() == [[1.0, 0.0, 0.0, 0.0]]
    assert mask_tokens(mask, 8, 8).sum() == 16


def test_subject_attention_sums_the_subject_tokens():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 6, 8, generator=g), torch.randn(1, 5, 8, generator=g)
    every = subject_attention(q, k, HEADS, torch.ones(5, dtype=torch.bool))
    assert torch.allclose(every, torch.ones(1, 6))
    one = subject_attention(q, k, HEADS, torch.tensor([False, True, False, False, False]))
    assert ((one > 0) & (one < 1)).all()


def test_trajectory_lookup_is_exact_at_stored_sigmas_and_linear_between():
    sigmas = torch.tensor([10.0, 5.0, 1.0, 0.0], dtype=torch.float64)
    latents = torch.arange(4, dtype=torch.float32).reshape(4, 1, 1, 1, 1).expand(4, 1, 1, 2, 2).clone()
    t = Trajectory(sigmas, latents, "sd1", "test")
    assert t.at(5.0).flatten().tolist() == [1.0] * 4
    assert t.at(3.0).flatten().tolist() == [1.5] * 4
    assert t.at(0.0).flatten().tolist() == [3.0] * 4
    assert t.at(11.0) is None
    with pytest.raises(RetouchError, match="decrease"):
        Trajectory(sigmas.flip(0), latents, "sd1", "test")


def test_switch_step_and_settings_reject_what_is_out_of_range():
    assert switch_step(0.0, 20) == 0 and switch_step(0.25, 20) == 5 and switch_step(1.0, 7) == 7
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(RetouchError, match="switch"):
            switch_step(bad, 20)
    with pytest.raises(RetouchError, match="window"):
        RetouchSettings(start=0.6, end=0.5)
    with pytest.raises(RetouchError, match="threshold"):
        RetouchSettings(threshold=0.0)


def test_inversion_with_refinement_inverts_euler_sampling_of_a_smooth_denoiser():
    """A denoiser that pulls towards a point: inversion then Euler sampling returns the start within 1e-5."""
    target = torch.full((1, 4, 2, 2), 0.3)

    def denoise(x, sigma):
        return target + (x - target) / (1.0 + sigma ** 2)

    latent = torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    sigmas = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5, 0.0], dtype=torch.float64)
    plain = invert(latent, sigmas, denoise, refine=0)
    refined = invert(latent, sigmas, denoise, refine=20)
    assert plain.shape == (6, 1, 4, 2, 2) and torch.equal(refined[-1], latent)
    err_plain = (sample_euler(plain[0], sigmas, denoise) - latent).abs().max()
    err_refined = (sample_euler(refined[0], sigmas, denoise) - latent).abs().max()
    assert err_refined < 1e-5 < err_plain
