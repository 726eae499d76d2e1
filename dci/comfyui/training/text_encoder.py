"""The text encoder run from assembled token embeddings, with gradients: the trainer's CLIP forward pass.

ICO captions are assembled in token-embedding space (``ico.caption_entries``), so the trainer can't go through
``CLIP.encode_from_tokens``; it runs the same modules itself. ComfyUI's CLIP layers add their residuals in place,
which autograd can't differentiate, so ``text_forward`` is ``CLIPTextModel_.forward`` and
``SDClipModel.forward`` step by step with out-of-place additions; a test checks that it reproduces
CLIPTextEncode exactly.
"""

from __future__ import annotations

import torch
from comfy.ldm.modules.attention import optimized_attention_for_device
from comfy.ops import cast_to

from ...method import ico
from .. import seams
from ..tokenizer import base_tokenizer
from .settings import TrainingError


def text_forward(module, embeds: torch.Tensor) -> torch.Tensor:
    """``[B, 77, width]`` input embeddings → the output ``module`` (a ComfyUI ``SDClipModel``) gives for them.

    The output layer follows the module's own options (last layer, or a hidden layer with or without the final
    norm), as CLIPTextEncode would use them.
    """
    tm = module.transformer.text_model
    x = embeds + cast_to(tm.embeddings.position_embedding.weight, dtype=torch.float32, device=embeds.device)
    mask = torch.full((x.shape[1], x.shape[1]), -torch.finfo(x.dtype).max, dtype=x.dtype,
                      device=x.device).triu_(1)
    attention = optimized_attention_for_device(x.device, mask=True, small_input=True)
    layers = tm.encoder.layers
    wanted = module.layer_idx if module.layer == "hidden" else None
    if wanted is not None and wanted < 0:
        wanted = len(layers) + wanted
    hidden = None
    for i, layer in enumerate(layers):
        x = x + layer.self_attn(layer.layer_norm1(x), mask, attention)
        x = x + layer.mlp(layer.layer_norm2(x))
        if i == wanted:
            hidden = x
    x = tm.final_layer_norm(x)
    if module.layer == "last":
        return x.float()
    return (tm.final_layer_norm(hidden) if module.layer_norm_hidden_state else hidden).float()


class TextEncoder:
    """The single CLIP text encoder of an SD1.x (CLIP-L) or SD2.x (OpenCLIP-H) CLIP object."""

    def __init__(self, clip):
        subs = seams.encoder_tokenizers(base_tokenizer(clip))
        if len(subs) != 1:
            raise TrainingError(f"this CLIP has the text encoders {', '.join(sorted(subs)) or 'none'}; training "
                                "supports the single-encoder CLIPs of SD1.x and SD2.x")
        self.clip = clip
        self.key, self.sub = next(iter(subs.items()))  # "clip_l" / "clip_h" and its SDTokenizer
        self.name = self.key.removeprefix("clip_")  # the key of clip.tokenize()'s result
        self.module = getattr(clip.cond_stage_model, self.key, None)
        if self.module is None or not hasattr(self.module, "transformer"):
            raise TrainingError(f"this CLIP has no {self.key} text model this trainer can run")
        self.special = ico.SpecialTokens(self.sub.start_token, self.sub.end_token, self.sub.pad_token,
                                         self.sub.max_length)
        self.embedding = self.module.transformer.get_input_embeddings()
        self.width = self.embedding.weight.shape[1]

    def word_entries(self, text: str, what: str) -> list:
        """The caption entries of ``text`` as CLIPTextEncode tokenizes it (ids; vectors of loaded concepts)."""
        chunks = self.clip.tokenize(text, return_word_ids=True)[self.name]
        entries = [tok[0] for chunk in chunks for tok in chunk if tok[2] != 0]
        if len(chunks) > 1:
            raise TrainingError(f"the {what} {text!r} is too long for one caption")
        return entries

    def single_token_ids(self, text: str) -> list[int]:
        """The vocabulary ids ``text`` tokenizes to on its own (no start or end token)."""
        return self.sub.tokenizer(text)["input_ids"][self.sub.tokens_start:-1]

    def is_vocabulary_word(self, word: str) -> bool:
        """True when ``word`` is one whole word of the encoder's vocabulary."""
        ids = self.single_token_ids(word)
        return len(ids) == 1 and self.sub.inv_vocab.get(ids[0], "").endswith("</w>")

    def vocabulary_rows(self, words: tuple[str, ...]) -> torch.Tensor:
        """Rows of the vocabulary for single-token words (the starting points of the modifier tokens)."""
        ids = []
        for w in words:
            toks = self.single_token_ids(w)
            if len(toks) != 1:
                raise TrainingError(f"the starting word {w!r} of a modifier token is not a single token here")
            ids.append(toks[0])
        return self.embed([[i] for i in ids])[:, 0]

    def embed(self, entries_batch) -> torch.Tensor:
        device = self.embedding.weight.device
        return ico.embed_entries(entries_batch, lambda ids: self.embedding(ids, out_dtype=torch.float32), device)

    def prepare(self) -> None:
        """Load the encoder and set its output layer the way ``CLIP.encode_from_tokens`` does."""
        self.clip.cond_stage_model.reset_clip_options()
        if self.clip.layer_idx is not None:
            self.clip.cond_stage_model.set_clip_options({"layer": self.clip.layer_idx})
        self.clip.load_model()
        m = self.module
        if m.enable_attention_masks or m.zero_out_masked or isinstance(m.layer, list) or m.layer == "all":
            raise TrainingError("this CLIP uses text-encoder options (attention masks or several output layers) "
                                "that the trainer does not reproduce")

    def encode(self, embeds: torch.Tensor) -> torch.Tensor:
        """``[B, 77, width]`` input embeddings → the conditioning CLIPTextEncode would give for them."""
        return text_forward(self.module, embeds)
