"""The trainer holds the text encoder's half-precision weights in fp32 for a run (``weights_in``), where ComfyUI
would cast them in every layer call (its text encoders load in fp16 on a CPU, with manual-cast layers). The
forward pass gives the very same numbers, the half-precision tensors free their memory meanwhile, and afterwards the CLIP holds its
own weight tensors again, with their exact values."""

from __future__ import annotations

import torch

from dci.comfyui.training.text_encoder import TextEncoder, weights_in
from dci.method import ico


def _encode(text: TextEncoder) -> torch.Tensor:
    rows = text.vocabulary_rows(ico.RARE_TOKEN_WORDS[:2]).detach()
    prefix, dog = text.word_entries("photo of a", "prefix"), text.word_entries("dog", "class noun")
    with torch.inference_mode(False), torch.no_grad():
        return text.encode(text.embed([ico.caption_entries(text.special, text.embed([prefix])[0], rows, dog, [])]))


def test_fp32_weights_for_the_run_give_the_same_output_and_are_put_back(comfy, tiny_checkpoint):
    (model, clip, vae), _ = comfy.run_node("CheckpointLoaderSimple", ckpt_name=tiny_checkpoint.name)
    text = TextEncoder(clip)
    text.prepare()
    module = clip.cond_stage_model
    before = {name: (p, p.dtype) for name, p in module.named_parameters()}
    values = {name: p.detach().clone() for name, p in module.named_parameters()}
    assert any(d == torch.float16 for _, d in before.values()), "the CPU text encoder should load in fp16"
    plain = _encode(text)
    with weights_in(module, torch.float32) as swapped:
        assert swapped > 0
        held = dict(module.named_parameters())
        fc1 = module.clip_l.transformer.text_model.encoder.layers[0].mlp.fc1
        assert fc1.weight.dtype == torch.float32
        assert before["clip_l.transformer.text_model.encoder.layers.0.mlp.fc1.weight"][0].numel() == 0
        embedding = module.clip_l.transformer.text_model.embeddings.token_embedding
        assert embedding.weight is before["clip_l.transformer.text_model.embeddings.token_embedding.weight"][0]
        lever = _encode(text)
    assert torch.equal(plain, lever)
    after = dict(module.named_parameters())
    assert all(after[name] is p and p.dtype == d for name, (p, d) in before.items())
    for name, v in values.items():
        torch.testing.assert_close(after[name], v, rtol=0, atol=0, equal_nan=True)
    assert any(held[name] is not p for name, (p, _) in before.items())


def test_the_weights_are_put_back_when_the_run_fails(comfy, tiny_checkpoint):
    (_, clip, _), _ = comfy.run_node("CheckpointLoaderSimple", ckpt_name=tiny_checkpoint.name)
    module = clip.cond_stage_model
    before = dict(module.named_parameters())
    values = {name: p.detach().clone() for name, p in before.items()}
    try:
        with weights_in(module, torch.float32):
            raise RuntimeError("cancelled")
    except RuntimeError:
        pass
    for name, p in module.named_parameters():  # (a weight a checkpoint lacks may hold NaN: equal as NaN)
        assert p is before[name]
        torch.testing.assert_close(p, values[name], rtol=0, atol=0, equal_nan=True)
