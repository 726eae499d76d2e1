"""Quick check of a toy-world base model: prompt accuracy measured from pixels, sampled by ComfyUI itself.

Prompts ask for (shape, colour, background) triples that base training never showed (``held_out``), at
every position and size; a quarter are plain, a quarter add a pattern, a quarter an emblem, a quarter both.
Images come from the stock KSampler node and VAEDecode at the world's size; ``dev.toyworld.metrics``
reads background, object colour, size, position and the decorations' colours back. The VAE's own ceiling
is printed beside it (clean renders through VAEEncode → VAEDecode), and ``--vae`` prints only the VAE's
report: PSNR, every reader on clean and round-tripped renders, and each concept's fidelity after a round
trip against the clean renders' (``--vae-ckpt`` reads a VAE checkpoint of a training work folder).

Usage: python3 dev/host.py python -m dev.toyworld.eval_base [--model FILE] [--prompts 48] [--seeds 2] [--grid PNG]
       python3 dev/host.py python -m dev.toyworld.eval_base --layout-probe [--model FILE]
       python3 dev/host.py python -m dev.toyworld.eval_base --vae [--model FILE | --vae-ckpt WORK/vae.safetensors]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # run as a file rather than with -m
    sys.path.insert(0, str(REPO))


def held_out_prompts(n: int, seed: int) -> list[str]:
    """``n`` full captions of held-out triples, positions and sizes cycled, decorations in four kinds."""
    from dci.toyworld import render as r

    triples = [
        (s, c, b) for s in r.SHAPES for c in r.COLOURS for b in r.COLOURS if c != b and r.held_out(s, c, b)
    ]
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(triples))
    prompts = []
    for i in range(n):
        shape, colour, bg = triples[order[i % len(triples)]]
        others = [x for x in r.COLOURS if x not in (colour, bg)]
        picks = rng.permutation(others)[:2]
        pattern, second = ("plain", None)
        if i % 4 in (1, 3):
            pattern, second = r.PATTERNS[1 + int(rng.integers(len(r.PATTERNS) - 1))], str(picks[0])
        emblem = emblem_colour = None
        if i % 4 in (2, 3):
            emblem, emblem_colour = r.EMBLEM_SHAPES[int(rng.integers(len(r.EMBLEM_SHAPES)))], str(picks[1])
        obj = r.ObjectSpec(
            shape=shape,
            colour=colour,
            pattern=pattern,
            pattern_colour=second,
            emblem=emblem,
            emblem_colour=emblem_colour,
            size=r.SIZES[(i // 4) % 2],
            position=r.POSITIONS[i % len(r.POSITIONS)],
        )
        prompts.append(r.caption(r.SceneSpec(obj, background=bg)))
    return prompts


def sample(
    model, clip, vae, prompt: str, seeds: int, seed: int, steps: int, cfg: float, sampler: str, scheduler: str
) -> np.ndarray:
    """``seeds`` images for one prompt through the stock nodes; uint8 [B, S, S, 3]."""
    import nodes

    from dci.toyworld.render import IMAGE_SIZE

    pos = nodes.CLIPTextEncode().encode(clip, prompt)[0]
    neg = nodes.CLIPTextEncode().encode(clip, "")[0]
    latent = nodes.EmptyLatentImage().generate(IMAGE_SIZE, IMAGE_SIZE, seeds)[0]
    out = nodes.KSampler().sample(model, seed, steps, cfg, sampler, scheduler, pos, neg, latent)[0]
    images = nodes.VAEDecode().decode(vae, out)[0]
    return (images.clamp(0, 1).numpy() * 255).round().astype(np.uint8)


def comfy_roundtrip(vae):
    """uint8 images [B,S,S,3] → the same through a ComfyUI VAE's encode and decode."""

    def run(images: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(images).float() / 255.0
        rec = vae.decode(vae.encode(t)).clamp(0, 1).numpy()
        return (rec * 255).round().astype(np.uint8)

    return run


def vae_ceiling(roundtrip, prompts: list[str]) -> dict[str, float]:
    """Accuracy on clean renders of the prompts after a VAE round trip: the best the sampler can reach."""
    from dci.toyworld import render
    from dev.toyworld import metrics

    clean = np.stack([render.render_scene(render.scene_from_caption(p, np.random.default_rng(i)))
                      for i, p in enumerate(prompts)])
    rec = np.concatenate([roundtrip(clean[i : i + 16]) for i in range(0, len(clean), 16)])
    scores = [metrics.score_reading(metrics.read_scene(im), render.parse_caption(p)) for im, p in zip(rec, prompts, strict=True)]
    return metrics.accuracy(scores)


def vae_report(roundtrip, n_prompts: int = 96, seed: int = 7) -> dict[str, float]:
    """PSNR, readers on clean vs round-tripped renders, and each concept's fidelity ceiling; printed."""
    from dci.toyworld import render
    from dev.toyworld import concepts, fidelity, metrics

    prompts = held_out_prompts(n_prompts, seed)
    clean = np.stack([render.render_scene(render.scene_from_caption(p, np.random.default_rng(i)))
                      for i, p in enumerate(prompts)])
    clean_acc = metrics.accuracy([metrics.score_reading(metrics.read_scene(im), render.parse_caption(p))
                                  for im, p in zip(clean, prompts, strict=True)])
    rt_acc = vae_ceiling(roundtrip, prompts)
    rec = np.concatenate([roundtrip(clean[i : i + 16]) for i in range(0, len(clean), 16)])
    mse = ((rec.astype(np.float64) - clean) ** 2).mean() / 255.0**2
    out = {"psnr": -10 * np.log10(mse)}
    print(f"VAE round trip of {len(prompts)} held-out renders: PSNR {out['psnr']:.2f} dB")
    print(f"{'reader':<16}{'clean':>8}{'round trip':>12}")
    for k in clean_acc:
        print(f"{k:<16}{clean_acc[k]:>8.1%}{rt_acc.get(k, float('nan')):>12.1%}")
        out[f"reader_{k}"] = rt_acc.get(k, float("nan"))
    ratios = []
    for name, concept in concepts.CONCEPTS.items():
        meter = fidelity.FidelityMeter(concept)
        scenes = concepts.evaluation_scenes(concept)
        imgs = np.stack([render.render_scene(sc) for sc in scenes])
        f_clean = float(np.mean([meter(im) for im in imgs]))
        f_rt = float(np.mean([meter(im) for im in roundtrip(imgs)]))
        ratios.append(f_rt / f_clean)
        out[f"fidelity_{name}"] = f_rt
        print(f"concept {name:<6} fidelity clean {f_clean:.3f} round trip {f_rt:.3f} ratio {f_rt / f_clean:.3f}")
    out["fidelity_ratio_min"] = min(ratios)
    return out


def taesd_from_work_checkpoint(path: Path):
    """The raw TAESD round trip of a VAE training checkpoint (weights under ``w.enc.`` / ``w.dec.``)."""
    from safetensors.torch import load_file

    from dci.toyworld import model as tm

    sd = load_file(str(path))
    taesd = tm.build_taesd()
    if "w.enc.0.weight" in sd:
        taesd.taesd_encoder.load_state_dict({k[6:]: v for k, v in sd.items() if k.startswith("w.enc.")})
        taesd.taesd_decoder.load_state_dict({k[6:]: v for k, v in sd.items() if k.startswith("w.dec.")})
    else:  # a finished stage's vae.safetensors
        sd.pop("_latents", None)
        taesd.load_state_dict(sd)
    taesd.eval()

    def run(images: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
        rec = taesd.taesd_decoder(taesd.taesd_encoder(x)).clamp(0, 1)
        return (rec.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)

    return run


def layout_probe(model, clip, vae, n: int = 8, seed: int = 0) -> None:
    """Does the prompt move the object? The model's denoised estimate D(x; σ) from the same noise for
    "... at the left/right/top/bottom ..." at a few noise levels: hits (position read from pixels equals the
    word) and mean object centroid per word, and mean |D_left - D_right| against D's spread. A model that
    ignores position words prints the same centroid for every word."""
    from dev.toyworld import metrics

    base = model.model
    sampling = base.model_sampling
    from dci.toyworld.render import IMAGE_SIZE

    side = IMAGE_SIZE // 8
    noise = torch.randn(n, 4, side, side, generator=torch.Generator().manual_seed(seed))
    words = ("left", "right", "top", "bottom")
    for sigma in (float(sampling.sigma_max), 8.0, 4.0, 2.0):
        s = torch.full((n,), sigma)
        x = noise * sigma
        outs, cells = {}, []
        for word in words:
            ctx = clip.encode_from_tokens(clip.tokenize(f"a large red circle at the {word} on a blue background"))
            out = base.diffusion_model(sampling.calculate_input(s, x), sampling.timestep(s).float(),
                                       context=ctx.repeat(n, 1, 1))
            outs[word] = sampling.calculate_denoised(s, out, x)
            readings = [metrics.read_scene(im) for im in vae.decode(outs[word]).clamp(0, 1).numpy()]
            cents = np.array([r.centroid for r in readings if r.centroid is not None] or [[np.nan, np.nan]])
            hits = sum(r.position == word for r in readings)
            cells.append(f"{word} {hits}/{n} at ({np.nanmean(cents[:, 0]):.0f},{np.nanmean(cents[:, 1]):.0f})")
        gap = (outs["left"] - outs["right"]).abs().mean().item()
        print(f"sigma {sigma:7.1f}: " + " | ".join(cells) +
              f" | mean|D_left-D_right| {gap:.4f} vs std {outs['left'].std().item():.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=REPO / "assets" / "toyworld" / "toyworld_base.safetensors")
    ap.add_argument("--prompts", type=int, default=48)
    ap.add_argument("--seeds", type=int, default=2, help="images per prompt")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cfg", type=float, default=4.5)
    ap.add_argument("--sampler", default="euler")
    ap.add_argument("--scheduler", default="normal")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--grid", type=Path, default=None, help="write a PNG grid of all samples")
    ap.add_argument("--vae", action="store_true", help="only the VAE's report (ceilings, PSNR)")
    ap.add_argument("--vae-ckpt", type=Path, default=None,
                    help="with --vae: a VAE checkpoint of a training work folder instead of --model")
    ap.add_argument("--layout-probe", action="store_true",
                    help="only probe whether position words move the object (denoised estimates, no sampling)")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    from dev import harness

    harness.configure()
    from dci.toyworld import render
    from dci.toyworld.model import load_toyworld, read_metadata
    from dev.toyworld import metrics

    if args.vae and args.vae_ckpt:
        with torch.inference_mode():
            vae_report(taesd_from_work_checkpoint(args.vae_ckpt))
        return
    meta = read_metadata(args.model)
    print(f"model {args.model} steps {meta.get('toyworld.steps')} world {meta.get('toyworld.world_version')}")
    model, clip, vae = load_toyworld(args.model)
    if args.vae:
        with torch.inference_mode():
            vae_report(comfy_roundtrip(vae))
        return
    if args.layout_probe:
        with torch.inference_mode():
            layout_probe(model, clip, vae)
        return
    prompts = held_out_prompts(args.prompts, args.seed)
    t0 = time.time()
    scores, images = [], []
    with torch.inference_mode():
        for i, prompt in enumerate(prompts):
            batch = sample(
                model,
                clip,
                vae,
                prompt,
                args.seeds,
                args.seed + i,
                args.steps,
                args.cfg,
                args.sampler,
                args.scheduler,
            )
            asked = render.parse_caption(prompt)
            for img in batch:
                reading = metrics.read_scene(img)
                scores.append(metrics.score_reading(reading, asked))
                images.append(img)
            if i < 4:
                print(f"  {prompt!r} -> {[metrics.read_scene(im) for im in batch][0]}")
        ceiling = vae_ceiling(comfy_roundtrip(vae), prompts)
    acc = metrics.accuracy(scores)
    print(
        f"{len(images)} images, {args.steps} steps {args.sampler}/{args.scheduler}, cfg {args.cfg}, "
        f"{time.time() - t0:.0f}s"
    )
    print(f"{'attribute':<16}{'sampled':>9}{'VAE ceiling':>13}")
    for k in acc:
        print(f"{k:<16}{acc[k]:>9.1%}{ceiling.get(k, float('nan')):>13.1%}")
    if args.grid:
        from PIL import Image

        cols = min(len(images), 4 * args.seeds)
        pad = [np.zeros_like(images[0])] * (-len(images) % cols)
        tiles = images + pad
        rows = [np.concatenate(tiles[j : j + cols], axis=1) for j in range(0, len(tiles), cols)]
        Image.fromarray(np.concatenate(rows, axis=0)).save(args.grid)
        print(f"grid: {args.grid}")


if __name__ == "__main__":
    main()
