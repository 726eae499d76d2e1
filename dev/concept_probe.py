"""Where a fine-tuned concept's fidelity gets lost: one concept trained as ``make bench-quality`` trains it, then
sampled with three kinds of prompt.

- ``template``: the caption the trainer trained on ("photo of a sks circle"; for ico the words its learned
  contexts started from): does the model reproduce the concept at all?
- ``train_scene``: a toy-world caption of the training renders' own scene ("a large sks circle in the centre
  on a white background"): does the trigger carry into the world's caption language?
- ``eval``: the benchmark's evaluation prompts (other backgrounds, positions, sizes).

Prints one ``probe=<kind> fidelity=… colours=… layout=… texture=… shape=… editability=… [edit_<attribute>=…] n=…``
line per kind (fidelity and its four parts, ``dev/toyworld/fidelity.py``; editability where the prompt asks for a
scene, and the share right of each asked attribute: background, position, size),
plus the scale's two ends measured in the same run (``fidelity_floor=… fidelity_ceiling=…``).

``--prefix`` sets the trainer's ``prefix_context``: the fixed words before the trigger for custom_diffusion and
infusion (default the bench's "a", how the toy world's captions start; "photo of a", the node's default, uses
words those captions never do), the starting words of ICO's learned prefix.

``--dci SETTING`` (one setting in bench-quality's ``--dci`` form, ``split:λ[:ref|px][:base][:noun]``) also samples
the evaluation prompts with DCI KSampler and prints, per cross-attention resolution, DBIM's blend weight w_c (1: the concept branch
keeps its own output; lower: the auxiliary branch's output comes in), mean over heads and the two-branch steps,
in three regions: the square where the prompt asks for the object, the training renders' place (the centre,
large), and the rest (``dci_weights res=… asked=… training_place=… rest=… calls=…`` lines).

``python3 dev/host.py python -m dev.concept_probe --concept badge --mode custom_diffusion [--prefix "photo of a"]``
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from . import harness


def parse_args(argv=None):
    from .bench_quality import TRAIN

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--concept", default="badge")
    p.add_argument("--mode", default="custom_diffusion", choices=("ico", "custom_diffusion", "infusion"))
    p.add_argument("--steps", type=int, default=600, help="training steps (the bench's budget)")
    p.add_argument("--lr", type=float, default=TRAIN["learning_rate"],
                   help="per-image learning rate (infusion: the bench's --infusion-lr default)")
    p.add_argument("--context-lr", type=float, default=TRAIN["context_lr_multiplier"],
                   help="ico: the contexts' learning rate as a multiple of --lr (bench-quality's --context-lr)")
    p.add_argument("--prompts", type=int, default=12, help="evaluation prompts (the bench's default)")
    p.add_argument("--seeds", type=int, default=2, help="images per prompt")
    p.add_argument("--prefix", default=TRAIN["prefix_context"], help="the trainer's prefix_context")
    p.add_argument("--caption", choices=("short", "scene"), default="short",
                   help="the training caption, as bench-quality's --caption")
    p.add_argument("--mask", action="store_true", help="foreground-masked training loss, as bench-quality's --mask")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dci", default="", help="one setting in bench-quality's --dci form ('split:λ[:ref|px][:base][:noun]'): "
                                             "also sample with DCI KSampler and report its blend weights")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    from . import bench_quality as bq

    # the bench's own sampling, ceiling and training, with the probe's settings (it boots ComfyUI)
    bench = bq.Bench(bq.parse_args(["--seeds", str(args.seeds), "--lr", str(args.lr), "--prefix", args.prefix,
                                    "--caption", args.caption, "--train-steps", str(args.steps),
                                    "--context-lr", str(args.context_lr),
                                    "--threads", str(args.threads)] + (["--mask"] if args.mask else [])))
    from dci.comfyui.training.plan import fixed_suffix
    from dci.toyworld.render import caption

    from .toyworld import fidelity as fid
    from .toyworld.concepts import CONCEPTS, concept_prompt, training_scenes

    run = harness.run_node
    concept = CONCEPTS[args.concept]
    meter = bench.meter(args.concept, concept)

    def sample(model, clip, text: str, seed: int) -> np.ndarray:
        (pos,) = run("CLIPTextEncode", clip=clip, text=text)[0]
        return bench.sample(model, pos, seed, None)

    def report(kind: str, batches: list[tuple[str, np.ndarray]], scene_prompts: bool = True) -> None:
        parts, edits, asked = [], [], {}
        for prompt, images in batches:
            for img in images:
                parts.append(meter.parts(img))
                if scene_prompts:
                    scores = fid.editability_scores(img, prompt, concept)
                    edits.append(fid.mean_score(scores))
                    for k, v in scores.items():
                        asked.setdefault(k, []).append(float(v))
        mean = {k: float(np.mean([p[k] for p in parts])) for k in ("fidelity", "colours", "layout", "texture", "shape")}
        edit = f"{np.mean(edits):.3f}" if edits else "-"
        per = "".join(f" edit_{k}={np.mean(v):.3f}" for k, v in sorted(asked.items()))  # each asked attribute
        print(f"probe={kind} " + " ".join(f"{k}={v:.3f}" for k, v in mean.items()) + f" editability={edit}{per} "
              f"n={len(parts)}", flush=True)

    scenes = bq.pick_scenes(concept, args.prompts)
    floor = [meter(img) for i, sc in enumerate(scenes)
             for img in sample(bench.model, bench.clip, caption(sc, noun=concept.class_noun), 1000 + i)]
    bench.ceiling(args.concept, concept, scenes)
    print(f"fidelity_floor={np.mean(floor):.3f} fidelity_ceiling={np.mean(bench.ceilings):.3f}", flush=True)

    t0 = time.perf_counter()
    model, clip, ref = bench.train(args.mode, args.concept, concept, label=f"probe_{args.mode}")
    print(f"# trained {args.mode} on {args.concept}: {args.steps} steps in {time.perf_counter() - t0:.0f} s; "
          f"caption {args.caption}", flush=True)
    words = bench.caption_context(concept)  # as the custom_diffusion caption reads them (ICO's "." adds nothing)
    template = " ".join(w for w in (words["prefix_context"], bq.TRIGGER, concept.class_noun,
                                    fixed_suffix(words["suffix_context"], args.mode)) if w)
    report("template", [(template, sample(model, clip, template, 1 + i)) for i in range(max(1, args.prompts // 2))],
           scene_prompts=False)
    own = concept_prompt(training_scenes(concept, 1, 0)[0], bq.TRIGGER, concept)
    report("train_scene", [(own, sample(model, clip, own, 1 + i)) for i in range(max(1, args.prompts // 2))])
    report("eval", [(p, sample(model, clip, p, 1000 + i))
                    for i, p in enumerate(concept_prompt(sc, bq.TRIGGER, concept) for sc in scenes)])
    if args.dci:
        dci_weights(bench, (model, clip, ref), concept, scenes, args.dci, report)


def region_masks(scene, res: int):
    """[res*res] bool masks of the asked object's square, the training place (centre, large) and the rest."""
    import torch

    from dci.toyworld.render import IMAGE_SIZE, POSITION_CENTRE, SIZE_RADIUS

    xs = (torch.arange(res, dtype=torch.float32) + 0.5) * IMAGE_SIZE / res
    yy, xx = torch.meshgrid(xs, xs, indexing="ij")

    def square(cx: float, cy: float, r: float):
        return (((xx - cx).abs() <= r) & ((yy - cy).abs() <= r)).flatten()

    asked = square(*POSITION_CENTRE[scene.obj.position], SIZE_RADIUS[scene.obj.size])
    train = square(*POSITION_CENTRE["centre"], SIZE_RADIUS["large"]) & ~asked
    return asked, train, ~(asked | train)


