"""Rows of ``make bench-quality`` beyond plain and DCI sampling, and the sweep parsers: the Layout-and-Retouch
rows and their layout-diversity measure, and the two overfitting metrics (Infusion's Fisher divergence and W2).

The mixins run inside ``dev.bench_quality.Bench`` (they use its node runner, models, arguments and records).
"""

from __future__ import annotations

import sys
import time

import numpy as np

from . import harness

TRIGGER = "sks"
FISHER_SEED = 424242  # the base-world scenes whose captions are the Fisher divergence's non-concept prompts


NORM_SHORT = {"ref": "reference", "px": "pixel_count"}


def dci_sweep(text: str) -> list[tuple[float, float, str, bool, str]]:
    """``"0.2:1,0.3:0:px,0.3:1:base,0.3:-1:noun"`` → [(0.2, 1.0, "reference", False, "reference"),
    (0.3, 0.0, "pixel_count", False, "reference"), (0.3, 1.0, "reference", True, "reference"),
    (0.3, -1.0, "reference", False, "noun")]: split, λ, normalisation, the auxiliary branch on the base
    model's K/V (``aux_model``), the auxiliary map's reading (``aux_map``)."""
    out = []
    for item in (x.strip() for x in text.split(",")):
        if not item:
            continue
        split, _, rest = item.partition(":")
        lam, *flags = rest.split(":")
        usage = f"--dci: {item!r} is not 'split:λ[:ref|px][:base][:noun]' (e.g. 0.3:1, 0.3:-1:px or 0.3:1:noun)"
        if any(f not in (*NORM_SHORT, "base", "noun") for f in flags) or len(set(flags) & set(NORM_SHORT)) > 1:
            sys.exit(usage)
        norm = next((NORM_SHORT[f] for f in flags if f in NORM_SHORT), "reference")
        try:
            out.append((float(split), float(lam or 0.0), norm, "base" in flags,
                        "noun" if "noun" in flags else "reference"))
        except ValueError:
            sys.exit(usage)
        if not 0.0 <= out[-1][0] <= 1.0:
            sys.exit(f"--dci: split {split} must be between 0 and 1")
    return out


def dci_label(row: tuple[float, float, str, bool, str]) -> str:
    split, lam, norm, on_base, reading = row
    tag = (("" if norm == "reference" else "_px") + ("_base" if on_base else "")
           + ("_noun" if reading == "noun" else ""))
    return f"dci_a{split:g}_l{lam:g}{tag}"


def open_prompt(noun: str) -> str:
    """A prompt that leaves position, size and background open: "a sks circle"."""
    return f"{'an' if noun[:1] in 'aeiou' else 'a'} {noun}"


def lr_sweep(text: str) -> list[tuple[str, float, float]]:
    """``"0.2,0.3,dci:0.3:1"`` → [("layout", 0.2, 0), ("layout", 0.3, 0), ("dci", 0.3, 1.0)]."""
    out = []
    for item in (x.strip() for x in text.split(",")):
        if not item:
            continue
        usage = f"--retouch: {item!r} is not a λ1 between 0 and 1 (e.g. 0.3) or 'dci:split:λ' (e.g. dci:0.3:1)"
        try:
            if item.startswith("dci:"):
                _, split, lam = item.split(":")
                out.append(("dci", float(split), float(lam)))
            else:
                out.append(("layout", float(item), 0.0))
        except ValueError:
            sys.exit(usage)
        if not 0.0 <= out[-1][1] <= 1.0:
            sys.exit(usage)
    return out


def lr_label(row: tuple[str, float, float]) -> str:
    kind, a, b = row
    return f"lr_s{a:g}" if kind == "layout" else f"lr_dci_a{a:g}_l{b:g}"


def pair_diversity(values: list) -> float:
    """Share of pairs of items that differ (0 when every item is the same)."""
    n = len(values)
    if n < 2:
        return float("nan")
    same = sum(values[i] == values[j] for i in range(n) for j in range(i + 1, n))
    return 1.0 - same / (n * (n - 1) / 2)


def layout_diversity(images: np.ndarray, class_noun: str) -> float:
    """Mean over position, size and background of ``pair_diversity`` of what the images show."""
    from .toyworld.metrics import MIN_AREA, read_scene, read_size

    readings = [read_scene(img) for img in images]
    sizes = [read_size(r.area, class_noun) if r.area >= MIN_AREA else None for r in readings]
    return float(np.mean([pair_diversity([r.position for r in readings]), pair_diversity(sizes),
                          pair_diversity([r.background for r in readings])]))


