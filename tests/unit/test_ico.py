"""ICO captions in token-embedding space, start-row detaching, image squaring and the seeded step draws."""

from __future__ import annotations

import pytest
import torch

from dci.method import ico

SPECIAL = ico.SpecialTokens(start=1, end=2, pad=0, length=12)
WIDTH = 8


def table() -> torch.nn.Embedding:
    torch.manual_seed(0)
    return torch.nn.Embedding(50, WIDTH)


def test_caption_layout_is_sos_prefix_modifier_class_suffix_eos_pad():
    prefix, modifier, suffix = torch.ones(3, WIDTH), torch.full((2, WIDTH), 2.0), torch.full((1, WIDTH), 3.0)
    entries = ico.caption_entries(SPECIAL, prefix, modifier, [40, 41], suffix)
    assert len(entries) == SPECIAL.length
    assert entries[0] == 1 and entries[9] == 2 and entries[10:] == [0, 0]
    assert [float(e[0]) for e in entries[1:6]] == [1, 1, 1, 2, 2]
    assert entries[6:8] == [40, 41] and float(entries[8][0]) == 3
    # fixed words instead of learned rows (Custom Diffusion) and no suffix
    words = ico.caption_entries(SPECIAL, [30, 31, 32], modifier, [40], [])
    assert words[:4] == [1, 30, 31, 32] and words[6:8] == [40, 2]


def test_too_long_captions_and_empty_class_are_refused():
    with pytest.raises(ico.CaptionError, match="needs 13 tokens"):
        ico.caption_entries(SPECIAL, torch.zeros(8, WIDTH), torch.zeros(2, WIDTH), [40], [])
    with pytest.raises(ico.CaptionError, match="class noun"):
        ico.caption_entries(SPECIAL, [], torch.zeros(1, WIDTH), [], [])


def test_assembly_is_in_token_space_and_differentiable_only_in_learned_rows():
    emb = table().requires_grad_(False)  # the vocabulary is frozen
    prefix = torch.randn(2, WIDTH, requires_grad=True)
    modifier = torch.randn(1, WIDTH, requires_grad=True)
    entries = ico.caption_entries(SPECIAL, prefix, modifier, [40], [])
    x = ico.embed_entries([entries], emb)
    assert x.shape == (1, SPECIAL.length, WIDTH)
    assert torch.equal(x[0, 1:3], prefix) and torch.equal(x[0, 3], modifier[0])
    assert torch.equal(x[0, 4], emb.weight[40]) and torch.equal(x[0, 0], emb.weight[1])
    x.sum().backward()
    assert torch.equal(prefix.grad, torch.ones_like(prefix)) and torch.equal(modifier.grad, torch.ones_like(modifier))
    assert emb.weight.grad is None


def test_position_embeddings_follow_the_slot_after_assembly():
    """The class token gets the position embedding of the slot it lands in, whatever the prefix length."""
    emb, pos = table(), torch.randn(SPECIAL.length, WIDTH)
    modifier = torch.zeros(1, WIDTH)
    for n_prefix in (0, 1, 4):
        entries = ico.caption_entries(SPECIAL, torch.zeros(n_prefix, WIDTH), modifier, [40], [])
        x = ico.add_position_embeddings(ico.embed_entries([entries], emb), pos)[0]
        slot = 1 + n_prefix + 1
        torch.testing.assert_close(x[slot], emb.weight[40] + pos[slot], rtol=0, atol=0)
        torch.testing.assert_close(x[0], emb.weight[1] + pos[0], rtol=0, atol=0)


def test_start_rows_are_detached_in_every_chunk():
    k = torch.randn(2, 154, 4, requires_grad=True)
    out = ico.detach_start_rows(k, 77)
    assert torch.equal(out, k)
    out.sum().backward()
    assert (k.grad[:, [0, 77]] == 0).all()
    assert (k.grad[:, 1:77] == 1).all() and (k.grad[:, 78:] == 1).all()


def test_context_specs_and_initialisation():
    assert ico.parse_context_spec("photo of a") == ico.ContextSpec(words="photo of a")
    assert ico.parse_context_spec(" 4 ") == ico.ContextSpec(length=4)
    assert ico.parse_context_spec("") == ico.ContextSpec()
    with pytest.raises(ico.CaptionError):
        ico.parse_context_spec("99")
    rows = torch.randn(3, WIDTH)
    ctx = ico.init_contexts(5, WIDTH, rows)
    assert ctx.shape == (5, 3, WIDTH) and all(torch.equal(c, rows) for c in ctx)
    rnd = ico.init_contexts(64, 256, length=4, generator=torch.Generator().manual_seed(0))
    assert rnd.shape == (64, 4, 256) and abs(rnd.std().item() - 0.02) < 0.001


def test_square_images_centre_crop_and_resize():
    img = torch.zeros(2, 40, 80, 3)
    img[:, :, 20:60] = 1.0  # the centre square is white, the sides black
    out = ico.square_images(img, 16)
    assert out.shape == (2, 16, 16, 3)
    assert torch.allclose(out, torch.ones_like(out))
    assert ico.square_images(torch.rand(1, 32, 32, 4), 32).shape == (1, 32, 32, 3)


def test_step_draws_depend_only_on_seed_and_step_and_cover_every_image():
    a = ico.draw_step(7, 3, 2, 5, 4, 1000, True)
    b = ico.draw_step(7, 3, 2, 5, 4, 1000, True)
    assert a.concept == b.concept and a.reg == b.reg and torch.equal(a.timesteps, b.timesteps)
    assert torch.equal(torch.randn(3, generator=a.generator), torch.randn(3, generator=b.generator))
    assert ico.draw_step(8, 3, 2, 5, 4, 1000, True).timesteps.tolist() != a.timesteps.tolist()
    seen = [i for step in range(5) for i in ico.draw_step(0, step, 2, 5, 0, 1000, False).concept]
    assert sorted(seen) == sorted(list(range(5)) * 2)  # two epochs, each image twice
    assert all(0 <= t < 1000 for t in a.timesteps.tolist())


def test_effective_learning_rates():
    assert ico.effective_learning_rates(1e-5, 6, 10.0) == pytest.approx((6e-5, 6e-4))
    with pytest.raises(ValueError):
        ico.effective_learning_rates(0.0, 1, 10.0)
