"""The two ends of ``make demo``'s fidelity scale, measured on the same server in the same run.

A fidelity of 0.45 means little on its own. The demo therefore measures, for its own prompts and seeds:

- **floor**: the base model asked for the class ("a small circle at the left on an orange background", the
  demo's prompt without the trigger word), sampled with the demo's KSampler settings: what a method that
  learned nothing scores;
- **ceiling**: clean renders of the concept in the scenes the prompts ask for, after one VAE encode → decode:
  the best any model can score through this VAE.

``fid_norm = (fidelity − floor) / (ceiling − floor)`` puts the demo's numbers on the bench's scale
(``make bench-quality`` prints the same two ends). Only stock ComfyUI nodes and the toy loader are queued; the
images come back as previews (ComfyUI's temp folder), so the demo's output folder holds only its own files.
"""

from __future__ import annotations

import io
import re
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np

from dci.toyworld.render import SceneSpec, render_scene

from .toyworld.concepts import ToyConcept
from .toyworld.fidelity import asked_beyond_concept

CEILING_FOLDER = "dci_badge_ceiling"  # input sub-folder of the clean renders


def scenes(prompts: list[str], concept: ToyConcept) -> list[SceneSpec]:
    """The scene each prompt asks for, with the concept as its object (unnamed parts included)."""
    out = []
    for prompt in prompts:
        asked = asked_beyond_concept(prompt)  # what editability scores, read the same way
        if asked["background"] is None:
            raise ValueError(f"the demo prompt {prompt!r} names no background; the ceiling needs one")
        obj = replace(concept.obj, position=asked["position"] or "centre", size=asked["size"] or "large")
        out.append(SceneSpec(obj=obj, background=asked["background"], texture=asked["texture"] or "flat"))
    return out


def class_prompt(prompt: str, trigger: str) -> str:
    """The prompt without the trigger word: what the base model is asked for at the floor."""
    stripped = re.sub(rf"\b{re.escape(trigger)}\s+", "", prompt)
    if stripped == prompt:
        raise ValueError(f"the demo prompt {prompt!r} does not use the trigger word {trigger!r}")
    return stripped


def write_renders(input_dir: Path, scene_list: list[SceneSpec]) -> None:
    """Clean renders of the scenes into ``input/<CEILING_FOLDER>`` (replaced whole: no stale files)."""
    from PIL import Image

    target = input_dir / CEILING_FOLDER
    tmp = input_dir / f".{CEILING_FOLDER}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for i, scene in enumerate(scene_list):
        Image.fromarray(render_scene(scene)).save(tmp / f"scene_{i:02d}.png")
    shutil.rmtree(target, ignore_errors=True)
    tmp.replace(target)


def graph(demo: dict, prompts: list[str], trigger: str) -> tuple[dict, list[str]]:
    """The yardstick graph, built from the demo graph's own loader and KSampler settings.

    Returns the graph and the ids of its floor preview nodes, in prompt order (the ceiling's preview is ``"c4"``).
    """
    loader = next(k for k, n in demo.items() if n["class_type"] == "DCIToyWorldLoader")
    plain = next(n for n in demo.values() if n["class_type"] == "KSampler")["inputs"]
    settings = {k: plain[k] for k in ("seed", "steps", "cfg", "sampler_name", "scheduler", "denoise")}
    latent = next(n for n in demo.values() if n["class_type"] == "EmptyLatentImage")["inputs"]
    g: dict = {
        "m": {"class_type": "DCIToyWorldLoader", "inputs": dict(demo[loader]["inputs"])},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["m", 1], "text": ""}},
        "lat": {"class_type": "EmptyLatentImage", "inputs": dict(latent)},
        "c1": {"class_type": "LoadImageDataSetFromFolder", "inputs": {"folder": CEILING_FOLDER}},
        "c2": {"class_type": "VAEEncode", "inputs": {"pixels": ["c1", 0], "vae": ["m", 2]}},
        "c3": {"class_type": "VAEDecode", "inputs": {"samples": ["c2", 0], "vae": ["m", 2]}},
        "c4": {"class_type": "PreviewImage", "inputs": {"images": ["c3", 0]}},
    }
    floor_ids = []
    for i, prompt in enumerate(prompts):
        g[f"f{i}p"] = {"class_type": "CLIPTextEncode", "inputs": {"clip": ["m", 1], "text": class_prompt(prompt, trigger)}}
        g[f"f{i}k"] = {"class_type": "KSampler", "inputs": {
            **settings, "model": ["m", 0], "positive": [f"f{i}p", 0], "negative": ["neg", 0],
            "latent_image": ["lat", 0]}}
        g[f"f{i}d"] = {"class_type": "VAEDecode", "inputs": {"samples": [f"f{i}k", 0], "vae": ["m", 2]}}
        g[f"f{i}"] = {"class_type": "PreviewImage", "inputs": {"images": [f"f{i}d", 0]}}
        floor_ids.append(f"f{i}")
    return g, floor_ids


def measure(client, demo: dict, prompts: list[str], trigger: str, concept: ToyConcept, input_dir: Path,
            meter) -> tuple[float, float]:
    """Queues the yardstick graph on ``client``'s server; returns (floor, ceiling) mean fidelities."""
    from PIL import Image

    scene_list = scenes(prompts, concept)
    write_renders(input_dir, scene_list)
    g, floor_ids = graph(demo, prompts, trigger)
    result = client.run(g, timeout=600)
    if result.status != "success":
        raise RuntimeError(f"the yardstick graph ended with {result.status}: {result.error}")
    outputs = result.outputs()

    def pictures(node: str) -> list[np.ndarray]:
        refs = outputs.get(node, {}).get("images", [])
        return [np.asarray(Image.open(io.BytesIO(client.view(r))).convert("RGB")) for r in refs]

    floor = [meter(img) for node in floor_ids for img in pictures(node)]
    ceiling = [meter(img) for img in pictures("c4")]
    if len(floor) != len(prompts) or len(ceiling) != len(prompts):
        raise RuntimeError(f"the yardstick graph returned {len(floor)} floor and {len(ceiling)} ceiling images "
                           f"for {len(prompts)} prompts")
    return float(np.mean(floor)), float(np.mean(ceiling))
