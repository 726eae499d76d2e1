"""Two concepts in one prompt on the toy world: DBIM's "separate" and "union" concept maps compared.

The toy world draws one object per scene (``dci/toyworld``), so no metric here can read two concepts' looks
back from an image. What this measures instead, on the toy base model with two-object prompts whose
"concepts" are the named objects (e.g. "red circle" and "blue square"):

* protection: in every cross-attention call of the two-branch phase, each concept's own area (the 10 % of
  pixels where that concept alone would be protected most) and the blend weight w_c there under each
  setting; ``weaker`` is the less protected concept of each call, ``outside`` the pixels of neither area (where
  the auxiliary branch's context comes in: lower is more editable);
* colours: whether each named object's colour is on the object in the final image (the toy world's palette
  reader), for plain sampling and both settings: a crude sign that both objects survived.

    python3 dev/host.py python -m dev.multi_concept_maps [--seeds 4] [--steps 20]

Prints a table, then one line per setting:
maps=<separate|union|plain> weaker_w=<mean w in the weaker concept's area> stronger_w=<...> outside_w=<...>
both_colours=<share of images with both objects' colours> images=<n>
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace

from . import harness

PROMPTS = [
    ("a red circle and a blue square on a white background", "red circle", "blue square"),
    ("a yellow star and a green hexagon on a black background", "yellow star", "green hexagon"),
    ("a large purple diamond and a small orange triangle on a white background", "purple diamond",
     "orange triangle"),
    ("a blue circle at the left and a yellow square at the right on a green background", "blue circle",
     "yellow square"),
    ("a white hexagon and a red star on a blue background", "white hexagon", "red star"),
    ("a green triangle and a purple circle on a yellow background", "green triangle", "purple circle"),
]
SETTINGS = ("separate", "union")


class Recorder:
    """Duck-typed DBIM settings: computes the weights of both settings from the same attention, records how
    each protects the two concepts, and blends with ``maps``'s."""

    def __init__(self, settings, masks, maps: str):
        self.settings, self.masks, self.maps = settings, masks, maps
        self.lam = settings.lam
        self.rows: dict[str, list[tuple[float, float, float]]] = {m: [] for m in SETTINGS}

    def weights(self, p_c, p_a, *, concept_tokens, aux_noun_tokens, prompt_tokens_c, prompt_tokens_a):
        import torch

        from dci.method.token_spans import tile_mask

        t = p_c.shape[-1]
        masks = [tile_mask(m, t) for m in self.masks]
        kw = dict(aux_noun_tokens=aux_noun_tokens, prompt_tokens_c=prompt_tokens_c, prompt_tokens_a=prompt_tokens_a)
        alone = replace(self.settings, lam=0.0)
        lone = [alone.weights(p_c, None, concept_tokens=m, **kw) for m in masks]
        k = max(1, p_c.shape[2] // 10)
        areas = [torch.zeros_like(w, dtype=torch.bool).scatter_(-1, w.topk(k, dim=-1).indices, True) for w in lone]
        outside = ~(areas[0] | areas[1])
        out = {"separate": self.settings.weights(p_c, p_a, concept_tokens=masks, **kw),
               "union": self.settings.weights(p_c, p_a, concept_tokens=masks[0] | masks[1], **kw)}
        for maps, w in out.items():
            inside = sorted(float(w[a].mean()) for a in areas)
            self.rows[maps].append((inside[0], inside[1], float(w[outside].mean()) if outside.any() else float("nan")))
        return out[self.maps]


def colours_present(image, names: tuple[str, str]) -> tuple[bool, bool]:
    """Whether each named colour covers at least MIN_SHARE of the object pixels."""
    import numpy as np

    from dci.toyworld.render import COLOURS

    from .toyworld.metrics import MIN_SHARE, as_uint8, object_mask, strict_colour_ids

    img = as_uint8(image)
    mask = object_mask(img)
    if mask.sum() == 0:
        return False, False
    ids = strict_colour_ids(img[mask])
    return tuple(bool(np.mean(ids == COLOURS.index(n)) >= MIN_SHARE) for n in names)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--split", type=float, default=0.5)
    ap.add_argument("--lam", type=float, default=1.0)
    args = ap.parse_args(argv)
    harness.boot()
    import numpy as np
    import torch

    from dci.method.branches import DCIPlan
    from dci.method.dbim import DBIMSettings

    from .fixtures import dci_sample

    torch.set_num_threads(1)
    run = harness.run_node
    model, clip, vae = run("DCIToyWorldLoader", model_name="toyworld_base.safetensors")[0]
    (negative,) = run("CLIPTextEncode", clip=clip, text="")[0]
    (latent,) = run("EmptyLatentImage", width=128, height=128, batch_size=1)[0]
    protection = {m: [] for m in SETTINGS}
    colours = {m: [] for m in ("plain", *SETTINGS)}
    for text, first, second in PROMPTS:
        names = (first.split()[0], second.split()[0])
        for maps in SETTINGS:
            (pos,), _ = run("DCIPromptEncode", clip=clip, text=text, auxiliary_noun="", concept_phrase=first,
                            concept_phrase_2=second, concept_maps=maps)
            data = pos[0][1]["dci"]
            for seed in range(args.seeds):
                rec = Recorder(DBIMSettings(lam=args.lam), data.concept_masks, maps)
                out = dci_sample(model, pos, negative, latent, rec, DCIPlan(split=args.split, aux_seed=seed + 100),
                                 seed=seed, steps=args.steps)
                (image,) = run("VAEDecode", samples={"samples": out}, vae=vae)[0]
                colours[maps].append(colours_present(image[0].numpy(), names))
                if maps == "separate":  # both settings' weights on the same (separate) trajectory
                    for m in SETTINGS:
                        protection[m].extend(rec.rows[m])
                if maps == "separate":
                    plain = dci_sample(model, pos, negative, latent, rec, DCIPlan(split=0.0), seed=seed,
                                       steps=args.steps)
                    (image,) = run("VAEDecode", samples={"samples": plain}, vae=vae)[0]
                    colours["plain"].append(colours_present(image[0].numpy(), names))
    print(f"{'maps':10} {'weaker_w':>9} {'stronger_w':>10} {'outside_w':>9} {'both_colours':>12}")
    lines = []
    for m in ("plain", *SETTINGS):
        both = float(np.mean([a and b for a, b in colours[m]]))
        if m in protection:
            weak, strong, outside = (float(np.nanmean([r[i] for r in protection[m]])) for i in range(3))
        else:
            weak = strong = outside = float("nan")
        print(f"{m:10} {weak:9.3f} {strong:10.3f} {outside:9.3f} {both:12.2f}")
        lines.append(f"maps={m} weaker_w={weak:.3f} stronger_w={strong:.3f} outside_w={outside:.3f} "
                     f"both_colours={both:.2f} images={len(colours[m])}")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