class RetouchRows:
    """Layout-and-Retouch rows (``--retouch``) and the layout diversity of every row."""

    def reference(self, model, clip, name: str, concept) -> object:
        """The first training render, inverted with the personalised model (DCI Invert Reference)."""
        import torch

        from .toyworld.concepts import concept_prompt, training_images, training_scenes

        image = torch.from_numpy(training_images(concept, 1, seed=0).astype(np.float32) / 255.0)
        (pos,) = self.run("CLIPTextEncode", clip=clip,
                          text=concept_prompt(training_scenes(concept, 1, 0)[0], TRIGGER, concept))[0]
        t0 = time.perf_counter()
        traj, _, report = self.run("DCIInvertReference", model=model, vae=self.vae, image=image, positive=pos,
                                   steps=self.args.steps, scheduler="normal", refine=2)[0]
        self._tick("invert reference", t0)
        self.notes.append(f"{name}: reference {report}")
        return traj

    def sample_lr(self, model, clip, ref, ref_traj, prompt: str, seed: int, row) -> np.ndarray:
        """Layout-and-Retouch: a context (step-blended, or DCI then inverted), then the retouch pass."""
        from dci.toyworld.render import IMAGE_SIZE

        a = self.args
        kind, x, lam = row
        (latent,) = self.run("EmptyLatentImage", width=IMAGE_SIZE, height=IMAGE_SIZE, batch_size=a.seeds)[0]
        pos, layout = self.run("DCILayoutPromptEncode", clip=clip, concept=ref, text=prompt)[0]
        common = dict(seed=seed, steps=a.steps, cfg=a.cfg, sampler_name=a.sampler, scheduler="normal",
                      negative=self.negative)
        if kind == "layout":
            _, context = self.run("DCILayoutKSampler", model=model, vanilla_model=self.model, positive=pos,
                                  layout_positive=layout, latent_image=latent, denoise=1.0, switch=x, **common)[0]
        else:
            (ctx,) = self.run("DCIKSampler", model=model, positive=pos, latent_image=latent, denoise=1.0, split=x,
                              lam=lam, aux_map="reference", guidance="separate", aux_seed=seed + 7919,
                              **common)[0]
            context, _, _ = self.run("DCIInvertReference", model=model, vae=self.vae, image=self.decoded(ctx),
                                     positive=pos, steps=a.steps, scheduler="normal", refine=2)[0]
        (patched,) = self.run("DCIRetouchModel", model=model, reference=ref_traj, context=context,
                              positive=pos, **self.retouch_defaults())[0]
        (out,) = self.run("KSampler", model=patched, positive=pos, latent_image=latent, denoise=1.0, **common)[0]
        return self.decode(out)

    @staticmethod
    def retouch_defaults() -> dict:
        """DCI Retouch Model's defaults (this project's choices): the L&R rows use them as a user would."""
        required = harness.node_class("DCIRetouchModel").INPUT_TYPES()["required"]
        return {k: required[k][1]["default"] for k in ("mask_threshold", "start", "end", "decoder_levels")}

    def decoded(self, latent):
        (images,) = self.run("VAEDecode", vae=self.vae, samples=latent)[0]
        return images.clamp(0, 1)

    def open_diversity(self, method: str, concept, sample) -> None:
        """Layout diversity of ``sample(seed)`` (a batch for the open prompt) over ``--open-batches`` seeds."""
        images = np.concatenate([sample(5000 + 97 * k) for k in range(self.args.open_batches)])
        self.diversity.setdefault(method, []).append(layout_diversity(images, concept.class_noun))


