"""``make bench-quality``: fidelity and editability of the methods on the toy world, through the real nodes.

One process, in-process ComfyUI (``dev.harness``), the toy model from DCI Toy World Loader. For each concept
of ``dev.toyworld.concepts`` (5 narrow-context training renders each):

- ``base``: the base model with the class prompt ("a large circle at the left on a green background"): the
  editability a model has without the concept, and the fidelity of "just the class" (the scale's 0);
- ``base_desc``: the base model with the concept's full nameable description ("a large red circle with
  yellow stripes and a blue star emblem at the left ..."): what words alone reach;
- ``cd``: DCI Train Concept, mode custom_diffusion (caption "a sks circle": ``--prefix``, default the toy world's
  own caption start "a"; the node's default "photo of a" is SD's, which the toy world's captions never use;
  ``--caption scene``: the world's caption of the training renders' scene, "a large sks circle in the centre
  on a white background", as a user captions photos that share a scene);
- ``ico``: DCI Train Concept, mode ico (per-image contexts);
- ``infusion``: DCI Train Concept, mode infusion (one residual vector per cross-attention layer on the values
  at the trigger's tokens; keys locked), at its own learning rate (``--infusion-lr``: the default gives the
  official code's 0.01 per step);
- opt-in: ``encoder`` (DCI Encode Concept on the same renders: zero-shot, no weight change),
  ``ico_from_encoder`` (rows ``ico_from_encoder_quarter`` and ``ico_from_encoder``: ICO whose token rows start
  from the encoded ones, at a quarter and at the full budget) and ``ico_quarter`` (plain ICO at a quarter);

and each trained concept sampled with the stock KSampler and with DCI KSampler over a small split/λ sweep
(``--dci``; separate guidance, reference map (the context words) and normalisation unless a row says
otherwise; auxiliary noun: another shape word). Every method gets the same training budget (steps, batch,
learning rate, seed) and the same sampler settings (steps, CFG, sampler, the world's size, seeds). Prompts are
the concept's evaluation scenes (other positions and backgrounds than the training renders, both sizes),
spread evenly. ``--mask``: every method trains with a foreground-masked loss (the trainer's ``mask`` input gets
the renders' object masks, each shape's half-extent grown by 4 px), as Infusion's official code trains
(the ``encoder`` rows train nothing).

Layout-and-Retouch rows (opt-in, ``--retouch``): each trained concept (``cd+lr_…``, ``ico+lr_…``,
``infusion+lr_…``) through DCI Layout KSampler (the base model for the first λ1 of the steps: ``lr_s<λ1>``) or DCI
KSampler (``lr_dci_a<split>_l<λ>``: the context from DCI, inverted), then DCI Retouch Model with the inverted
first training render as the reference, at the nodes' default retouch settings.

Layout diversity (every method): the concept (or class, or description) asked with nothing about position,
size or background ("a sks circle"), ``--open-batches`` batches of ``--seeds`` images; for each of position,
size and background the share of image pairs that differ, averaged: 0 = every image laid out alike.

Metrics (``dev.toyworld.fidelity``): fidelity (the object looks like the instance, 0..1), editability
(background, position and size as the prompt asks), prompt_acc (those plus the concept's colours). The two
ends of the fidelity scale are measured in the same run: the floor is the class prompt's fidelity (the
``base`` row), the ceiling the fidelity of clean renders of the instance in the evaluation scenes after one
VAE encode → decode (what a perfect model could score through this VAE). ``fid_norm`` is fidelity on that
scale, (fidelity − floor) / (ceiling − floor).

Overfitting (Infusion's two metrics, as ``dci.method.overfitting`` reconstructs them), for every row:
``fisher`` (DCI Fisher Divergence: the row's MODEL against the base MODEL on ``--fisher-prompts`` base-world
captions that do not name any concept, ε space, mean over concepts; a DCI row shares its trained model's value,
since DCI only changes how concept prompts are sampled) and ``w2`` (DCI Wasserstein on toy-world scene
descriptors: the row's images of the concept against the ``base`` row's class-prompt images of the same scenes
and seeds, per concept, mean over concepts; ``w2_per_prompt``: the per-prompt variant).

Prints a table (mean ± standard error over images, and the per-concept fidelity), then, last, the scale's
ends and one line per method:
fidelity_floor=<0..1> fidelity_ceiling=<0..1>
method=<name> fidelity=<0..1> editability=<0..1> prompt_acc=<0..1> fid_norm=<..> fisher=<..> w2=<..>
  fisher_score=<..> w2_per_prompt=<..> diversity=<0..1>

Usage: python -m dev.bench_quality [--model FILE] [--concepts 3] [--prompts 8] [--seeds 4] [--steps 20]
       [--train-steps 600] [--mask] [--dci 0.3:0,0.3:-1,0.3:1:noun,0.3:1:px,0.3:1:base] [--retouch 0.2,0.3,0.5,dci:0.3:1]
       [--open-batches 2] [--infusion-lr 2.5e-6] [--fisher-prompts 4] [--fisher-levels 4] [--threads 1]
       [--grid out.png] [--plot out.png]
(``python3 -m dev.grid LOG [LOG …] --out out.png --rows …`` redraws the plot from the printed lines.)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from . import harness
from .bench_rows import (
    TRIGGER,
    EncoderRows,
    OverfittingRows,
    RetouchRows,
    dci_label,
    dci_sweep,
    lr_label,
    lr_sweep,
    open_prompt,
)
from .grid import labelled_grid

# The toy world's dev modules import dci.toyworld, so they are imported after harness.boot() has ComfyUI load
# the pack (the pack must exist once in this process).


# The shared training budget of every method (see docs/benchmarks.md for how it was chosen). No flips: the
# concepts' emblems sit at the upper left or right, and fidelity tells a mirrored instance apart. The caption
# starts as the world's own captions do ("a"): measured in docs/benchmarks.md, "photo of a" (words the toy
# world never saw) keeps the concept from carrying into the evaluation prompts. ICO's contexts learn at 0.01 × the
# K/V rate: measured in docs/benchmarks.md, the reference's 10 (for real models at 1e-5) lets them absorb the
# concept at this budget's 1e-3; the trainer node's own default stays 10.
TRAIN = dict(num_tokens=2, prefix_context="a", suffix_context=".", batch_size=4,
             learning_rate=1e-3, context_lr_multiplier=0.01, resolution=128, seed=0, precision="fp32",
             gradient_checkpointing=False, overwrite=True, resume=False, checkpoint_every=0, random_flip=False)
N_TRAIN_IMAGES = 5
TRAIN_RENDER_SEED = 0  # the training renders and, under --mask, their masks: one seed, so they line up
# The sweep (see docs/benchmarks.md): split 0.3 (the reference default) at λ 0 (the reference default), -1, 1
# and 2; split 0.5 at λ 1; then one change each at 0.3, λ 1: the noun reading, pixel_count normalisation, the
# auxiliary branch on the base model's K/V; and λ 2 on the base model's K/V at splits 0.3, 0.5 and 0.7 (the best
# ICO rows; 0.7 is the demo's setting).
DEFAULT_DCI = "0.3:0,0.3:-1,0.3:1,0.3:2,0.5:1,0.3:1:noun,0.3:1:px,0.3:1:base,0.3:2:base,0.5:2:base,0.7:2:base"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=None,
                   help="a toy-world .safetensors file (default: the bundled assets/toyworld/toyworld_base)")
    p.add_argument("--concepts", default="4", help="how many concepts (first N), or a comma list of names")
    p.add_argument("--prompts", type=int, default=12, help="evaluation prompts per concept")
    p.add_argument("--seeds", type=int, default=4, help="seeds per prompt (one batch)")
    p.add_argument("--steps", type=int, default=20, help="sampling steps")
    p.add_argument("--cfg", type=float, default=4.5, help="CFG scale")
    p.add_argument("--sampler", default="euler", help="sampler name")
    p.add_argument("--train-steps", type=int, default=600, help="training steps per concept and method")
    p.add_argument("--lr", type=float, default=TRAIN["learning_rate"], help="per-image learning rate")
    p.add_argument("--context-lr", type=float, default=TRAIN["context_lr_multiplier"],
                   help="ico: its learned contexts' learning rate as a multiple of --lr")
    p.add_argument("--prefix", default=TRAIN["prefix_context"],
                   help="the training captions' words before the trigger: the fixed words of cd and infusion, "
                        "the starting words of ico's learned prefix ('a' is the toy world's own caption start)")
    p.add_argument("--caption", choices=("short", "scene"), default="short",
                   help="the training caption: short ('<prefix> sks circle'), or scene (the world's caption of the "
                        "training renders' shared scene around 'sks circle', e.g. 'a large sks circle in the centre "
                        "on a white background'; replaces --prefix): the fixed words of cd and infusion, the "
                        "starting words of ico's contexts")
    p.add_argument("--mask", action="store_true",
                   help="train every method with a foreground-masked loss: the trainer's mask input gets the "
                        "training renders' object masks (half-extents grown by 4 px), so the background adds no loss")
    p.add_argument("--dci", default=DEFAULT_DCI,
                   help="DCI settings to sweep, 'split:λ[:ref|px][:base][:noun]' comma list (px: pixel_count "
                        "normalisation; base: the auxiliary branch on the base model's K/V; noun: the auxiliary map "
                        "from the auxiliary noun instead of the context words; empty: no DCI)")
    p.add_argument("--methods", default="base,base_desc,cd,ico,infusion",
                   help="comma list of base, base_desc, cd, ico, infusion, ico_quarter (ICO at a quarter of the "
                        "budget), encoder (DCI Encode Concept, no training), ico_from_encoder (ICO started from the "
                        "encoded rows, at a quarter and at the full budget)")
    p.add_argument("--encoder", default="toyworld_concept_encoder.safetensors",
                   help="the concept encoder of the encoder rows (DCI Load Concept Encoder's name)")
    p.add_argument("--infusion-lr", type=float, default=2.5e-6,
                   help="per-image learning rate of infusion (× batch × 1000 = its vectors' step size; the "
                        "default gives 0.01, the official code's rate)")
    p.add_argument("--fisher-prompts", type=int, default=4,
                   help="non-concept prompts of the Fisher divergence (2 seeds each)")
    p.add_argument("--fisher-levels", type=int, default=4, help="noise levels of the Fisher divergence")
    p.add_argument("--retouch", default="",
                   help="Layout-and-Retouch rows (opt-in), comma list: a λ1 (the share of steps on the base model, "
                        "e.g. 0.3) or 'dci:split:λ' (the context from DCI KSampler); empty: none")
    p.add_argument("--open-batches", type=int, default=2,
                   help="batches of --seeds images per method and concept for the layout-diversity column")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads; 1 is fastest for this tiny model when other work shares the cores")
    p.add_argument("--grid", type=Path, default=None, help="write a PNG grid of the first seed's samples here")
    p.add_argument("--plot", type=Path, default=None, help="write a fidelity × editability plot (PNG) here")
    return p.parse_args(argv)


def aux_noun(class_noun: str) -> str:
    """Another shape word of the toy world: the auxiliary branch's noun must be a word the model knows."""
    from dci.toyworld.render import SHAPES

    return next(s for s in ("square", "circle", *SHAPES) if s != class_noun)


