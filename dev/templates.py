"""The shipped workflows are templates for real checkpoints; tests run them on the tiny models instead.

Every workflow in ``workflows/api/`` except the toy-world ones names a checkpoint file as users have it
(``REAL_MODELS``) at that model's native resolution. ``for_tiny`` turns such a graph into one the tests can run
on the tiny generated checkpoints: the checkpoint name is swapped, every width/height/resolution at the real
model's size becomes the tiny size, step counts are capped, and model loaders with no tiny counterpart
(``NO_TINY_MODEL``: a CLIP vision model is hundreds of MB) are taken out with the optional links to them (DCI
Wasserstein then measures on the toy-world descriptors), so a test executes the very graph a user loads with
nothing else changed.

    graph = for_tiny(load("dci_vs_plain"))                       # tiny_sd15.safetensors at 64×64
    graph = for_tiny(load("sdxl_train_and_sample"), family="sdxl")
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

API = Path(__file__).resolve().parents[1] / "workflows" / "api"

# family: (the checkpoint file name users have, its native resolution, the tiny test checkpoint, its resolution)
REAL_MODELS = {
    "sd15": ("v1-5-pruned-emaonly-fp16.safetensors", 512, "tiny_sd15.safetensors", 64),
    "sdxl": ("sd_xl_base_1.0.safetensors", 1024, "tiny_sdxl.safetensors", 64),
}
SIZE_INPUTS = ("width", "height", "resolution", "target_width", "target_height")
STEP_INPUTS = {"steps", "max_steps", "sample_steps"}
CHECKPOINT_LOADERS = {"CheckpointLoaderSimple": "ckpt_name"}
TRAINERS = {"DCITrainConcept"}  # their 'steps' are training steps
NO_TINY_MODEL = {"CLIPVisionLoader"}


class TemplateError(ValueError):
    """A workflow does not follow the template conventions the tests rely on."""


def load(name: str) -> dict:
    """The API-format graph ``workflows/api/<name>.json``."""
    return json.loads((API / f"{name.removesuffix('.json')}.json").read_text())


def families(graph: dict) -> set[str]:
    """Which real models a graph's checkpoint loaders name."""
    names = {real: fam for fam, (real, *_rest) in REAL_MODELS.items()}
    found = set()
    for node in graph.values():
        key = CHECKPOINT_LOADERS.get(node["class_type"])
        if key and node["inputs"].get(key) in names:
            found.add(names[node["inputs"][key]])
    return found


def for_tiny(graph: dict, *, max_steps: int = 2, max_train_steps: int = 3) -> dict:
    """A copy of ``graph`` for the tiny checkpoint of each real model it names (see the module docstring)."""
    fams = families(graph)
    if len(fams) > 1:
        raise TemplateError(f"a template names checkpoints of several families ({sorted(fams)})")
    out = copy.deepcopy(graph)
    if fams:
        real, size, tiny, tiny_size = REAL_MODELS[fams.pop()]
        for node in out.values():
            inputs = node["inputs"]
            key = CHECKPOINT_LOADERS.get(node["class_type"])
            if key and inputs.get(key) == real:
                inputs[key] = tiny
            for name in SIZE_INPUTS:
                if inputs.get(name) == size:
                    inputs[name] = tiny_size
    dropped = {k for k, n in out.items() if n["class_type"] in NO_TINY_MODEL}
    for k in dropped:
        del out[k]
    for node in out.values():
        inputs = node["inputs"]
        for name in [n for n, v in inputs.items() if isinstance(v, list) and v and v[0] in dropped]:
            del inputs[name]
        cap = max_train_steps if node["class_type"] in TRAINERS else max_steps
        for name in STEP_INPUTS & inputs.keys():
            if isinstance(inputs[name], int) and inputs[name] > cap:
                inputs[name] = cap
        if node["class_type"] in TRAINERS and isinstance(inputs.get("checkpoint_every"), int):
            inputs["checkpoint_every"] = 0
    return out
