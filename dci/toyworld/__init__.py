"""The toy world: a small synthetic world of 64×64 scenes, its captions, pixel metrics and a tiny model.

Why it exists: no Stable Diffusion weights can be downloaded and there is no GPU, yet the project needs a
default model on which a concept is learned and placed into new scenes, and a way to *measure* fidelity
and editability. In this world every image has known attributes, so both are computed from pixels.

The world (``WORLD_VERSION`` "toyworld-1", ``render.py``):
- one object per scene: a shape (circle, square, triangle, ring, cross, star) in one of 8 named palette
  colours (red, orange, yellow, green, blue, purple, white, black), small or large, at the left, right,
  top, bottom or centre (with ±2 px jitter);
- an optional decoration in a second colour: stripes, dots, checker, halves, or an emblem (a small
  circle, square or star inside the object). The base world draws at most one decoration per object;
- a background in another palette colour, flat, gradient (darkening downwards) or grid.
- Captions: "a small red ring with yellow stripes at the left on a blue gradient background"; each part
  except the shape is randomly left out during training, so the model learns a default for every
  unnamed attribute. ``parse_caption`` turns a caption back into the attributes it asks for.
- About one in eleven (shape, colour, background) triples is held out of base training (``held_out``),
  so evaluation prompts can test composition rather than memory.

Concepts (``concepts.py``): objects the captions can't name exactly, because they combine building
blocks the base world only shows separately (a pattern *and* an emblem, three colours). They are
rendered in a narrow context for fine-tuning and asked for in other contexts at evaluation.

Modules: ``render`` (numpy), ``concepts`` (numpy), ``metrics`` (numpy), ``model`` (imports ComfyUI
lazily; builds and loads the SD1.x-family toy model).
"""

from .render import IMAGE_SIZE, WORLD_VERSION

__all__ = ["IMAGE_SIZE", "WORLD_VERSION"]
