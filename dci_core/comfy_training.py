"""ICO / Custom Diffusion training inside the ComfyUI process: the one module that trains on ComfyUI objects.

What trains: a delta for every attn2 ``to_k``/``to_v`` weight of the UNet (found with
``comfy_model.cross_attention_layers``), the k modifier-token rows, and (ICO) the per-image contexts. Nothing
else gets a gradient, and nothing of the input MODEL, CLIP or VAE is modified.

How it is wired into ComfyUI:

* **One UNet.** A *clone* of the MODEL's ModelPatcher gets a weight wrapper per K/V weight
  (``add_weight_wrapper``, the mechanism ComfyUI's own LoRA trainer uses): when ComfyUI casts the weight for
  a forward pass it adds the small trainable delta. The UNet's modules are shared with the input MODEL,
  never copied; the wrappers live in the clone's patch list and are removed when the clone is unloaded.
* **Start token detached.** The clone also gets an attn2 replace patch per layer that detaches the
  start-of-text rows of the projected keys and values before the usual attention (chaining to a replace
  patch the input MODEL may already carry), so those rows give the K/V deltas no gradient.
* **Loss in the model's own terms.** Latents are noised with the model's ``model_sampling`` at uniformly
  drawn timesteps and go through ``BaseModel.apply_model`` (so patches, wrappers and dtype handling are
  ComfyUI's); the raw UNet output is taken with a diffusion-model wrapper and compared with its target
  (the noise for ε-prediction, v for v-prediction).
* **Text encoder from embeddings.** Captions are assembled in token-embedding space (``ico``) and run
  through the CLIP text model's own layers. ComfyUI's CLIP layers add residuals in place, which autograd
  can't differentiate, so ``TextEncoder.encode`` runs the same modules with out-of-place additions; a test
  checks it reproduces ``CLIPTextEncode`` exactly.
* **Inference mode.** ComfyUI runs nodes under ``torch.inference_mode``; weights loaded there are inference
  tensors, which autograd refuses to save. Training runs under ``inference_mode(False)``, cached latents and
  conditionings are cloned, and weights that are inference tensors are swapped, value for value, for
  ordinary tensors (no second copy is kept; sampling results are unchanged).

Resume: the concept file holds the trained tensors in fp32; a sidecar ``<name>.train-state.safetensors``
holds the AdamW moments, the step, the loss history and the loss-scaler state. All randomness of step s is
drawn from a generator seeded by (seed, s), so a resumed run continues bit for bit.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import comfy_concept, comfy_model, ico
from .concept_format import (
    SUFFIX,
    TRAIN_STATE_SUFFIX,
    Concept,
    ConceptFileError,
    check_trigger,
    load_concept,
    sanitize_name,
    save_concept,
)

log = logging.getLogger(__name__)

TRAINABLE_FAMILIES = ("sd1", "sd2")
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
WRAPPER_KEY = "dci_train_concept"
STATE_FORMAT = "dci-train-state"
WEIGHT_DECAY = 1e-2  # AdamW's default, applied to the trained tensors only (the deltas: a pull towards the base)
LIMITS = {"steps": (1, 100_000), "batch_size": (1, 64), "num_tokens": (1, ico.MAX_MODIFIER_TOKENS),
          "resolution": (64, 2048), "checkpoint_every": (0, 100_000)}


class TrainingError(ValueError):
    """Training can't start or can't go on; the message says why and what to change."""


@dataclass
class TrainSettings:
    """Everything that decides what a run computes (``resume_key``) plus how it reports and saves."""

    class_noun: str
    trigger: str
    num_tokens: int = 2
    mode: str = "ico"
    prefix: str = "photo of a"
    suffix: str = "."
    steps: int = 500
    batch_size: int = 1
    learning_rate: float = 1e-5
    context_lr_multiplier: float = 10.0
    resolution: int = 512
    seed: int = 0
    precision: str = "fp32"
    random_flip: bool = True
    gradient_checkpointing: bool = False
    checkpoint_every: int = 100
    reg_captions: list[str] = field(default_factory=list)

    def resume_key(self) -> dict:
        """Settings a resumed run must share with the run it continues (steps may grow)."""
        d = asdict(self)
        for k in ("steps", "gradient_checkpointing", "checkpoint_every"):
            d.pop(k)
        return d

    def check(self) -> None:
        for name, (lo, hi) in LIMITS.items():
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
                raise TrainingError(f"{name} must be a whole number from {lo} to {hi}, got {value!r}")
        if self.resolution % 64:
            raise TrainingError(f"resolution must be a multiple of 64, got {self.resolution}")
        if self.mode not in ico.MODES:
            raise TrainingError(f"mode must be one of {', '.join(ico.MODES)}, got {self.mode!r}")
        if self.precision not in PRECISIONS:
            raise TrainingError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        for name, hi in (("learning_rate", 1e-2), ("context_lr_multiplier", 1000.0)):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or not 0 < value <= hi:
                raise TrainingError(f"{name} must be a number above 0 and at most {hi}, got {value!r}")
        if not self.class_noun.strip():
            raise TrainingError("the class noun is empty: name what the concept is, e.g. 'dog' or 'mug'")
        try:
            check_trigger(self.trigger)
        except ConceptFileError as e:
            raise TrainingError(str(e)) from None


@dataclass
class TrainResult:
    path: Path
    concept: Concept
    losses: list[float]
    steps_done: int
    warnings: list[str]


# -- the text encoder, run from assembled embeddings -------------------------------------------------------------
class TextEncoder:
    """The single CLIP text encoder of an SD1.x (CLIP-L) or SD2.x (OpenCLIP-H) CLIP object."""

    def __init__(self, clip):
        tokenizer = clip.tokenizer.base if isinstance(clip.tokenizer, comfy_concept.ConceptTokenizer) else clip.tokenizer
        subs = comfy_concept._encoder_tokenizers(tokenizer)
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

    def vocabulary_rows(self, words: tuple[str, ...]) -> torch.Tensor:
        """Rows of the vocabulary for single-token words (the starting points of the modifier tokens)."""
        ids = []
        for w in words:
            toks = self.sub.tokenizer(w)["input_ids"][self.sub.tokens_start:-1]
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
        """``[B, 77, width]`` input embeddings → the conditioning CLIPTextEncode would give for them.

        ComfyUI's ``CLIPTextModel_.forward`` and ``SDClipModel.forward`` step by step, with out-of-place
        residual additions so that autograd can differentiate it.
        """
        from comfy.ldm.modules.attention import optimized_attention_for_device
        from comfy.ops import cast_to

        m = self.module
        tm = m.transformer.text_model
        x = embeds + cast_to(tm.embeddings.position_embedding.weight, dtype=torch.float32, device=embeds.device)
        mask = torch.full((x.shape[1], x.shape[1]), -torch.finfo(x.dtype).max, dtype=x.dtype,
                          device=x.device).triu_(1)
        attention = optimized_attention_for_device(x.device, mask=True, small_input=True)
        layers = tm.encoder.layers
        wanted = m.layer_idx if m.layer == "hidden" else None
        if wanted is not None and wanted < 0:
            wanted = len(layers) + wanted
        hidden = None
        for i, layer in enumerate(layers):
            x = x + layer.self_attn(layer.layer_norm1(x), mask, attention)
            x = x + layer.mlp(layer.layer_norm2(x))
            if i == wanted:
                hidden = x
        x = tm.final_layer_norm(x)
        if m.layer == "last":
            return x.float()
        return (tm.final_layer_norm(hidden) if m.layer_norm_hidden_state else hidden).float()


# -- the UNet patch ------------------------------------------------------------------------------------------
class _AddDelta:
    """Weight wrapper: the cast K/V weight plus its trainable delta."""

    def __init__(self, delta: torch.Tensor):
        self.delta = delta

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.delta.to(weight.dtype)


class _StartRowsDetached:
    """attn2 replace patch: detach the start-token rows of K and V, then attend as ComfyUI would."""

    def __init__(self, chunk: int, previous=None):
        self.chunk = chunk
        self.previous = previous

    def __call__(self, q, k, v, extra_options):
        k = ico.detach_start_rows(k, self.chunk)
        v = ico.detach_start_rows(v, self.chunk)
        if self.previous is not None:
            return self.previous(q, k, v, extra_options)
        from comfy.ldm.modules import attention

        return attention.optimized_attention(q, k, v, extra_options["n_heads"],
                                             attn_precision=extra_options.get("attn_precision"),
                                             transformer_options=extra_options)


def training_patcher(model, deltas: dict[str, torch.Tensor], chunk: int):
    """A clone of ``model`` whose K/V weights carry ``deltas`` and whose attn2 layers detach start rows."""
    patcher = model.clone()
    replaced = model.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})
    for layer in comfy_model.cross_attention_layers(model):
        for proj in ("to_k", "to_v"):
            key = f"{layer.weight_prefix}{proj}.weight"
            patcher.add_weight_wrapper(key, _AddDelta(deltas[key]))
        previous = replaced.get(layer.patch_key) or replaced.get(layer.patch_key[:2])
        patcher.set_model_attn2_replace(_StartRowsDetached(chunk, previous), *layer.patch_key)
    return patcher


def _unload(patcher) -> None:
    """Unload the training clone and take its weight wrappers off the shared modules."""
    import comfy.model_management as mm

    for i in range(len(mm.current_loaded_models) - 1, -1, -1):
        if mm.current_loaded_models[i].model is patcher:
            mm.current_loaded_models.pop(i).model_unload()
    ours = {id(f) for fs in patcher.weight_wrapper_patches.values() for f in fs}
    for module in patcher.model.modules():
        fs = getattr(module, "weight_function", None)
        if fs and any(id(f) in ours for f in fs):
            module.weight_function = [f for f in fs if id(f) not in ours]


def _autograd_safe(module: torch.nn.Module) -> None:
    """Swap inference-mode parameters and buffers for equal ordinary tensors (one at a time, no copy kept)."""
    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is not None and p.is_inference():
                sub._parameters[name] = torch.nn.Parameter(p.clone(), requires_grad=False)
        for name, b in list(sub._buffers.items()):
            if b is not None and b.is_inference():
                sub._buffers[name] = b.clone()


@contextmanager
def _gradient_checkpointing(diffusion_model: torch.nn.Module, enabled: bool):
    """Recompute each res block and transformer in the backward pass instead of keeping its activations."""
    if not enabled:
        yield
        return
    from comfy.ldm.modules.attention import SpatialTransformer
    from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock

    patched = []

    def checkpointed(forward):
        def run(*args, **kwargs):
            # the UNet mutates one transformer_options dict as it goes; the recomputation must see this call's
            args = tuple(dict(a) if isinstance(a, dict) else a for a in args)
            kwargs = {k: dict(v) if isinstance(v, dict) else v for k, v in kwargs.items()}
            return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)
        return run

    try:
        for m in diffusion_model.modules():
            if isinstance(m, (ResBlock, SpatialTransformer)) and "forward" not in vars(m):
                m.forward = checkpointed(m.forward)
                patched.append(m)
        yield
    finally:
        for m in patched:
            del m.forward


# -- files ----------------------------------------------------------------------------------------------------
def state_path(concept_path: Path) -> Path:
    return concept_path.with_name(concept_path.name[: -len(SUFFIX)] + TRAIN_STATE_SUFFIX)


def _atomic_save(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: Path) -> None:
    from safetensors.torch import save_file

    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@dataclass
class _State:
    step: int
    losses: list[float]
    optimizer: dict  # torch optimizer state_dict()["state"]
    scaler: dict
    settings: dict
    images: str


def _load_state(path: Path, names: list[str]) -> _State:
    from safetensors import safe_open

    if not path.is_file():
        raise TrainingError(f"nothing to resume: {path.name} (the training state written beside the concept) "
                            "is missing; train from the start instead")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if meta.get("format") != STATE_FORMAT:
        raise TrainingError(f"{path.name} is not a training state file")
    if json.loads(meta["parameters"]) != names:
        raise TrainingError(f"{path.name} belongs to a run with other trained tensors; it can't be resumed here")
    optimizer = {}
    for i in range(len(names)):
        if f"adam.{i}.step" in tensors:
            optimizer[i] = {k: tensors[f"adam.{i}.{k}"] for k in ("step", "exp_avg", "exp_avg_sq")}
    return _State(int(meta["step"]), tensors["losses"].tolist(), optimizer, json.loads(meta.get("scaler", "{}")),
                  json.loads(meta["settings"]), meta["images"])


def _save_state(path: Path, state: _State, names: list[str]) -> None:
    tensors = {"losses": torch.tensor(state.losses, dtype=torch.float32)}
    for i, s in state.optimizer.items():
        for k in ("step", "exp_avg", "exp_avg_sq"):
            tensors[f"adam.{i}.{k}"] = torch.as_tensor(s[k])
    meta = {"format": STATE_FORMAT, "step": str(state.step), "parameters": json.dumps(names),
            "scaler": json.dumps(state.scaler), "settings": json.dumps(state.settings, sort_keys=True),
            "images": state.images}
    _atomic_save(tensors, meta, path)


# -- the run --------------------------------------------------------------------------------------------------
@dataclass
class _Plan:
    """Everything checked and resolved before any compute."""

    family: str
    text: TextEncoder
    class_entries: list
    prefix: ico.ContextSpec
    suffix: ico.ContextSpec
    prefix_entries: list
    suffix_entries: list
    path: Path
    resume: bool
    warnings: list[str]


def plan_training(model, clip, images, settings: TrainSettings, folder: Path, name: str, overwrite: bool,
                  resume: bool, reg_images=None) -> _Plan:
    """Validate everything that can be validated without computing; raises TrainingError."""
    settings.check()
    try:
        family = comfy_model.model_family(model)
    except comfy_model.UnsupportedModelError as e:
        raise TrainingError(str(e)) from None
    if family not in TRAINABLE_FAMILIES:
        raise TrainingError(f"training {comfy_model.FAMILY_LABEL[family]} concepts is not yet supported; use an "
                            "SD1.x or SD2.x checkpoint")
    _prediction_kind(model)
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[0] < 1:
        raise TrainingError("no concept images: connect an IMAGE batch with at least one image")
    if images.shape[-1] not in (3, 4) or not torch.isfinite(images).all():
        raise TrainingError(f"the concept images must be a finite IMAGE batch [B, H, W, 3], got {tuple(images.shape)}")
    if reg_images is not None:
        if not isinstance(reg_images, torch.Tensor) or reg_images.dim() != 4 or reg_images.shape[0] < 1:
            raise TrainingError("the regularisation images input is connected but holds no images")
        if len(settings.reg_captions) not in (1, reg_images.shape[0]):
            raise TrainingError(f"{reg_images.shape[0]} regularisation images need one caption for all or one per "
                                f"image (one per line); got {len(settings.reg_captions)}")
    elif settings.reg_captions and any(c.strip() for c in settings.reg_captions):
        log.warning("regularisation captions are given but no regularisation images; the captions are ignored")

    text = TextEncoder(clip)
    warnings = []
    trigger = settings.trigger
    if trigger.lower() in (w.lower() for w in comfy_concept.existing_triggers(clip)):
        raise TrainingError(f"the trigger word {trigger!r} is already used by another concept loaded on this CLIP; "
                            "choose another one")
    ids = text.sub.tokenizer(trigger)["input_ids"][text.sub.tokens_start:-1]
    if len(ids) == 1 and text.sub.inv_vocab.get(ids[0], "").endswith("</w>"):
        warnings.append(f"the trigger word {trigger!r} is an existing word of the text encoder's vocabulary; "
                        "prompts that use it in its usual sense will get the concept instead (a made-up word "
                        "like 'qxz' avoids that)")
    class_entries = text.word_entries(settings.class_noun, "class noun")
    if not class_entries:
        raise TrainingError(f"the class noun {settings.class_noun!r} gives no tokens")
    if settings.mode == "ico":
        prefix, suffix = ico.parse_context_spec(settings.prefix), ico.parse_context_spec(settings.suffix)
    else:
        prefix, suffix = ico.ContextSpec(words=ico.CUSTOM_DIFFUSION_PREFIX), ico.ContextSpec()
    prefix_entries = text.word_entries(prefix.words, "prefix") if prefix.words else []
    suffix_entries = text.word_entries(suffix.words, "suffix") if suffix.words else []
    n_prefix = len(prefix_entries) if prefix.from_words else prefix.length
    n_suffix = len(suffix_entries) if suffix.from_words else suffix.length
    try:
        ico.caption_entries(text.special, [0] * n_prefix, torch.zeros(settings.num_tokens, text.width),
                            class_entries, [0] * n_suffix)
    except ico.CaptionError as e:
        raise TrainingError(str(e)) from None

    try:
        path = Path(folder) / sanitize_name(name)
    except ConceptFileError as e:
        raise TrainingError(str(e)) from None
    if resume:
        if not path.is_file():
            raise TrainingError(f"nothing to resume: {path.name} does not exist in {path.parent}")
        if not state_path(path).is_file():
            raise TrainingError(f"{path.name} can't be resumed: its training state {state_path(path).name} is missing")
    elif path.exists() and not overwrite:
        raise TrainingError(f"{path.name} already exists in {path.parent}: choose another save name, allow "
                            "overwriting, or resume it")
    for w in warnings:
        log.warning(w)
    return _Plan(family, text, class_entries, prefix, suffix, prefix_entries, suffix_entries, path, resume, warnings)


def _prediction_kind(model) -> str:
    import comfy.model_sampling as ms

    sampling = model.get_model_object("model_sampling")
    if getattr(sampling, "sigma_data", 1.0) != 1.0 or not hasattr(sampling, "sigmas"):
        raise TrainingError("this MODEL's noise schedule is not a discrete DDPM schedule; training supports "
                            "the ε- and v-prediction schedules of SD1.x/SD2.x")
    if isinstance(sampling, ms.EDM) or not isinstance(sampling, ms.EPS) or isinstance(sampling, ms.X0):
        raise TrainingError(f"this MODEL predicts with {type(sampling).__name__}; training supports ε- and "
                            "v-prediction")
    return "v" if isinstance(sampling, ms.V_PREDICTION) else "eps"


class _Capture:
    """Diffusion-model wrapper that keeps the raw UNet output (ε or v) of the latest call."""

    def __init__(self):
        self.output = None

    def __call__(self, executor, *args, **kwargs):
        self.output = executor(*args, **kwargs)
        return self.output


def train_concept(model, clip, vae, images, settings: TrainSettings, folder: str | os.PathLike, name: str,
                  overwrite: bool = False, resume: bool = False, reg_images=None,
                  on_step: Callable[[int, int, float], None] | None = None) -> TrainResult:
    """Train (or resume) a concept and save it; returns the saved concept. See the module docstring."""
    plan = plan_training(model, clip, images, settings, Path(folder), name, overwrite, resume, reg_images)
    with torch.inference_mode(False), torch.enable_grad():
        return _Run(plan, model, clip, vae, images, reg_images, settings, on_step).run()


class _Run:
    def __init__(self, plan: _Plan, model, clip, vae, images, reg_images, settings: TrainSettings, on_step):
        import comfy.model_management as mm

        self.plan, self.model, self.clip, self.vae, self.s = plan, model, clip, vae, settings
        self.on_step = on_step
        self.device = model.load_device
        self.text = plan.text
        self.images = ico.square_images(images.clone(), settings.resolution)
        self.reg_images = ico.square_images(reg_images.clone(), settings.resolution) if reg_images is not None else None
        self.fingerprint = ico.tensor_fingerprint(self.images, *(() if self.reg_images is None else (self.reg_images,)))
        self.autocast = PRECISIONS[settings.precision]
        self.prediction = _prediction_kind(model)
        self.mm = mm

    # -- set-up --
    def _latents(self, images: torch.Tensor) -> torch.Tensor:
        """[2, N, 4, h, w]: the VAE latents of the images and of their mirror images, encoded once."""
        with torch.no_grad():
            both = torch.cat([images, images.flip(2)]) if self.s.random_flip else images
            lat = self.model.model.process_latent_in(self.vae.encode(both)).float().clone()
        if not torch.isfinite(lat).all():
            raise TrainingError("the VAE encoded the images to non-finite latents; check the VAE")
        return lat.view(2 if self.s.random_flip else 1, images.shape[0], *lat.shape[1:]).to(self.device)

    def _reg_conds(self) -> list[torch.Tensor]:
        """Each regularisation caption encoded once, exactly as CLIPTextEncode does (no trainable part)."""
        captions = self.s.reg_captions
        out = []
        with torch.no_grad():
            for c in captions:
                cond = self.clip.encode_from_tokens(self.clip.tokenize(c))
                out.append(cond.float().clone().to(self.device))
        return out

    def _init_trainables(self):
        s, text = self.s, self.text
        base = comfy_concept.base_kv_weights(self.model)
        self.deltas = {k: torch.zeros(w.shape, dtype=torch.float32, device=self.device) for k, w in sorted(base.items())}
        rare = text.vocabulary_rows(ico.RARE_TOKEN_WORDS[: s.num_tokens]).detach().float().clone()
        self.token_init = rare.cpu().clone()
        self.tokens = rare.to(self.device).clone()
        self.contexts: dict[str, torch.Tensor] = {}
        if s.mode == "ico":
            g = torch.Generator().manual_seed(ico._sub_seed("contexts", s.seed))
            n = self.images.shape[0]
            for part, spec, entries in (("prefix", self.plan.prefix, self.plan.prefix_entries),
                                        ("suffix", self.plan.suffix, self.plan.suffix_entries)):
                rows = text.embed([entries])[0].detach() if spec.from_words else None
                ctx = ico.init_contexts(n, text.width, rows, spec.length, g)
                if ctx.shape[1]:
                    self.contexts[part] = ctx.to(self.device)

    def _parameters(self) -> list[tuple[str, torch.Tensor]]:
        named = [(f"kv_delta.{k}", v) for k, v in self.deltas.items()] + [("token", self.tokens)]
        return named + [(f"context.{k}", v) for k, v in sorted(self.contexts.items())]

    def _load_resume(self) -> _State:
        concept = load_concept(self.plan.path)
        names = [n for n, _ in self._parameters()]
        state = _load_state(state_path(self.plan.path), names)
        if state.step != concept.steps:
            raise TrainingError(f"{self.plan.path.name} is at step {concept.steps} but its training state at step "
                                f"{state.step}; the pair is inconsistent and can't be resumed")
        mine = json.loads(json.dumps(self.s.resume_key(), sort_keys=True))
        differ = sorted(k for k in set(mine) | set(state.settings) if mine.get(k) != state.settings.get(k))
        if differ:
            raise TrainingError(f"resuming needs the settings of the saved run; these differ: {', '.join(differ)}")
        if state.images != self.fingerprint:
            raise TrainingError("resuming needs the same concept and regularisation images as the saved run")
        for k in self.deltas:
            self.deltas[k] = concept.kv_deltas[k].float().to(self.device)
        self.tokens = concept.tokens[self.text.key].float().to(self.device)
        self.token_init = concept.token_init.get(self.text.key, self.token_init)
        for part in self.contexts:
            self.contexts[part] = concept.contexts[f"{self.text.key}.{part}"].float().to(self.device)
        return state

    # -- one step --
    def _captions(self, indices: list[int]) -> list[list]:
        s, p = self.s, self.plan
        out = []
        for i in indices:
            if s.mode == "ico":
                prefix = self.contexts["prefix"][i] if "prefix" in self.contexts else []
                suffix = self.contexts["suffix"][i] if "suffix" in self.contexts else []
            else:
                prefix, suffix = p.prefix_entries, []
            out.append(ico.caption_entries(self.text.special, prefix, self.tokens, p.class_entries, suffix))
        return out

    def _predict(self, x_t, sigma, context):
        topts = dict(self.patcher.model_options.get("transformer_options", {}))
        import comfy.patcher_extension as pe

        wrappers = pe.copy_nested_dicts(topts.get("wrappers", {}))
        wrappers.setdefault(pe.WrappersMP.DIFFUSION_MODEL, {}).setdefault(WRAPPER_KEY, []).append(self.capture)
        topts.update(wrappers=wrappers, cond_or_uncond=[0] * 1, sigmas=sigma)
        self.patcher.model.apply_model(x_t, sigma, c_crossattn=context, transformer_options=topts)
        out, self.capture.output = self.capture.output, None
        return out.float()

    def _step_loss(self, step: int) -> torch.Tensor:
        s = self.s
        n_reg = 0 if self.reg_latents is None else self.reg_latents.shape[1]
        draw = ico.draw_step(s.seed, step, s.batch_size, self.images.shape[0], n_reg, self.num_timesteps,
                             s.random_flip)
        lat = [self.latents[int(f), i] for i, f in zip(draw.concept, draw.concept_flip, strict=True)]
        lat += [self.reg_latents[int(f), i] for i, f in zip(draw.reg, draw.reg_flip, strict=True)]
        x0 = torch.stack(lat)
        noise = torch.randn(x0.shape, generator=draw.generator).to(x0)
        sigma = self.sampling.sigma(draw.timesteps.float().to(self.device)).to(x0)
        x_t = self.sampling.noise_scaling(sigma, noise, x0)
        if self.prediction == "eps":
            target = noise
        else:
            target = (noise - sigma.view(-1, 1, 1, 1) * x0) / (sigma.view(-1, 1, 1, 1) ** 2 + 1).sqrt()
        autocast = torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None)
        with autocast:
            cond = self.text.encode(self.text.embed(self._captions(draw.concept)))
            conds = [cond] + [self.reg_conds[j % len(self.reg_conds)] for j in draw.reg]
            k = len(draw.concept)
            if all(c.shape[-2] == cond.shape[-2] for c in conds[1:]):
                pred = self._predict(x_t, sigma, torch.cat([cond, *conds[1:]]))
            else:
                pred = torch.cat([self._predict(x_t[:k], sigma[:k], cond)]
                                 + [self._predict(x_t[k + j:k + j + 1], sigma[k + j:k + j + 1], c)
                                    for j, c in enumerate(conds[1:])])
        per_sample = ((pred - target) ** 2).mean(dim=(1, 2, 3))
        loss = per_sample[:k].mean()
        if draw.reg:
            loss = loss + per_sample[k:].mean()  # prior preservation at equal weight
        return loss

    # -- saving --
    def _concept(self, steps_done: int, losses: list[float]) -> Concept:
        s, key = self.s, self.text.key
        training = {k: v for k, v in asdict(s).items() if k != "reg_captions"}
        training.update(reg_images=0 if self.reg_images is None else int(self.reg_images.shape[0]),
                        reg_captions=s.reg_captions[:20], images=int(self.images.shape[0]),
                        lr_kv_tokens=self.lrs[0], lr_contexts=self.lrs[1], weight_decay=WEIGHT_DECAY,
                        last_loss=losses[-1] if losses else None)
        return Concept(
            family=self.plan.family, trigger=s.trigger, class_noun=s.class_noun.strip(),
            kv_deltas={k: v.detach().float().cpu().clone() for k, v in self.deltas.items()},
            tokens={key: self.tokens.detach().float().cpu().clone()},
            token_init={key: self.token_init.float().cpu().clone()},
            contexts={f"{key}.{part}": v.detach().float().cpu().clone() for part, v in self.contexts.items()},
            base_fingerprint=comfy_concept.base_fingerprint(self.model), method=s.mode, steps=steps_done,
            training=training,
        )

    def _checkpoint(self, steps_done: int, losses: list[float]) -> None:
        names = [n for n, _ in self._parameters()]
        opt_state = self.optimizer.state_dict()["state"]
        state = _State(steps_done, list(losses), opt_state,
                       self.scaler.state_dict() if self.scaler is not None else {},
                       json.loads(json.dumps(self.s.resume_key(), sort_keys=True)), self.fingerprint)
        save_concept(self._concept(steps_done, losses), self.plan.path.parent, self.plan.path.name, overwrite=True)
        _save_state(state_path(self.plan.path), state, names)

    # -- the loop --
    def run(self) -> TrainResult:
        import comfy.utils

        s = self.s
        t0 = time.time()
        self.latents = self._latents(self.images)
        self.reg_latents = self._latents(self.reg_images) if self.reg_images is not None else None
        self.reg_conds = self._reg_conds() if self.reg_images is not None else []
        self._init_trainables()
        state = self._load_resume() if self.plan.resume else None

        for _, t in self._parameters():
            t.requires_grad_(True)
        self.lrs = ico.effective_learning_rates(s.learning_rate, s.batch_size, s.context_lr_multiplier)
        groups = [{"params": [t for n, t in self._parameters() if not n.startswith("context.")], "lr": self.lrs[0]}]
        if self.contexts:
            groups.append({"params": [self.contexts[k] for k in sorted(self.contexts)], "lr": self.lrs[1]})
        self.optimizer = torch.optim.AdamW(groups, weight_decay=WEIGHT_DECAY)
        self.scaler = torch.amp.GradScaler(self.device.type) if s.precision == "fp16" else None
        losses: list[float] = []
        done = 0
        if state is not None:
            sd = self.optimizer.state_dict()
            sd["state"] = {i: {k: v.to(self.device) if k != "step" else v for k, v in st.items()}
                           for i, st in state.optimizer.items()}
            self.optimizer.load_state_dict(sd)
            if self.scaler is not None and state.scaler:
                self.scaler.load_state_dict(state.scaler)
            losses, done = list(state.losses), state.step

        self.patcher = training_patcher(self.model, self.deltas, self.text.special.length)
        self.capture = _Capture()
        self.sampling = self.patcher.get_model_object("model_sampling")
        self.num_timesteps = int(self.sampling.sigmas.shape[0])
        self.text.prepare()
        self.mm.load_models_gpu([self.patcher])
        _autograd_safe(self.patcher.model)
        _autograd_safe(self.clip.cond_stage_model)
        log.info("training concept %r (%s): %d trainable values, steps %d→%d, set-up %.1fs", s.trigger, s.mode,
                 sum(t.numel() for _, t in self._parameters()), done, s.steps, time.time() - t0)

        pbar = comfy.utils.ProgressBar(s.steps)
        if done:
            pbar.update_absolute(min(done, s.steps), s.steps)
        try:
            with _gradient_checkpointing(self.patcher.model.diffusion_model, s.gradient_checkpointing):
                while done < s.steps:
                    self.mm.throw_exception_if_processing_interrupted()
                    loss = self._step_loss(done)
                    value = float(loss.detach())
                    if not math.isfinite(value):
                        raise TrainingError(
                            f"the loss became {value} at step {done + 1}: training diverged. Lower the learning rate "
                            "or use fp32; nothing was saved for this run beyond its last checkpoint")
                    if self.scaler is not None:
                        self.scaler.scale(loss).backward()
                        self.scaler.step(self.optimizer)
                        self.scaler.update()
                    else:
                        loss.backward()
                        self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
                    done += 1
                    losses.append(value)
                    if self.on_step is not None:
                        self.on_step(done, s.steps, value)
                    if done == 1 or done % max(1, s.steps // 20) == 0 or done == s.steps:
                        log.info("concept %r step %d/%d loss %.5f", s.trigger, done, s.steps, value)
                    pbar.update_absolute(done, s.steps)
                    if s.checkpoint_every and done % s.checkpoint_every == 0 and done < s.steps:
                        self._checkpoint(done, losses)
        except self.mm.InterruptProcessingException:
            log.info("training of %r interrupted at step %d; saving a checkpoint", s.trigger, done)
            self._checkpoint(done, losses)
            raise
        finally:
            _unload(self.patcher)
            for _, t in self._parameters():
                t.requires_grad_(False)
        self._checkpoint(done, losses)
        log.info("concept %r saved to %s (%d steps, %.1fs)", s.trigger, self.plan.path, done, time.time() - t0)
        return TrainResult(self.plan.path, load_concept(self.plan.path), losses, done, self.plan.warnings)


# -- the loss curve -------------------------------------------------------------------------------------------
def loss_curve_image(losses: list[float], width: int = 512, height: int = 256) -> torch.Tensor:
    """A ComfyUI IMAGE ``[1, H, W, 3]`` of the loss per step and its running mean."""
    import numpy as np
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    left, right, top, bottom = 48, width - 8, 8, height - 20
    draw.rectangle([left, top, right, bottom], outline=(160, 160, 160))
    values = [v for v in losses if math.isfinite(v)]
    if values:
        lo, hi = min(values), max(values)
        span = (hi - lo) or 1.0

        def xy(i: int, v: float) -> tuple[float, float]:
            x = left + (right - left) * (i / max(1, len(losses) - 1))
            return x, bottom - (bottom - top) * (v - lo) / span

        draw.line([xy(i, v) for i, v in enumerate(losses)] if len(losses) > 1 else [xy(0, losses[0])] * 2,
                  fill=(150, 180, 230), width=1)
        window = max(1, len(losses) // 20)
        smooth = [sum(losses[max(0, i - window + 1):i + 1]) / len(losses[max(0, i - window + 1):i + 1])
                  for i in range(len(losses))]
        draw.line([xy(i, v) for i, v in enumerate(smooth)] if len(smooth) > 1 else [xy(0, smooth[0])] * 2,
                  fill=(20, 60, 200), width=2)
        draw.text((4, top), f"{hi:.3g}", fill="black")
        draw.text((4, bottom - 10), f"{lo:.3g}", fill="black")
    draw.text((left, bottom + 4), f"loss over {len(losses)} steps", fill="black")
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)[None]