def dci_weights(bench, trained, concept, scenes, spec: str, report) -> None:
    """Sample the evaluation prompts with DCI KSampler, recording every blend weight w_c [B, heads, N]."""
    from dci.comfyui.sampling import attention

    from . import bench_quality as bq
    from .bench_rows import dci_label, dci_sweep
    from .toyworld.concepts import concept_prompt

    model, clip, ref = trained
    settings = dci_sweep(spec)
    if len(settings) != 1:
        raise SystemExit(f"--dci: give one setting, not {len(settings)} ({spec!r})")
    setting = settings[0]
    original, records = attention.blend_outputs, []

    def recording(o_c, o_a, w_c, heads):
        records.append(w_c.detach().float().mean(1).cpu())  # [B, N], mean over heads
        return original(o_c, o_a, w_c, heads)

    sums: dict[int, list[list[float]]] = {}
    batches = []
    attention.blend_outputs = recording
    try:
        for i, scene in enumerate(scenes):
            prompt = concept_prompt(scene, bq.TRIGGER, concept)
            (pos,) = harness.run_node("DCIPromptEncode", clip=clip, text=prompt,
                                      auxiliary_noun=bq.aux_noun(concept.class_noun), concept=ref)[0]
            records.clear()
            batches.append((prompt, bench.sample(model, pos, 1000 + i, setting)))
            masks_at: dict[int, tuple] = {}  # per resolution, for this scene
            for w in records:
                res = int(round(w.shape[-1] ** 0.5))
                if res not in masks_at:
                    masks_at[res] = region_masks(scene, res)
                masks = masks_at[res]
                sums.setdefault(res, []).append([float(w[:, m].mean()) if m.any() else float("nan") for m in masks])
    finally:
        attention.blend_outputs = original
    report(f"eval_{dci_label(setting)}", batches)
    for res in sorted(sums, reverse=True):
        a = np.array(sums[res])
        print(f"dci_weights res={res}x{res} asked={np.nanmean(a[:, 0]):.3f} training_place={np.nanmean(a[:, 1]):.3f} "
              f"rest={np.nanmean(a[:, 2]):.3f} calls={len(a)}", flush=True)


if __name__ == "__main__":
    main()
