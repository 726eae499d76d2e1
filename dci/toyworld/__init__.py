"""The toy world: a small synthetic world of 128×128 scenes, its captions, pixel metrics and a tiny model.

Why it exists: no Stable Diffusion weights can be downloaded and there is no GPU, yet the project needs a
default model on which a concept is learned and placed into new scenes, and a way to *measure* fidelity
and editability. In this world every image has known attributes, so both are computed from pixels.

The world (``WORLD_VERSION`` "toyworld-2", ``render.py``):
- one object per scene: a shape (circle, square, triangle, diamond, hexagon, star) in one of 8 named
  palette colours (red, orange, yellow, green, blue, purple, white, black), small or large, at the left,
  right, top, bottom or centre (with ±4 px jitter);
- up to two decorations, each in its own colour: a pattern (stripes, dots or a band) and an emblem (a small
  circle, square or star on the object);
- parts that no caption ever names but that vary: the stripes' angle (vertical or horizontal), the
  emblem's placement (centre, upper left, upper right) and its scale (small or large);
- a background in another palette colour, flat, gradient (darkening downwards) or grid.
- Every decoration sits on the 8-pixel grid of the VAE's latent cells (a stripe is one cell wide, a dot
  fills one cell), so a ×8 autoencoder with 4 channels can carry it: 16×16×4 latents.
- Captions: "a small red circle with yellow stripes and a blue star emblem at the left on a green gradient
  background"; each part except the shape is randomly left out during training, so the model learns a
  default for every unnamed attribute. ``parse_caption`` turns a caption back into what it asks for.
- About one in eleven (shape, colour, background) triples is held out of base training (``held_out``),
  so evaluation prompts can test composition rather than memory.

Concepts (``concepts.py``): particular objects, each a combination of named and unnamed parts whose full
look the base world never draws. Words reach the named parts only. They are rendered in a narrow context
for fine-tuning and asked for in other contexts at evaluation.

Modules: ``render`` (numpy), ``concepts`` (numpy), ``metrics`` and ``fidelity`` (numpy; pixel readers and
the concept metric), ``model`` (imports ComfyUI lazily; builds and loads the SD1.x-family toy model).
"""

from .render import IMAGE_SIZE, WORLD_VERSION

__all__ = ["IMAGE_SIZE", "WORLD_VERSION"]
