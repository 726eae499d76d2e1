"""The toy world's caption grammar: captions of scenes (any subset of their nameable parts) and back.

Split from ``render`` (which re-exports every name here), so the renderer and the grammar each stay readable.
"""

from __future__ import annotations

import re
from dataclasses import asdict, replace

import numpy as np

from .render import (
    COLOURS,
    EMBLEM_SHAPES,
    POSITION_PHRASE,
    SHAPES,
    SIZES,
    ObjectSpec,
    SceneSpec,
    _pick,
    sample_object,
)

# --------------------------------------------------------------------------------------------- captions

# Probability that each part of a caption is left out, so the model also learns what to draw unasked.
OMIT_PROBABILITY: dict[str, float] = {
    "size": 0.3,
    "colour": 0.15,
    "pattern": 0.2,
    "emblem": 0.2,
    "position": 0.2,
    "background": 0.15,
    "texture": 0.3,
}
PATTERN_WORDS: dict[str, str] = {"stripes": "stripes", "dots": "dots", "band": "band"}


def pattern_phrase(obj: ObjectSpec) -> str:
    """The words for the pattern, e.g. "yellow stripes" or "a yellow band"; empty for a plain object."""
    if obj.pattern == "plain":
        return ""
    if obj.pattern == "band":
        return f"{_article(obj.pattern_colour)} {obj.pattern_colour} band"
    return f"{obj.pattern_colour} {obj.pattern}"


def emblem_phrase(obj: ObjectSpec) -> str:
    """The words for the emblem, e.g. "a blue star emblem"; empty without one."""
    if obj.emblem is None:
        return ""
    return f"{_article(obj.emblem_colour)} {obj.emblem_colour} {obj.emblem} emblem"


def decoration_phrase(obj: ObjectSpec, pattern: bool = True, emblem: bool = True) -> str:
    """"with yellow stripes and a blue star emblem", naming the pattern and/or the emblem."""
    parts = [p for p, keep in ((pattern_phrase(obj), pattern), (emblem_phrase(obj), emblem)) if keep and p]
    return ("with " + " and ".join(parts)) if parts else ""


def caption(spec: SceneSpec, rng: np.random.Generator | None = None, noun: str | None = None) -> str:
    """The caption of a scene; with ``rng``, parts are randomly omitted (see ``OMIT_PROBABILITY``).

    ``noun`` replaces the colour, shape and decoration words (e.g. ``"sks circle"`` for a concept, which
    carries them); the size word stays.
    """

    def keep(part: str) -> bool:
        return rng is None or rng.random() >= OMIT_PROBABILITY[part]

    obj = spec.obj
    words = [obj.size] if keep("size") else []
    if noun is None:
        if keep("colour"):
            words.append(obj.colour)
        words.append(obj.shape)
        decor = decoration_phrase(obj, pattern=keep("pattern"), emblem=keep("emblem"))
        if decor:
            words.append(decor)
    else:
        words.append(noun)
    if keep("position"):
        words.append(POSITION_PHRASE[obj.position])
    if keep("background"):
        bg = [spec.background] + ([spec.texture] if spec.texture != "flat" and keep("texture") else [])
        words.append(f"on {_article(bg[0])} " + " ".join(bg) + " background")
    return f"{_article(words[0])} " + " ".join(words)


def _article(word: str | None) -> str:
    return "an" if word and word[0] in "aeiou" else "a"


_COLOUR_RE = "|".join(COLOURS)
_SHAPE_RE = "|".join(SHAPES)
# The words between the article and the shape: size and colour, and possibly a word outside the world's
# vocabulary (a concept's trigger: "a small sks circle", "a sks red circle").
_OBJECT_RE = re.compile(rf"^an? (?P<words>(?:\w+ ){{0,3}}?)(?P<shape>{_SHAPE_RE})\b")
_PATTERN_RE = re.compile(rf"(?:with|and) (?:an? )?(?P<c>{_COLOUR_RE}) (?P<p>stripes|dots|band)\b")
_EMBLEM_RE = re.compile(rf"(?:with|and) an? (?P<c>{_COLOUR_RE}) (?P<e>{'|'.join(EMBLEM_SHAPES)}) emblem")
_BACKGROUND_RE = re.compile(rf"on an? (?P<bg>{_COLOUR_RE})(?: (?P<tex>gradient|grid))? background")
CAPTION_KEYS: tuple[str, ...] = (
    "shape",
    "colour",
    "size",
    "pattern",
    "pattern_colour",
    "emblem",
    "emblem_colour",
    "position",
    "background",
    "texture",
)


def parse_caption(text: str) -> dict[str, str | None]:
    """Attributes a caption asks for; ``None`` where the caption leaves the choice to the model.

    Keys: ``CAPTION_KEYS``. A caption that names a background without a texture word asks for nothing about
    the texture.
    """
    out: dict[str, str | None] = dict.fromkeys(CAPTION_KEYS)
    m = _OBJECT_RE.search(text)
    if m:
        words = m["words"].split()
        out["shape"] = m["shape"]
        out["size"] = next((w for w in words if w in SIZES), None)
        out["colour"] = next((w for w in words if w in COLOURS), None)
    p = _PATTERN_RE.search(text)
    if p:
        out["pattern"], out["pattern_colour"] = p["p"], p["c"]
    e = _EMBLEM_RE.search(text)
    if e:
        out["emblem"], out["emblem_colour"] = e["e"], e["c"]
    for pos, phrase in POSITION_PHRASE.items():
        if phrase in text:
            out["position"] = pos
    b = _BACKGROUND_RE.search(text)
    if b:
        out["background"] = b["bg"]
        out["texture"] = b["tex"]
    return out


def scene_attributes(spec: SceneSpec) -> dict[str, str | None]:
    """The named attributes of a scene, in the same keys as ``parse_caption``."""
    obj = spec.obj
    return {
        "shape": obj.shape,
        "colour": obj.colour,
        "size": obj.size,
        "pattern": obj.pattern,
        "pattern_colour": obj.pattern_colour,
        "emblem": obj.emblem,
        "emblem_colour": obj.emblem_colour,
        "position": obj.position,
        "background": spec.background,
        "texture": spec.texture,
    }


def scene_from_caption(text: str, rng: np.random.Generator | None = None) -> SceneSpec:
    """A scene that satisfies a full or partial caption; unnamed attributes are drawn from ``rng``.

    Used to render reference images for prompts and to know what a prompt asks for.
    """
    rng = rng or np.random.default_rng(0)
    a = parse_caption(text)
    colour = a["colour"] or _pick(rng, COLOURS, {a["background"]} - {None})
    background = a["background"] or _pick(rng, COLOURS, {colour, a["pattern_colour"], a["emblem_colour"]} - {None})
    base = sample_object(rng, colour, {background})
    pattern = a["pattern"] or "plain"
    obj = replace(
        base,
        shape=a["shape"] or base.shape,
        size=a["size"] or base.size,
        position=a["position"] or base.position,
        pattern=pattern,
        pattern_colour=a["pattern_colour"] if pattern != "plain" else None,
        emblem=a["emblem"],
        emblem_colour=a["emblem_colour"],
        jitter=(0.0, 0.0),
    )
    return SceneSpec(obj=obj, background=background, texture=a["texture"] or "flat")


def spec_to_dict(spec: SceneSpec) -> dict:
    """JSON-friendly form of a scene (for metadata and benchmark records)."""
    return asdict(spec)
