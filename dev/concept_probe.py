"""Where a fine-tuned concept's fidelity gets lost: one concept trained as ``make bench-quality`` trains it, then
sampled with three kinds of prompt.

- ``template``: the caption the trainer trained on ("photo of a sks circle"; for ico the words its learned
  contexts started from): does the model reproduce the concept at all?
- ``train_scene``: a toy-world caption of the training renders' own scene ("a large sks circle in the centre
  on a white background"): does the trigger carry into the world's caption language?
- ``eval``: the benchmark's evaluation prompts (other backgrounds, positions, sizes).

Prints one ``probe=<kind> fidelity=… colours=… layout=… texture=… shape=… editability=… n=…`` line per kind
(fidelity and its four parts, ``dev/toyworld/fidelity.py``; editability where the prompt asks for a scene),
plus the scale's two ends measured in the same run (``fidelity_floor=… fidelity_ceiling=…``).

``--prefix`` sets the trainer's ``prefix_context``: the fixed words before the trigger for custom_diffusion and
infusion (default the bench's "a", how the toy world's captions start; "photo of a", the node's default, uses
words those captions never do), the starting words of ICO's learned prefix.

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
    p.add_argument("--prompts", type=int, default=12, help="evaluation prompts (the bench's default)")
    p.add_argument("--seeds", type=int, default=2, help="images per prompt")
    p.add_argument("--prefix", default=TRAIN["prefix_context"], help="the trainer's prefix_context")
    p.add_argument("--threads", type=int, default=1)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    from . import bench_quality as bq

    # the bench's own sampling, ceiling and training, with the probe's settings (it boots ComfyUI)
    bench = bq.Bench(bq.parse_args(["--seeds", str(args.seeds), "--lr", str(args.lr), "--prefix", args.prefix,
                                    "--train-steps", str(args.steps), "--threads", str(args.threads)]))
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
        parts, edits = [], []
        for prompt, images in batches:
            for img in images:
                parts.append(meter.parts(img))
                if scene_prompts:
                    edits.append(fid.mean_score(fid.editability_scores(img, prompt, concept)))
        mean = {k: float(np.mean([p[k] for p in parts])) for k in ("fidelity", "colours", "layout", "texture", "shape")}
        edit = f"{np.mean(edits):.3f}" if edits else "-"
        print(f"probe={kind} " + " ".join(f"{k}={v:.3f}" for k, v in mean.items()) + f" editability={edit} n={len(parts)}",
              flush=True)

    scenes = bq.pick_scenes(concept, args.prompts)
    floor = [meter(img) for i, sc in enumerate(scenes)
             for img in sample(bench.model, bench.clip, caption(sc, noun=concept.class_noun), 1000 + i)]
    bench.ceiling(args.concept, concept, scenes)
    print(f"fidelity_floor={np.mean(floor):.3f} fidelity_ceiling={np.mean(bench.ceilings):.3f}", flush=True)

    t0 = time.perf_counter()
    model, clip, _ = bench.train(args.mode, args.concept, concept, label=f"probe_{args.mode}")
    print(f"# trained {args.mode} on {args.concept}: {args.steps} steps in {time.perf_counter() - t0:.0f} s; "
          f"template prefix {args.prefix!r}", flush=True)
    template = f"{args.prefix} {bq.TRIGGER} {concept.class_noun}".strip()
    report("template", [(template, sample(model, clip, template, 1 + i)) for i in range(max(1, args.prompts // 2))],
           scene_prompts=False)
    own = concept_prompt(training_scenes(concept, 1, 0)[0], bq.TRIGGER, concept)
    report("train_scene", [(own, sample(model, clip, own, 1 + i)) for i in range(max(1, args.prompts // 2))])
    report("eval", [(p, sample(model, clip, p, 1000 + i))
                    for i, p in enumerate(concept_prompt(sc, bq.TRIGGER, concept) for sc in scenes)])


if __name__ == "__main__":
    main()