def pick_scenes(concept, n: int):
    """``n`` evaluation scenes spread evenly over the list (which is ordered by position, then background)."""
    from .toyworld.concepts import evaluation_scenes

    scenes = evaluation_scenes(concept)
    if n >= len(scenes):
        return scenes
    return [scenes[int(i * len(scenes) / n)] for i in range(n)]


class Bench(RetouchRows, OverfittingRows, EncoderRows):
    def __init__(self, args) -> None:
        harness.boot()
        import torch

        torch.set_num_threads(args.threads)
        self.run = harness.run_node
        self.args = args
        self.model, self.clip, self.vae = self.run("DCIToyWorldLoader", model_name=self.model_name())[0]
        (self.negative,) = self.run("CLIPTextEncode", clip=self.clip, text="")[0]
        self.records: list[dict] = []
        self.ceilings: list[float] = []
        self._meters: dict = {}
        self.timings: dict[str, float] = {}
        self.grid: dict[str, list[np.ndarray]] = {}
        self.images: dict[tuple[str, str], list[np.ndarray]] = {}  # (method, concept) → one batch per prompt
        self.fisher: dict[tuple[str, str], tuple[float, float]] = {}  # (trained method, concept) → (ε, score)
        self._fisher_prompts: str | None = None
        self.diversity: dict[str, list[float]] = {}
        self.notes: list[str] = []

    def model_name(self) -> str:
        if self.args.model is None:
            return "toyworld_base.safetensors"
        return harness.add_model_file(self.args.model, name="toyworld/bench_model.safetensors")

    def _tick(self, key: str, t0: float) -> None:
        self.timings[key] = self.timings.get(key, 0.0) + time.perf_counter() - t0

    def sample(self, model, positive, seed: int, dci: tuple[float, float, str, bool, str] | None) -> np.ndarray:
        """One batch of ``--seeds`` images; uint8 [B, S, S, 3]."""
        from dci.toyworld.render import IMAGE_SIZE

        a = self.args
        (latent,) = self.run("EmptyLatentImage", width=IMAGE_SIZE, height=IMAGE_SIZE, batch_size=a.seeds)[0]
        common = dict(model=model, seed=seed, steps=a.steps, cfg=a.cfg, sampler_name=a.sampler, scheduler="normal",
                      positive=positive, negative=self.negative, latent_image=latent, denoise=1.0)
        if dci is None:
            (out,) = self.run("KSampler", **common)[0]
        else:
            extra = {"aux_model": self.model} if dci[3] else {}
            (out,) = self.run("DCIKSampler", **common, split=dci[0], lam=dci[1], aux_map=dci[4],
                              guidance="separate", aux_seed=seed + 7919, normalization=dci[2], **extra)[0]
        (images,) = self.run("VAEDecode", vae=self.vae, samples=out)[0]
        return (images.clamp(0, 1).numpy() * 255).round().astype(np.uint8)

    def decode(self, latent) -> np.ndarray:
        (images,) = self.run("VAEDecode", vae=self.vae, samples=latent)[0]
        return (images.clamp(0, 1).numpy() * 255).round().astype(np.uint8)

    def meter(self, name: str, concept):
        from .toyworld import fidelity as fid

        return self._meters.setdefault(name, fid.FidelityMeter(concept))

    def ceiling(self, name: str, concept, scenes) -> None:
        """Clean renders of the instance in the evaluation scenes, through VAEEncode → VAEDecode: the best
        fidelity a model can reach through this VAE."""
        import torch

        from dci.toyworld.render import render_scene

        pixels = torch.from_numpy(np.stack([render_scene(s) for s in scenes]).astype(np.float32) / 255.0)
        (latent,) = self.run("VAEEncode", vae=self.vae, pixels=pixels)[0]
        (images,) = self.run("VAEDecode", vae=self.vae, samples=latent)[0]
        decoded = (images.clamp(0, 1).numpy() * 255).round().astype(np.uint8)
        meter = self.meter(name, concept)
        self.ceilings.extend(meter(img) for img in decoded)

    def score(self, method: str, name: str, concept, prompt: str, images: np.ndarray) -> None:
        from .toyworld import fidelity as fid

        meter = self.meter(name, concept)
        for img in images:
            self.records.append({
                "method": method, "concept": name, "fidelity": meter(img),
                "editability": fid.mean_score(fid.editability_scores(img, prompt, concept)),
                "prompt_acc": fid.mean_score(fid.prompt_scores(img, prompt, concept)),
            })
        self.grid.setdefault(method, []).append(images[0])
        self.images.setdefault((method, name), []).append(images)

    def caption_context(self, concept) -> dict[str, str]:
        """The trainer's prefix_context/suffix_context for ``--caption`` (short: ``--prefix`` and ICO's ".")."""
        if self.args.caption == "scene":
            from .toyworld.concepts import training_caption_words

            prefix, suffix = training_caption_words(concept, TRIGGER)
            return {"prefix_context": prefix, "suffix_context": suffix}
        return {"prefix_context": self.args.prefix, "suffix_context": TRAIN["suffix_context"]}

    def train(self, mode: str, name: str, concept, label: str = "", steps: int = 0, **extra):
        """DCI Train Concept on the concept's training renders (``label``: the row, ``mode`` by default; ``steps``:
        the budget, ``--train-steps`` by default; ``extra``: more node inputs, e.g. start_concept)."""
        label, steps = label or mode, steps or self.args.train_steps
        t0 = time.perf_counter()
        model, clip, ref, _ = self.run(
            "DCITrainConcept", model=self.model, clip=self.clip, vae=self.vae, images=self.training_renders(concept),
            class_noun=concept.class_noun, trigger_word=TRIGGER, mode=mode, steps=steps,
            save_name=f"bench_quality_{label}_{name}", **extra, **self.training_mask(concept),
            **{**TRAIN, **self.caption_context(concept),
               "learning_rate": self.args.infusion_lr if mode == "infusion" else self.args.lr,
               "context_lr_multiplier": self.args.context_lr})[0]
        self._tick(f"train {label}", t0)
        return model, clip, ref

    def training_mask(self, concept) -> dict:
        """The trainer's ``mask`` input under ``--mask`` (the renders' object masks), else nothing."""
        if not self.args.mask:
            return {}
        import torch

        from .toyworld.concepts import training_masks

        return {"mask": torch.from_numpy(training_masks(concept, N_TRAIN_IMAGES, seed=TRAIN_RENDER_SEED))}

    @staticmethod
    def training_renders(concept):
        import torch

        from .toyworld.concepts import training_images

        return torch.from_numpy(training_images(concept, N_TRAIN_IMAGES, seed=TRAIN_RENDER_SEED).astype(np.float32) / 255.0)

    def run_all(self) -> None:
        from dci.toyworld.render import caption

        from .toyworld.concepts import CONCEPTS, concept_prompt, description_prompt

        a = self.args
        names = (list(CONCEPTS)[: int(a.concepts)] if a.concepts.isdigit()
                 else [n.strip() for n in a.concepts.split(",") if n.strip()])
        unknown = [n for n in names if n not in CONCEPTS]
        if unknown:
            sys.exit(f"unknown concepts {unknown}; choose from {', '.join(CONCEPTS)}")
        methods = [m.strip() for m in a.methods.split(",") if m.strip()]
        sweep = dci_sweep(a.dci)
        lr_rows = lr_sweep(a.retouch)
        for name in names:
            concept = CONCEPTS[name]
            scenes = pick_scenes(concept, a.prompts)
            self.ceiling(name, concept, scenes)
            if any(m in methods for m in ("base", "base_desc")) and ("base", "") not in self.fisher:
                self.measure_fisher("base", "", self.model.clone(), self.clip)
            for label, words in (("base", lambda sc, concept=concept: caption(sc, noun=concept.class_noun)),
                                 ("base_desc", lambda sc, concept=concept: description_prompt(sc, concept))):
                if label not in methods:
                    continue
                t0 = time.perf_counter()
                for i, scene in enumerate(scenes):
                    (pos,) = self.run("CLIPTextEncode", clip=self.clip, text=words(scene))[0]
                    self.score(label, name, concept, concept_prompt(scene, TRIGGER, concept),
                               self.sample(self.model, pos, 1000 + i, None))
                open_text = open_prompt(concept.class_noun if label == "base" else concept.description())
                (open_pos,) = self.run("CLIPTextEncode", clip=self.clip, text=open_text)[0]
                self.open_diversity(label, concept, lambda seed, p=open_pos: self.sample(self.model, p, seed, None))
                self._tick("sample plain", t0)
            for label, model, clip, ref in self.trained_rows(methods, name, concept):
                if (label, name) not in self.fisher:
                    self.measure_fisher(label, name, model, clip)
                open_text = open_prompt(f"{TRIGGER} {concept.class_noun}")
                t0 = time.perf_counter()
                (open_pos,) = self.run("CLIPTextEncode", clip=clip, text=open_text)[0]
                self.open_diversity(label, concept, lambda seed, p=open_pos, m=model: self.sample(m, p, seed, None))
                self._tick("sample plain", t0)
                if sweep:
                    t0 = time.perf_counter()
                    (open_dpos,) = self.run("DCIPromptEncode", clip=clip, text=open_text,
                                            auxiliary_noun=aux_noun(concept.class_noun), concept=ref)[0]
                    for row in sweep:
                        self.open_diversity(f"{label}+{dci_label(row)}", concept,
                                            lambda seed, p=open_dpos, m=model, r=row: self.sample(m, p, seed, r))
                    self._tick("sample dci", t0)
                ref_traj = self.reference(model, clip, name, concept) if lr_rows else None
                lr_prefix = f"{label}+"
                for row in lr_rows:
                    t0 = time.perf_counter()
                    self.open_diversity(
                        lr_prefix + lr_label(row), concept,
                        lambda seed, m=model, c=clip, r=ref, t=ref_traj, row=row, p=open_text: self.sample_lr(
                            m, c, r, t, p, seed, row))
                    self._tick("sample lr", t0)
                for i, scene in enumerate(scenes):
                    prompt = concept_prompt(scene, TRIGGER, concept)
                    t0 = time.perf_counter()
                    (pos,) = self.run("CLIPTextEncode", clip=clip, text=prompt)[0]
                    self.score(label, name, concept, prompt, self.sample(model, pos, 1000 + i, None))
                    self._tick("sample plain", t0)
                    if sweep:
                        t0 = time.perf_counter()
                        (dpos,) = self.run("DCIPromptEncode", clip=clip, text=prompt,
                                           auxiliary_noun=aux_noun(concept.class_noun), concept=ref)[0]
                        for row in sweep:
                            self.score(f"{label}+{dci_label(row)}", name, concept, prompt,
                                       self.sample(model, dpos, 1000 + i, row))
                        self._tick("sample dci", t0)
                    for row in lr_rows:
                        t0 = time.perf_counter()
                        self.score(lr_prefix + lr_label(row), name, concept, prompt,
                                   self.sample_lr(model, clip, ref, ref_traj, prompt, 1000 + i, row))
                        self._tick("sample lr", t0)
            print(f"# {name} done; cumulative timings " + ", ".join(f"{k} {v:.0f}s" for k, v in self.timings.items()),
                  flush=True)

    def report(self) -> None:
        methods = list(dict.fromkeys(r["method"] for r in self.records))
        concepts = list(dict.fromkeys(r["concept"] for r in self.records))
        keys = ("fidelity", "editability", "prompt_acc")
        width = max(len(m) for m in methods) + 2
        summary = self.overfitting(methods, concepts)
        print()
        print(f"{'method':<{width}}" + "".join(f"{k:>16}" for k in keys) + f"{'fisher':>11}{'w2':>9}"
              + "   fidelity per concept (" + ", ".join(concepts) + ")   n")
        for m in methods:
            rows = [r for r in self.records if r["method"] == m]
            cells = []
            for k in keys:
                v = np.array([r[k] for r in rows])
                se = v.std(ddof=1) / np.sqrt(len(v)) if len(v) > 1 else 0.0
                cells.append(f"{v.mean():>9.3f} ±{se:.3f}")
                summary.setdefault(m, {})[k] = float(v.mean())
            per = [np.mean([r["fidelity"] for r in rows if r["concept"] == c]) for c in concepts]
            print(f"{m:<{width}}" + "".join(f"{c:>16}" for c in cells)
                  + f"{summary[m]['fisher']:>11.3g}{summary[m]['w2']:>9.3f}" + "   " +
                  " ".join(f"{p:.3f}" for p in per) + f"   {len(rows)}")
        print("(mean ± standard error over images; fisher: ε-space latent Fisher divergence against the base "
              "model on non-concept prompts; w2: Gaussian W2 of scene descriptors against the base row's images; "
              "both means over concepts. Timings: " +
              ", ".join(f"{k} {v:.0f}s" for k, v in self.timings.items()) + ")")
        floor = summary.get("base", {}).get("fidelity", float("nan"))
        ceiling = float(np.mean(self.ceilings)) if self.ceilings else float("nan")
        span = ceiling - floor
        for m in methods:
            summary[m]["fid_norm"] = (summary[m]["fidelity"] - floor) / span if span > 0 else float("nan")
        print(f"fidelity scale: floor {floor:.3f} (class prompt), ceiling {ceiling:.3f} (VAE round trips of clean "
              f"instance renders, n {len(self.ceilings)}); fid_norm = (fidelity - floor) / (ceiling - floor)")
        print("layout diversity (the open prompt, share of image pairs that differ in position, size, background; "
              "mean over concepts): " + ", ".join(
                  f"{m} {np.mean(self.diversity[m]):.3f}" for m in methods if self.diversity.get(m)))
        for note in self.notes:
            print(f"# {note}")
        if self.args.grid:
            self.write_grid(self.args.grid)
        if self.args.plot:
            from .grid import scatter_plot

            scatter_plot({m: (summary[m]["fidelity"], summary[m]["editability"]) for m in methods},
                         (floor, ceiling)).save(self.args.plot, optimize=True)
            print(f"plot: {self.args.plot}")
        print()
        print(f"fidelity_floor={floor:.3f} fidelity_ceiling={ceiling:.3f}")
        for m in methods:
            s = summary[m]
            div = float(np.mean(self.diversity[m])) if self.diversity.get(m) else float("nan")
            print(f"method={m.replace(' ', '')} fidelity={s['fidelity']:.3f} editability={s['editability']:.3f} "
                  f"prompt_acc={s['prompt_acc']:.3f} fid_norm={s['fid_norm']:.3f} fisher={s['fisher']:.4g} "
                  f"w2={s['w2']:.4f} fisher_score={s['fisher_score']:.4g} w2_per_prompt={s['w2_per_prompt']:.4f} "
                  f"diversity={div:.3f}")

    def write_grid(self, path: Path) -> None:
        rows = [(m, np.concatenate(v, axis=1)) for m, v in self.grid.items()]
        labelled_grid(rows).save(path, optimize=True)
        print(f"grid (one row per method, first seed of every prompt): {path}")


def main() -> None:
    args = parse_args()
    t0 = time.perf_counter()
    bench = Bench(args)
    bench.run_all()
    bench.report()
    print(f"# total {time.perf_counter() - t0:.0f}s", file=sys.stderr)


if __name__ == "__main__":
    main()
