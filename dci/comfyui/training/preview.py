"""Training previews: fixed-seed sample images of the concept as it stands, every N steps, and the loss curve.

A preview samples each preview prompt with the *training clone itself* (its weight wrappers carry the current
K/V deltas; Infusion's residual patch gets the trigger's rows) and the current trigger-token rows (the prompts
are tokenized by a CLIP clone that knows the trigger, and encoded by the trainer's own text forward, which
reproduces CLIPTextEncode). It is a short Euler run (``STEPS`` steps, CFG ``CFG`` against the empty prompt) at
the training resolution, from the same noise every time (the run's seed), with no ComfyUI model loading in
between: the VAE is loaded beside the UNet for the whole run. Prompt weights like ``(word:1.2)`` are not applied.

Every sampling step reports progress and checks for Cancel, so a Cancel during a preview stops the run like one
during a step (the checkpoint of the last finished step is saved). The images go to the node's progress preview
and, as PNG files written atomically, to ``output/concept_training/<save name>/`` beside ``loss_curve.png``;
a fresh (not resumed) run first removes the PNGs an earlier run of the same name left there.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass, field
from pathlib import Path

import comfy.samplers
import numpy as np
import torch
from PIL import Image

from ...files.atomic import write_bytes
from ...files.concept import SUFFIX, sanitize_name
from ..tokenizer import add_trigger
from .loss_curve import loss_curve_image
from .unet import ROWS_KEY

log = logging.getLogger(__name__)
STEPS = 8
CFG = 5.0
SCHEDULER = "normal"
OUTPUT_SUBFOLDER = "concept_training"
LOSS_CURVE = "loss_curve.png"
LIVE_PREVIEW_SIZE = 1024


def preview_folder(save_name: str) -> tuple[Path, str]:
    """(folder, its path relative to ComfyUI's output folder) of a run's previews and loss curve."""
    import folder_paths

    stem = sanitize_name(save_name)[: -len(SUFFIX)]
    return Path(folder_paths.get_output_directory()) / OUTPUT_SUBFOLDER / stem, f"{OUTPUT_SUBFOLDER}/{stem}"


def default_prompts(trigger: str, class_noun: str, more: list[dict] = ()) -> list[str]:
    """The preview prompts when none are given: the concept alone and in a new setting (and each further
    concept of a joint run alone)."""
    phrase = f"{trigger} {class_noun.strip()}"
    return [f"a photo of {phrase}", f"{phrase} on the beach"] + [
        f"a photo of {c['trigger']} {c['class_noun'].strip()}" for c in more]


def parse_prompts(text: str, trigger: str, class_noun: str, more: list[dict] = ()) -> list[str]:
    """One prompt per line; empty: ``default_prompts``."""
    prompts = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return prompts or default_prompts(trigger, class_noun, more)


def to_png(image: torch.Tensor) -> bytes:
    """An IMAGE ``[H, W, 3]`` (0..1) as PNG bytes."""
    pixels = (image.detach().float().clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def grid(images: torch.Tensor) -> torch.Tensor:
    """``[N, H, W, 3]`` → one ``[H, N·W, 3]`` row."""
    return torch.cat(list(images), dim=1)


@dataclass
class Previews:
    """What to preview and where the files go; ``shown`` lists the files written (for the node's UI)."""

    every: int
    prompts: list[str]
    folder: Path  # output/concept_training/<save name>
    subfolder: str  # the same, relative to the output folder (what the UI asks the server for)
    seed: int = 0
    shown: list[str] = field(default_factory=list)

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def start(self, resume: bool) -> None:
        if not resume and self.folder.is_dir():
            for old in self.folder.glob("*.png"):
                old.unlink()

    def save_loss_curve(self, losses: list[float]) -> str:
        write_bytes(self.folder / LOSS_CURVE, to_png(loss_curve_image(losses)[0]))
        return LOSS_CURVE

    # -- sampling --
    def _encode(self, run, clip, text: str):
        """(context [1, T, width], pooled or None, trigger rows [1, T]) of one prompt, CLIPTextEncode's way."""
        tokens = clip.tokenize(text)
        captions = {p.key: [[t[0] for t in chunk] for chunk in tokens[p.name]] for p in run.text.parts}
        cond, pooled = run.text.encode(captions)
        primary = tokens[run.text.primary.name]
        rows = torch.tensor([[isinstance(t[0], torch.Tensor) for chunk in primary for t in chunk]])
        return cond.reshape(1, -1, cond.shape[-1]), None if pooled is None else pooled[:1], rows

    def _denoise(self, run, x, sigma, cond, uncond) -> torch.Tensor:
        batch = x.shape[0]
        out = []
        for ctx, pooled, rows in (cond, uncond):
            topts = dict(run.patcher.model_options.get("transformer_options", {}))
            topts.update(cond_or_uncond=[0], sigmas=sigma.expand(batch))
            if run.s.mode == "infusion":
                topts[ROWS_KEY] = rows.expand(batch, -1).to(x.device)
            extra = {} if pooled is None else {"y": run._adm(pooled).expand(batch, -1)}
            out.append(run.patcher.model.apply_model(x, sigma.expand(batch), c_crossattn=ctx.expand(batch, -1, -1),
                                                     transformer_options=topts, **extra).float())
        return out[1] + CFG * (out[0] - out[1])

    def sample(self, run, on_step) -> torch.Tensor:
        """One preview image per prompt, ``[P, res, res, 3]``; ``on_step()`` runs before every sampling step."""
        clip = run.clip
        for j, trigger in enumerate([run.s.trigger] + [c["trigger"] for c in run.s.more_concepts]):
            clip = add_trigger(clip, trigger, run.trained.token_rows(j))
        sigmas = comfy.samplers.calculate_sigmas(run.sampling, SCHEDULER, STEPS).to(run.device)
        latent_shape = run.latents.shape[2:]
        images = []
        with torch.no_grad(), torch.autocast(run.device.type, dtype=run.autocast, enabled=run.autocast is not None):
            uncond = self._encode(run, clip, "")
            for i, prompt in enumerate(self.prompts):
                cond = self._encode(run, clip, prompt)
                g = torch.Generator().manual_seed(self.seed + i)
                noise = torch.randn((1, *latent_shape), generator=g).to(run.device)
                x = run.sampling.noise_scaling(sigmas[0], noise, torch.zeros_like(noise), max_denoise=True)
                for j in range(STEPS):
                    on_step()
                    denoised = self._denoise(run, x, sigmas[j:j + 1], cond, uncond)
                    x = denoised if sigmas[j + 1] == 0 else x + (x - denoised) / sigmas[j] * (sigmas[j + 1] - sigmas[j])
                images.append(run.vae.decode(run.model.model.process_latent_out(x.float())).float().cpu())
        return torch.cat([im.reshape(-1, *im.shape[-3:]) for im in images])[..., :3]

    def make(self, run, on_step) -> torch.Tensor:
        """Sample, save the PNGs and the loss curve, and return the images as one row ``[H, P·W, 3]``."""
        row = grid(self.sample(run, on_step))
        name = f"preview_step{run.done:06d}.png"
        write_bytes(self.folder / name, to_png(row))
        self.shown = [name, self.save_loss_curve(run.losses)]
        log.info("concept %r: preview at step %d saved to %s", run.s.trigger, run.done, self.folder / name)
        return row

    @staticmethod
    def live(row: torch.Tensor) -> tuple:
        """The image as ComfyUI's progress preview takes it."""
        pixels = (row.clamp(0, 1).numpy() * 255).round().astype(np.uint8)
        return ("PNG", Image.fromarray(pixels), LIVE_PREVIEW_SIZE)
