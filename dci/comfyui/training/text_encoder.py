"""The text encoders run from assembled token embeddings, with gradients: the trainer's CLIP forward pass.

ICO captions are assembled in token-embedding space (``ico.caption_entries``), so the trainer can't go through
``CLIP.encode_from_tokens``; it runs the same modules itself. ComfyUI's CLIP layers add their residuals in place,
which autograd can't differentiate, so ``text_forward`` is ``CLIPTextModel_.forward`` and
``SDClipModel.forward`` step by step with out-of-place additions; a test checks that it reproduces
CLIPTextEncode exactly.

``TextEncoders`` is the text side of a run for every trainable family: one encoder (SD1.x clip_l, SD2.x
clip_h) or SDXL's two, whose outputs are concatenated (clip_l first) into the cross-attention context as
``SDXLClipModel.encode_token_weights`` does, with clip_g's projected pooled output (the final-norm row of the
first end token, as ``SDClipModel`` counts it) for the model's ADM input.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from comfy.ldm.modules.attention import optimized_attention_for_device
from comfy.ops import cast_to

from ...method import ico
from .. import seams
from ..tokenizer import base_tokenizer
from .settings import TrainingError


def _layer(layer, x, mask, attention):
    x = x + layer.self_attn(layer.layer_norm1(x), mask, attention)
    return x + layer.mlp(layer.layer_norm2(x))


def text_forward(module, embeds: torch.Tensor, eos: list[int] | None = None, checkpointing: bool = False):
    """``[B, 77, width]`` input embeddings → the output ``module`` (a ComfyUI ``SDClipModel``) gives for them.

    The output layer follows the module's own options (last layer, or a hidden layer with or without the final
    norm), as CLIPTextEncode would use them; layers after it run only when the pooled output needs them. With
    ``eos`` (each row's first end-token position) it returns ``(output, pooled)``, the pooled output as
    ``SDClipModel`` gives it (projected when the module says so). ``checkpointing``: each layer is recomputed
    in the backward pass instead of keeping its activations and its cast weights.
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
        if checkpointing and torch.is_grad_enabled():
            x = torch.utils.checkpoint.checkpoint(_layer, layer, x, mask, attention, use_reentrant=False)
        else:
            x = _layer(layer, x, mask, attention)
        if i == wanted:
            hidden = x
            if eos is None and module.layer != "last":
                break
    if module.layer == "last":
        out = tm.final_layer_norm(x).float()
    else:
        out = (tm.final_layer_norm(hidden) if module.layer_norm_hidden_state else hidden).float()
    if eos is None:
        return out
    x = tm.final_layer_norm(x)
    pooled = x[torch.arange(x.shape[0], device=x.device), torch.tensor(eos, device=x.device)]
    if module.return_projected_pooled:
        pooled = module.transformer.text_projection(pooled)
    return out, pooled.float()


class TextEncoder:
    """One CLIP text encoder of a CLIP object: the single one of SD1.x (CLIP-L) or SD2.x (OpenCLIP-H) when
    ``key`` is not given, or the one named ``key`` (SDXL's clip_l and clip_g)."""

    def __init__(self, clip, key: str | None = None):
        subs = seams.encoder_tokenizers(base_tokenizer(clip))
        if key is None and len(subs) != 1:
            raise TrainingError(f"this CLIP has the text encoders {', '.join(sorted(subs)) or 'none'}; expected "
                                "the single-encoder CLIP of SD1.x or SD2.x")
        if key is not None and key not in subs:
            raise TrainingError(f"this CLIP has no {key} text encoder")
        self.clip = clip
        self.key = key or next(iter(subs))  # "clip_l" / "clip_g" / "clip_h"
        self.sub = subs[self.key]  # its SDTokenizer
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
        self.check_options()

    def check_options(self) -> None:
        m = self.module
        if m.enable_attention_masks or m.zero_out_masked or isinstance(m.layer, list) or m.layer == "all":
            raise TrainingError("this CLIP uses text-encoder options (attention masks or several output layers) "
                                "that the trainer does not reproduce")

    def encode(self, embeds: torch.Tensor) -> torch.Tensor:
        """``[B, 77, width]`` input embeddings → the conditioning CLIPTextEncode would give for them."""
        return text_forward(self.module, embeds)


ORDER = ("clip_l", "clip_g", "clip_h")  # the order SDXLClipModel concatenates its encoders' outputs in
POOLED_FROM = "clip_g"  # the encoder whose pooled output SDXL's ADM input takes (SDXLClipModel's g_pooled)


class TextEncoders:
    """All text encoders of a trainable CLIP (SD1.x/SD2.x: one; SDXL: clip_l and clip_g), run together.

    Captions are given per encoder (``{key: [entries, ...]}``): the encoders share their BPE vocabulary but not
    their special tokens (SDXL's clip_g pads with id 0) nor their embedding widths.
    """

    def __init__(self, clip):
        subs = seams.encoder_tokenizers(base_tokenizer(clip))
        keys = [k for k in ORDER if k in subs]
        if not keys or len(keys) != len(subs) or len(keys) > 2 or (len(keys) == 2 and keys != ["clip_l", "clip_g"]):
            raise TrainingError(f"this CLIP has the text encoders {', '.join(sorted(subs)) or 'none'}; training "
                                "supports the CLIPs of SD1.x (clip_l), SD2.x (clip_h) and SDXL (clip_l + clip_g)")
        self.clip = clip
        self.parts = [TextEncoder(clip, k) for k in keys]
        self.by_key = {p.key: p for p in self.parts}
        self.keys = tuple(keys)
        self.primary = self.parts[0]
        if len({p.special.length for p in self.parts}) != 1:
            raise TrainingError("the text encoders of this CLIP take captions of different lengths")
        self.length = self.primary.special.length
        self.pooled_key = POOLED_FROM if POOLED_FROM in self.by_key else None
        self.checkpointing = False  # recompute the layers in the backward pass (the run's gradient checkpointing)

    def word_entries(self, text: str, what: str) -> dict[str, list]:
        return {p.key: p.word_entries(text, what) for p in self.parts}

    def vocabulary_rows(self, words: tuple[str, ...]) -> dict[str, torch.Tensor]:
        return {p.key: p.vocabulary_rows(words) for p in self.parts}

    def is_vocabulary_word(self, word: str) -> bool:
        return self.primary.is_vocabulary_word(word)

    def prepare(self) -> None:
        self.primary.prepare()
        for p in self.parts:
            p.check_options()

    def encode(self, captions: dict[str, list]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Captions per encoder → (the context CLIPTextEncode would give, the pooled output SDXL conditions on;
        None for the single-encoder families, whose models take no pooled output)."""
        outs, pooled = [], None
        for p in self.parts:
            embeds = p.embed(captions[p.key])
            if p.key == self.pooled_key:
                out, pooled = text_forward(p.module, embeds, [first_end(e, p.special.end) for e in captions[p.key]],
                                           self.checkpointing)
            else:
                out = text_forward(p.module, embeds, checkpointing=self.checkpointing)
            outs.append(out)
        return (outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)), pooled


@contextmanager
def weights_in(module: torch.nn.Module, dtype: torch.dtype):
    """For a training run: hold the half-precision weights of ``module``'s layers that ComfyUI casts on every
    call (``comfy.ops`` manual-cast layers, as its text encoders load on a CPU) in ``dtype`` once, instead of
    casting them in every layer of every forward pass (and keeping the casts for the backward pass). The
    values are the casts' values, so outputs are unchanged. The half-precision tensors give up their memory
    for the run and get their exact values back afterwards (half → fp32 → half is lossless), in the very same
    parameter objects, also when the run fails. Embeddings stay as they are (a lookup casts only the rows it
    reads). Yields how many tensors it swapped."""
    swapped = []
    try:
        for sub in module.modules():
            if (not getattr(sub, "comfy_cast_weights", False) or isinstance(sub, torch.nn.Embedding)
                    or getattr(sub, "weight_function", None) or getattr(sub, "bias_function", None)):
                continue
            for name in ("weight", "bias"):
                p = getattr(sub, name, None)
                if isinstance(p, torch.nn.Parameter) and p.dtype in (torch.float16, torch.bfloat16) and p.dtype != dtype:
                    held = torch.nn.Parameter(p.detach().to(dtype), requires_grad=False)
                    setattr(sub, name, held)
                    swapped.append((sub, name, p, held))
                    p.data = torch.empty(0, dtype=p.dtype, device=p.device)
        yield len(swapped)
    finally:
        for sub, name, p, held in reversed(swapped):
            p.data = held.detach().to(p.dtype)
            setattr(sub, name, p)


def first_end(entries, end: int) -> int:
    """The position of the first end token of a caption (the row ``SDClipModel`` pools)."""
    return next(i for i, e in enumerate(entries) if not isinstance(e, torch.Tensor) and e == end)
