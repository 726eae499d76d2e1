"""ICO / Custom Diffusion training inside the ComfyUI process: the run and its loop.

What trains: a delta for every attn2 ``to_k``/``to_v`` weight (``unet.training_patcher``), the k modifier-token
rows and, in ICO mode, the per-image contexts; in Infusion mode only one residual vector per attn2 layer
(``unet.infusion_patcher``; the modifier-token rows stay at their starting rows). Nothing of the input MODEL,
CLIP or VAE is modified.

The loop runs as a ComfyUI ``Sampler`` through a ``CFGGuider``, as ComfyUI's own trainer does: ComfyUI's
sampling entry loads the training clone and, as an additional model of it, the text encoder (with its memory
estimate), runs the patcher's pre-run and clean-up callbacks, and the sampler's ``sample`` trains instead of
denoising. Afterwards the clone is released (``seams.release``). Training runs under ``inference_mode(False)``;
latents and conditionings are computed once and cloned out of inference mode.

SDXL: both text encoders' token rows and contexts train; the UNet also gets its ADM input (``_adm``). Joint
training: several concepts' images follow each other in one batch (``concept_of``), each captioned with its
own trigger's rows and class noun. Previews (``preview.Previews``) sample between steps.

Resume: the concept file holds the trained tensors in fp32, ``files.train_state`` the optimizer moments, step,
losses and scaler state. All randomness of step s comes from a generator seeded by (seed, s), so a resumed run
continues bit for bit.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import comfy.model_management as mm
import comfy.patcher_extension as pe
import comfy.samplers
import comfy.utils
import torch

from ...files.concept import Concept, MoreTrigger, load_concept, save_concept
from ...files.train_state import TrainState, TrainStateError, load_state, save_state, state_path
from ...method import ico
from ...method.infusion import token_mask as infusion_rows
from .. import seams
from ..concept import base_fingerprint, base_kv_weights
from .plan import Plan, plan_training
from .preview import Previews
from .settings import AUTOCAST, RESIDUAL_LR_SCALE, WEIGHT_DECAY, TrainingError, TrainSettings
from .text_encoder import weights_in
from .trainables import Trainables, token_key
from .unet import (
    ROWS_KEY,
    WRAPPER_KEY,
    Capture,
    autograd_safe,
    gradient_checkpointing,
    infusion_patcher,
    residual_keys,
    target,
    training_patcher,
)

log = logging.getLogger(__name__)
TEXT_ENCODER_KEY = "dci_train_text_encoder"  # the clone's additional model: the CLIP, loaded beside the UNet


@dataclass
class TrainResult:
    path: Path
    concept: Concept
    losses: list[float]
    steps_done: int
    warnings: list[str]


class TrainingSampler(comfy.samplers.Sampler):
    """The training loop in the place of a sampler, so ComfyUI's sampling entry loads and cleans up."""

    def __init__(self, run: TrainingRun):
        self.run = run

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        self.run.train()
        return latent_image


