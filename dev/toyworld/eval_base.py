"""Quick check of a toy-world base model: prompt accuracy measured from pixels, sampled by ComfyUI itself.

Prompts ask for (shape, colour, background) triples that base training never showed (``held_out``), at
every position and size; a third of them add a decoration. Images come from the stock KSampler node and
VAEDecode at 64×64; ``dci_core.toyworld.metrics`` reads background, object colours and position back.
The VAE's own ceiling is printed beside it (clean renders through VAEEncode → VAEDecode).

Usage: python scripts/toyworld/eval_base.py [--model FILE] [--prompts 48] [--seeds 2] [--grid out.png]
       python scripts/toyworld/eval_base.py --layout-probe [--model FILE]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]


def setup_comfy(comfyui: str) -> None:
    """ComfyUI on the path, CPU mode, before anything imports model_management; ComfyUI's ``nodes`` first."""
    sys.path.insert(0, str(REPO))
    sys.path.insert(0, comfyui)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True


def held_out_prompts(n: int, seed: int) -> list[str]:
    """``n`` full captions of held-out triples, positions and sizes cycled, every third one decorated."""
    from dci.toyworld import render as r

    triples = [
        (s, c, b) for s in r.SHAPES for c in r.COLOURS for b in r.COLOURS if c != b and r.held_out(s, c, b)
    ]
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(triples))
    prompts = []
    for i in range(n):
        shape, colour, bg = triples[order[i % len(triples)]]
        pattern = "plain"
        second = emblem = None
        if i % 3 == 2:
            pattern = r.PATTERNS[1 + int(rng.integers(len(r.PATTERNS) - 1))]
            others = [x for x in r.COLOURS if x not in (colour, bg)]
            second = others[int(rng.integers(len(others)))]
            emblem = r.EMBLEM_SHAPES[int(rng.integers(len(r.EMBLEM_SHAPES)))] if pattern == "emblem" else None
        obj = r.ObjectSpec(
            shape=shape,
            colour=colour,
            pattern=pattern,
            pattern_colour=second if pattern != "emblem" else None,
            emblem=emblem,
            emblem_colour=second if pattern == "emblem" else None,
            size=r.SIZES[i % 2],
            position=r.POSITIONS[i % len(r.POSITIONS)],
        )
        prompts.append(r.caption(r.SceneSpec(obj, background=bg)))
    return prompts


def sample(
    model, clip, vae, prompt: str, seeds: int, seed: int, steps: int, cfg: float, sampler: str, scheduler: str
) -> np.ndarray:
    """``seeds`` images for one prompt through the stock nodes; uint8 [B, 64, 64, 3]."""
    import nodes

    pos = nodes.CLIPTextEncode().encode(clip, prompt)[0]
    neg = nodes.CLIPTextEncode().encode(clip, "")[0]
    latent = nodes.EmptyLatentImage().generate(64, 64, seeds)[0]
    out = nodes.KSampler().sample(model, seed, steps, cfg, sampler, scheduler, pos, neg, latent)[0]
    images = nodes.VAEDecode().decode(vae, out)[0]
    return (images.clamp(0, 1).numpy() * 255).round().astype(np.uint8)


def vae_ceiling(vae, prompts: list[str]) -> dict[str, float]:
    """Accuracy on clean renders of the prompts after a VAE round trip: the best the sampler can reach."""
    from dci.toyworld import render
    from dev.toyworld import metrics

    scores = []
    for i, p in enumerate(prompts):
        img = render.render_scene(render.scene_from_caption(p, np.random.default_rng(i)))
        t = torch.from_numpy(img).float().unsqueeze(0) / 255.0
        rec = vae.decode(vae.encode(t)).clamp(0, 1)[0].numpy()
        scores.append(metrics.score_reading(metrics.read_scene(rec), render.parse_caption(p)))
    return metrics.accuracy(scores)


def layout_probe(model, clip, vae, n: int = 8, seed: int = 0) -> None:
    """Does the prompt move the object? The model's denoised estimate D(x; σ) from the same noise for
    "... at the left/right/top/bottom ..." at a few noise levels: hits (position read from pixels equals the
    word) and mean object centroid per word, and mean |D_left - D_right| against D's spread. A model that
    ignores position words prints the same centroid for every word."""
    from dev.toyworld import metrics

    base = model.model
    sampling = base.model_sampling
    noise = torch.randn(n, 4, 8, 8, generator=torch.Generator().manual_seed(seed))
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
    ap.add_argument("--comfyui", default=os.environ.get("DCI_COMFYUI_DIR") or os.environ.get("COMFYUI_PATH"),
                    help="the ComfyUI tree (set when run through scripts/host.py)")
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
    ap.add_argument("--layout-probe", action="store_true",
                    help="only probe whether position words move the object (denoised estimates, no sampling)")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    setup_comfy(args.comfyui)
    from dci.toyworld import render
    from dci.toyworld.model import load_toyworld, read_metadata
    from dev.toyworld import metrics

    meta = read_metadata(args.model)
    print(f"model {args.model} steps {meta.get('toyworld.steps')} world {meta.get('toyworld.world_version')}")
    model, clip, vae = load_toyworld(args.model)
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
        ceiling = vae_ceiling(vae, prompts)
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