class EncoderRows:
    """The trained rows in order, then the concept-encoder rows: ``encoder`` (DCI Encode Concept on the training
    renders; no weight changes, so its Fisher divergence is 0 by construction and is not measured) and ICO
    started from its rows at a quarter and at the full budget."""

    def encoded(self, name: str, concept):
        if getattr(self, "_encoder", None) is None:
            (self._encoder,) = self.run("DCILoadConceptEncoder", encoder_name=self.args.encoder)[0]
        t0 = time.perf_counter()
        model, clip, ref, report = self.run(
            "DCIEncodeConcept", model=self.model, clip=self.clip, encoder=self._encoder,
            images=self.training_renders(concept), class_noun=concept.class_noun, trigger_word=TRIGGER,
            save_name="", overwrite=False)[0]
        self._tick("encode", t0)
        self.notes.append(f"{name}: {report}")
        return model, clip, ref

    def trained_rows(self, methods: list[str], name: str, concept):
        """(label, MODEL, CLIP, concept) of every trained or encoded row ``methods`` asks for."""
        quarter = max(1, self.args.train_steps // 4)
        for mode, label in (("custom_diffusion", "cd"), ("ico", "ico"), ("infusion", "infusion")):
            if label in methods:
                yield (label, *self.train(mode, name, concept))
        if "ico_quarter" in methods:
            yield ("ico_quarter", *self.train("ico", name, concept, label="ico_quarter", steps=quarter))
        if not {"encoder", "ico_from_encoder"} & set(methods):
            return
        encoded = self.encoded(name, concept)
        if "encoder" in methods:
            self.fisher[("encoder", name)] = (0.0, 0.0)
            yield ("encoder", *encoded)
        if "ico_from_encoder" in methods:
            for label, steps in (("ico_from_encoder_quarter", quarter), ("ico_from_encoder", self.args.train_steps)):
                yield (label, *self.train("ico", name, concept, label=label, steps=steps, start_concept=encoded[2]))


class OverfittingRows:
    """The Fisher divergence of each trained model and W2 of each row against the base row."""

    def fisher_prompts(self) -> str:
        """Captions of base-world scenes that name no concept: the prompts of the Fisher divergence."""
        if self._fisher_prompts is None:
            from dci.toyworld.render import caption, sample_scenes

            from .toyworld.concepts import concept_looks

            scenes = sample_scenes(self.args.fisher_prompts, FISHER_SEED, excluded_looks=concept_looks())
            self._fisher_prompts = "\n".join(caption(sc) for sc in scenes)
        return self._fisher_prompts

    def measure_fisher(self, method: str, name: str, model, clip) -> None:
        """DCI Fisher Divergence of ``model`` against the base MODEL (same settings for every method)."""
        from dci.toyworld.render import IMAGE_SIZE

        a = self.args
        t0 = time.perf_counter()
        eps, score, _ = self.run("DCIFisherDivergence", base_model=self.model, custom_model=model, clip=clip,
                                 prompts=self.fisher_prompts(), seeds_per_prompt=2, seed=0,
                                 noise_levels=a.fisher_levels, sample_steps=a.steps, cfg=a.cfg, width=IMAGE_SIZE,
                                 height=IMAGE_SIZE, sampler_name=a.sampler, scheduler="normal")[0]
        self.fisher[(method, name)] = (eps, score)
        self._tick("fisher", t0)

    def measure_w2(self, method: str, name: str) -> tuple[float, float]:
        """DCI Wasserstein of this row's images against the base row's, same scenes and seeds."""
        import torch

        mine, base = self.images.get((method, name)), self.images.get(("base", name))
        if not mine or not base or len(mine) != len(base):
            return float("nan"), float("nan")
        t0 = time.perf_counter()

        def batch(arrays):
            return torch.from_numpy(np.concatenate(arrays).astype(np.float32) / 255.0)

        prompts = "\n".join(f"prompt {i}" for i in range(len(mine)))
        w2, per, _ = self.run("DCIWasserstein", concept_images=batch(mine), class_images=batch(base),
                              shrinkage="auto", prompts=prompts)[0]
        self._tick("w2", t0)
        return w2, per

    def overfitting(self, methods: list[str], concepts: list[str]) -> dict[str, dict[str, float]]:
        """Per method: fisher and fisher_score (its trained model's, or the base model's; mean over concepts),
        w2 and w2_per_prompt (mean over concepts)."""
        out = {}
        for m in methods:
            trained = m.split("+", 1)[0]
            base_model = trained in ("base", "base_desc")  # both sample the base model itself
            values = [self.fisher.get(("base", "") if base_model else (trained, c)) for c in concepts]
            values = [v for v in values if v is not None]
            w2 = [self.measure_w2(m, c) for c in concepts]
            out[m] = {
                "fisher": float(np.mean([v[0] for v in values])) if values else float("nan"),
                "fisher_score": float(np.mean([v[1] for v in values])) if values else float("nan"),
                "w2": float(np.nanmean([v[0] for v in w2])) if w2 else float("nan"),
                "w2_per_prompt": float(np.nanmean([v[1] for v in w2])) if w2 else float("nan"),
            }
        return out