class TrainingRun:
    """One training run: everything set up in the constructor, the steps in ``train``."""

    def __init__(self, plan: Plan, model, clip, vae, images, reg_images, settings: TrainSettings, on_step,
                 masks=None, previews: Previews | None = None,
                 start_tokens: dict[str, torch.Tensor] | None = None):
        self.plan, self.model, self.clip, self.vae, self.s = plan, model, clip, vae, settings
        self.previews = previews if previews is not None and previews.every > 0 else None
        self.start_tokens = start_tokens
        self.on_step = on_step
        self.t0 = time.time()
        self.device = model.load_device
        self.text = plan.text
        self.autocast = AUTOCAST[settings.precision]
        self.images = ico.square_images(images.clone(), settings.resolution)
        counts = [c["images"] for c in settings.more_concepts]
        self.concept_of = [j for j, n in enumerate([self.images.shape[0] - sum(counts), *counts]) for _ in range(n)]
        self.reg_images = ico.square_images(reg_images.clone(), settings.resolution) if reg_images is not None else None
        extra = (() if self.reg_images is None else (self.reg_images,)) + (() if masks is None else (masks,))
        self.fingerprint = ico.tensor_fingerprint(self.images, *extra)
        self.latents = self._latents(self.images)
        self.reg_latents = self._latents(self.reg_images) if self.reg_images is not None else None
        self.masks = self._latent_masks(masks) if masks is not None else None
        self.reg_conds = self._reg_conds() if self.reg_images is not None else []
        self.trained = self._init_trainables()
        state = self._load_resume() if plan.resume else None
        for t in self._tensors():
            t.requires_grad_(True)
        self.lrs = ico.effective_learning_rates(settings.learning_rate, settings.batch_size,
                                                settings.context_lr_multiplier)
        self.optimizer = self._optimizer(state)
        self.scaler = torch.amp.GradScaler(self.device.type) if settings.precision == "fp16" else None
        if self.scaler is not None and state is not None and state.scaler:
            self.scaler.load_state_dict(state.scaler)
        self.losses: list[float] = list(state.losses) if state is not None else []
        self.done = state.step if state is not None else 0
        self.capture = Capture()
        if settings.mode == "infusion":
            self.patcher = infusion_patcher(model, self.trained.residuals)
        else:
            self.patcher = training_patcher(model, self.trained.deltas, self.text.length)
        # the text encoder (and, for previews, the VAE) load beside the UNet for the whole run
        self.patcher.set_additional_models(TEXT_ENCODER_KEY, [clip.patcher] + ([vae.patcher] if self.previews else []))
        self.sampling = self.patcher.get_model_object("model_sampling")
        self.num_timesteps = int(self.sampling.sigmas.shape[0])

    # -- set-up --
    def _tensors(self) -> list[torch.Tensor]:
        return [t for _, t in self.trained.named()]

    def _latents(self, images: torch.Tensor) -> torch.Tensor:
        """[2, N, 4, h, w]: the VAE latents of the images and of their mirror images, encoded once, one image
        at a time (ComfyUI's VAE would encode as many as free memory allows at once; on a CPU that is all of
        them, and the encoder's activations at full resolution then set the run's peak memory)."""
        with torch.no_grad():
            both = torch.cat([images, images.flip(2)]) if self.s.random_flip else images
            lat = torch.cat([self.vae.encode(both[i:i + 1]) for i in range(both.shape[0])])
            lat = self.model.model.process_latent_in(lat).float().clone()
        if not torch.isfinite(lat).all():
            raise TrainingError("the VAE encoded the images to non-finite latents; check the VAE")
        return lat.view(2 if self.s.random_flip else 1, images.shape[0], *lat.shape[1:]).to(self.device)

    def _latent_masks(self, masks: torch.Tensor) -> torch.Tensor:
        """[2, N, 1, h, w]: each concept image's mask (and its mirror image's) at the latents' size."""
        n = self.images.shape[0]
        m = masks.float().expand(n, *masks.shape[1:]) if masks.shape[0] == 1 else masks.float()
        m = torch.nn.functional.interpolate(m.unsqueeze(1), size=self.latents.shape[-2:], mode="bilinear",
                                            align_corners=False).clamp(0, 1)
        both = torch.stack([m, m.flip(-1)]) if self.s.random_flip else m.unsqueeze(0)
        return both.to(self.device)

    def _reg_conds(self) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """Each regularisation caption encoded once, exactly as CLIPTextEncode does (no trainable part): its
        context and, for SDXL, its ADM input."""
        out = []
        with torch.no_grad():
            for c in self.s.reg_captions:
                cond, pooled = self.clip.encode_from_tokens(self.clip.tokenize(c), return_pooled=True)
                pooled = pooled.float().clone().to(self.device) if self.text.pooled_key else None
                out.append((cond.float().clone().to(self.device), self._adm(pooled)))
        return out

    def _adm(self, pooled: torch.Tensor | None) -> torch.Tensor | None:
        """SDXL's ADM input ``y`` for these pooled outputs: the size conditioning ComfyUI's sampling gives an
        image of the training resolution (width = height = target = resolution, crop 0)."""
        if pooled is None:
            return None
        r = self.s.resolution
        return self.model.model.encode_adm(pooled_output=pooled, width=r, height=r, target_width=r, target_height=r,
                                           crop_w=0, crop_h=0, device=self.device).to(self.device)

    def _init_trainables(self) -> Trainables:
        s, text, plan = self.s, self.text, self.plan
        infusion = s.mode == "infusion"
        base = {} if infusion else base_kv_weights(self.model)
        deltas = {k: torch.zeros(w.shape, dtype=torch.float32, device=self.device) for k, w in sorted(base.items())}
        residuals = {k: torch.zeros(n, dtype=torch.float32, device=self.device)
                     for k, n in sorted(residual_keys(self.model, s.unlock_keys).items())} if infusion else {}
        rare = {k: r.detach().float().clone() for k, r in
                text.vocabulary_rows(ico.RARE_TOKEN_WORDS[: s.num_tokens]).items()}
        if self.start_tokens is not None:  # a given concept's rows (e.g. an encoded one) instead of rare words
            for k, r in rare.items():
                start = self.start_tokens.get(k)
                if start is None or tuple(start.shape) != tuple(r.shape):
                    got = "none" if start is None else f"{tuple(start.shape)[0]} rows {tuple(start.shape)[1]} wide"
                    raise TrainingError(f"the start concept's {k} token rows ({got}) don't fit this run: it needs "
                                        f"{s.num_tokens} rows {r.shape[1]} wide (set num_tokens to match)")
                rare[k] = start.detach().float().clone()
        # every concept's trigger starts from the same rows
        rare = {token_key(k, j): r for k, r in rare.items() for j in range(1 + len(s.more_concepts))}
        contexts: dict[str, torch.Tensor] = {}
        if s.mode == "ico":
            g = torch.Generator().manual_seed(ico.sub_seed("contexts", s.seed))
            for part, spec, entries in (("prefix", plan.prefix, plan.prefix_entries),
                                        ("suffix", plan.suffix, plan.suffix_entries)):
                for enc in text.parts:
                    rows = enc.embed([entries[enc.key]])[0].detach() if spec.from_words else None
                    ctx = ico.init_contexts(self.images.shape[0], enc.width, rows, spec.length, g)
                    if ctx.shape[1]:
                        contexts[f"{enc.key}.{part}"] = ctx.to(self.device)
        return Trainables(deltas, {k: r.to(self.device).clone() for k, r in rare.items()},
                          {k: r.cpu().clone() for k, r in rare.items()}, contexts, residuals, train_tokens=not infusion)

    def _load_resume(self) -> TrainState:
        concept = load_concept(self.plan.path)
        try:
            state = load_state(state_path(self.plan.path), self.trained.names())
        except TrainStateError as e:
            raise TrainingError(str(e)) from None
        if state.step != concept.steps:
            raise TrainingError(f"{self.plan.path.name} is at step {concept.steps} but its training state at step "
                                f"{state.step}; the pair is inconsistent and can't be resumed")
        mine = json.loads(json.dumps(self.s.resume_key(), sort_keys=True))
        differ = sorted(k for k in set(mine) | set(state.settings) if mine.get(k) != state.settings.get(k))
        if differ:
            raise TrainingError(f"resuming needs the settings of the saved run; these differ: {', '.join(differ)}")
        if state.images != self.fingerprint:
            raise TrainingError("resuming needs the same concept and regularisation images as the saved run")
        t = self.trained
        for k in t.deltas:
            t.deltas[k] = concept.kv_deltas[k].float().to(self.device)
        t.load_tokens(concept, self.device)
        for k in t.residuals:
            t.residuals[k] = concept.residuals[k].float().to(self.device)
        for k in t.contexts:
            t.contexts[k] = concept.contexts[k].float().to(self.device)
        return state

    def _optimizer(self, state: TrainState | None) -> torch.optim.AdamW:
        t = self.trained
        lr = self.lrs[0] * (RESIDUAL_LR_SCALE if self.s.mode == "infusion" else 1.0)
        groups = [{"params": [v for n, v in t.named() if not n.startswith("context.")], "lr": lr}]
        if t.contexts:
            groups.append({"params": [t.contexts[k] for k in sorted(t.contexts)], "lr": self.lrs[1]})
        optimizer = torch.optim.AdamW(groups, weight_decay=WEIGHT_DECAY)
        if state is not None:
            sd = optimizer.state_dict()
            sd["state"] = {i: {k: v.to(self.device) if k != "step" else v for k, v in st.items()}
                           for i, st in state.optimizer.items()}
            optimizer.load_state_dict(sd)
        return optimizer

    # -- one step --
    def _captions(self, indices: list[int]) -> dict[str, list[list]]:
        """The concept captions of these images, per text encoder."""
        s, p, t = self.s, self.plan, self.trained
        out: dict[str, list[list]] = {}
        for enc in self.text.parts:
            k, rows = enc.key, []
            for i in indices:
                if s.mode == "ico":
                    prefix = t.contexts[f"{k}.prefix"][i] if f"{k}.prefix" in t.contexts else []
                    suffix = t.contexts[f"{k}.suffix"][i] if f"{k}.suffix" in t.contexts else []
                else:
                    prefix, suffix = p.prefix_entries[k], p.suffix_entries[k]
                j = self.concept_of[i]
                rows.append(ico.caption_entries(enc.special, prefix, t.tokens[token_key(k, j)],
                                                p.class_entries[j][k], suffix))
            out[k] = rows
        return out

    def _trigger_rows(self, concept_rows: int, total_rows: int, length: int) -> torch.Tensor | None:
        """infusion: [rows, tokens] true at the modifier tokens of the concept captions (the first rows)."""
        if self.s.mode != "infusion":
            return None
        cols = ico.modifier_positions(len(self.plan.prefix_entries[self.text.primary.key]), self.s.num_tokens)
        return infusion_rows(total_rows, length, [cols] * concept_rows, self.device)

    def _predict(self, x_t, sigma, context, rows=None, y=None) -> torch.Tensor:
        """The raw UNet output for these rows, through ``BaseModel.apply_model`` with the clone's options."""
        topts = dict(self.patcher.model_options.get("transformer_options", {}))
        wrappers = pe.copy_nested_dicts(topts.get("wrappers", {}))
        wrappers.setdefault(pe.WrappersMP.DIFFUSION_MODEL, {}).setdefault(WRAPPER_KEY, []).append(self.capture)
        topts.update(wrappers=wrappers, cond_or_uncond=[0], sigmas=sigma)
        if rows is not None:
            topts[ROWS_KEY] = rows
        extra = {} if y is None else {"y": y}
        self.patcher.model.apply_model(x_t, sigma, c_crossattn=context, transformer_options=topts, **extra)
        return self.capture.take().float()

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
        goal = target(self.plan.prediction, noise, x0, sigma)
        with torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None):
            cond, pooled = self.text.encode(self._captions(draw.concept))
            adm = self._adm(pooled)
            regs = [self.reg_conds[j % len(self.reg_conds)] for j in draw.reg]
            conds, adms = [cond] + [c for c, _ in regs], [adm] + [a for _, a in regs]
            k = len(draw.concept)
            if all(c.shape[-2] == cond.shape[-2] for c in conds[1:]):
                rows = self._trigger_rows(k, len(conds) - 1 + k, cond.shape[-2])
                pred = self._predict(x_t, sigma, torch.cat(conds), rows, None if adm is None else torch.cat(adms))
            else:
                pred = torch.cat([self._predict(x_t[:k], sigma[:k], cond, self._trigger_rows(k, k, cond.shape[-2]),
                                                adm)]
                                 + [self._predict(x_t[k + j:k + j + 1], sigma[k + j:k + j + 1], c, None, a)
                                    for j, (c, a) in enumerate(regs)])
        if self.masks is not None:  # foreground-masked loss on the concept rows, as the official Infusion code
            w = torch.stack([self.masks[int(f), i] for i, f in zip(draw.concept, draw.concept_flip, strict=True)])
            w = torch.cat([w, torch.ones(pred.shape[0] - k, *w.shape[1:], device=w.device)]).to(pred)
            pred, goal = pred * w, goal * w
        per_sample = ((pred - goal) ** 2).mean(dim=(1, 2, 3))
        loss = per_sample[:k].mean()
        if draw.reg:
            loss = loss + per_sample[k:].mean()  # prior preservation at equal weight
        return loss

    # -- saving --
    def _concept(self) -> Concept:
        s, t = self.s, self.trained
        training = {k: v for k, v in asdict(s).items() if k != "reg_captions"}
        training.update(reg_images=0 if self.reg_images is None else int(self.reg_images.shape[0]),
                        reg_captions=s.reg_captions[:20], images=int(self.images.shape[0]),
                        masked_loss=self.masks is not None,
                        lr_kv_tokens=self.lrs[0], lr_contexts=self.lrs[1], weight_decay=WEIGHT_DECAY,
                        trainable_values=sum(t.numel() for t in self._tensors()),
                        lr_residuals=self.lrs[0] * RESIDUAL_LR_SCALE if s.mode == "infusion" else None,
                        last_loss=self.losses[-1] if self.losses else None)
        return Concept(
            family=self.plan.family, trigger=s.trigger, class_noun=s.class_noun.strip(),
            kv_deltas={k: v.detach().float().cpu().clone() for k, v in t.deltas.items()},
            tokens=t.token_rows(0), token_init=t.token_rows(0, initial=True),
            more=[MoreTrigger(c["trigger"], c["class_noun"].strip(), t.token_rows(j), t.token_rows(j, initial=True))
                  for j, c in enumerate(s.more_concepts, start=1)],
            contexts={k: v.detach().float().cpu().clone() for k, v in t.contexts.items()},
            residuals={k: v.detach().float().cpu().clone() for k, v in t.residuals.items()},
            base_fingerprint=base_fingerprint(self.model), method=s.mode, steps=self.done, training=training,
        )

    def checkpoint(self) -> None:
        state = TrainState(self.done, list(self.losses), self.optimizer.state_dict()["state"],
                           self.scaler.state_dict() if self.scaler is not None else {},
                           json.loads(json.dumps(self.s.resume_key(), sort_keys=True)), self.fingerprint)
        save_concept(self._concept(), self.plan.path.parent, self.plan.path.name, overwrite=True)
        save_state(state_path(self.plan.path), state, self.trained.names())

    # -- the loop --
    def _step(self) -> None:
        s = self.s
        loss = self._step_loss(self.done)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise TrainingError(f"the loss became {value} at step {self.done + 1}: training diverged. Lower the "
                                "learning rate or use fp32; nothing was saved for this run beyond its last checkpoint")
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.done += 1
        self.losses.append(value)
        if self.on_step is not None:
            self.on_step(self.done, s.steps, value)
        if self.done == 1 or self.done % max(1, s.steps // 20) == 0 or self.done == s.steps:
            log.info("concept %r step %d/%d loss %.5f", s.trigger, self.done, s.steps, value)

    def _text_weights(self):
        """fp32 runs: the text encoders' half-precision weights held in fp32 for the run (``weights_in``): as
        fast as casting them once, and no more memory, since autograd keeps every layer's cast until the backward
        pass anyway. Not with gradient checkpointing, which recomputes the layers and so keeps one cast at a
        time: there the held copy would cost memory (1.6 GB for SDXL's encoders), which is what the user chose
        to save."""
        if self.autocast is not None or self.s.gradient_checkpointing:
            return nullcontext()
        return weights_in(self.clip.cond_stage_model, torch.float32)

    def train(self) -> None:
        """The steps, with the UNet and text encoder loaded by ComfyUI; checkpoints on schedule and on Cancel."""
        s = self.s
        self.text.prepare()
        self.text.checkpointing = s.gradient_checkpointing
        autograd_safe(self.patcher.model)
        autograd_safe(self.clip.cond_stage_model)
        log.info("training concept %r (%s): %d trainable values, steps %d→%d, set-up %.1fs", s.trigger, s.mode,
                 sum(t.numel() for t in self._tensors()), self.done, s.steps, time.time() - self.t0)
        pbar = comfy.utils.ProgressBar(s.steps)
        if self.done:
            pbar.update_absolute(min(self.done, s.steps), s.steps)

        def preview_tick() -> None:  # every sampling step of a preview: Cancel works, progress stays alive
            mm.throw_exception_if_processing_interrupted()
            pbar.update_absolute(self.done, s.steps)
        try:
            with (gradient_checkpointing(self.patcher.model.diffusion_model, s.gradient_checkpointing),
                  self._text_weights()):
                while self.done < s.steps:
                    mm.throw_exception_if_processing_interrupted()
                    self._step()
                    pbar.update_absolute(self.done, s.steps)
                    if s.checkpoint_every and self.done % s.checkpoint_every == 0 and self.done < s.steps:
                        self.checkpoint()
                    if self.previews is not None and self.previews.due(self.done):
                        row = self.previews.make(self, preview_tick)
                        pbar.update_absolute(self.done, s.steps, self.previews.live(row))
        except mm.InterruptProcessingException:
            log.info("training of %r interrupted at step %d; saving a checkpoint", s.trigger, self.done)
            self.checkpoint()
            raise

    def run(self) -> TrainResult:
        latents = torch.zeros((self.s.batch_size, *self.latents.shape[2:]))
        guider = comfy.samplers.CFGGuider(self.patcher)
        guider.inner_set_conds({})
        try:
            guider.sample(latents, latents, TrainingSampler(self), torch.tensor([1.0, 0.0]))
        finally:
            seams.release(self.patcher)
            for t in self._tensors():
                t.requires_grad_(False)
        self.checkpoint()
        log.info("concept %r saved to %s (%d steps, %.1fs)", self.s.trigger, self.plan.path, self.done,
                 time.time() - self.t0)
        return TrainResult(self.plan.path, load_concept(self.plan.path), self.losses, self.done, self.plan.warnings)


def train_concept(model, clip, vae, images, settings: TrainSettings, folder: str | os.PathLike, name: str,
                  overwrite: bool = False, resume: bool = False, reg_images=None,
                  on_step: Callable[[int, int, float], None] | None = None, masks=None,
                  previews: Previews | None = None,
                  start_tokens: dict[str, torch.Tensor] | None = None) -> TrainResult:
    """Train (or resume) a concept and save it; returns the saved concept. See the module docstring.
    ``previews``: sample images every N steps (``preview.Previews``); ``start_tokens``: token rows per text
    encoder to start from instead of rare words (e.g. an encoded concept's)."""
    plan = plan_training(model, clip, images, settings, Path(folder), name, overwrite, resume, reg_images, masks)
    if previews is not None:
        previews.start(resume)
    with torch.inference_mode(False), torch.enable_grad():
        return TrainingRun(plan, model, clip, vae, images, reg_images, settings, on_step, masks, previews,
                           start_tokens).run()
