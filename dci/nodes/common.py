"""What every node of this pack shares: input specs with tooltips, input checks, errors in ComfyUI's terms.

Nodes are classic ComfyUI nodes (``INPUT_TYPES``/``RETURN_TYPES``/``FUNCTION``): each class names its ID and
display name once (``NODE_ID``, ``DISPLAY_NAME``), ``register`` builds the mappings from them, and
``reported`` turns the pack's known errors into ``"<display name>: <message>"`` without a traceback chain.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

SEED_MAX = 0xFFFFFFFFFFFFFFFF


def spec(kind, tooltip: str, **options) -> tuple:
    """One input of ``INPUT_TYPES``: its type (or list of choices) and options, with its tooltip."""
    return (kind, {**options, "tooltip": tooltip})


def sampler_inputs(seed_tip: str = "Seed of the noise (as in KSampler).",
                   cfg_tip: str = "Classifier-free guidance scale.") -> dict[str, tuple]:
    """KSampler's seed, steps, cfg, sampler_name and scheduler inputs, in KSampler's order, for the samplers of
    this pack (their widget order is part of the shipped workflows)."""
    import comfy.samplers

    return {
        "seed": spec("INT", seed_tip, default=0, min=0, max=SEED_MAX, control_after_generate=True),
        "steps": spec("INT", "Denoising steps.", default=20, min=1, max=10000),
        "cfg": spec("FLOAT", cfg_tip, default=7.0, min=0.0, max=100.0, step=0.1, round=0.01),
        "sampler_name": spec(comfy.samplers.KSampler.SAMPLERS, "Any ComfyUI sampler."),
        "scheduler": spec(comfy.samplers.KSampler.SCHEDULERS, "Any ComfyUI scheduler."),
    }


def shown(text: str, *result) -> dict:
    """An output node's return: ``text`` shown on the node in the web UI, ``result`` as its outputs."""
    return {"ui": {"text": [text]}, "result": result}


def register(*classes: type) -> tuple[dict[str, type], dict[str, str]]:
    """``NODE_CLASS_MAPPINGS`` and ``NODE_DISPLAY_NAME_MAPPINGS`` of a node family."""
    return {c.NODE_ID: c for c in classes}, {c.NODE_ID: c.DISPLAY_NAME for c in classes}


@contextmanager
def reported(node: str, *errors: type[BaseException]) -> Iterator[None]:
    """Known errors leave the node as ``ValueError("<node>: <message>")``, which ComfyUI shows as it is."""
    try:
        yield
    except errors as e:
        raise ValueError(f"{node}: {e}") from None


def check_model(node: str, value, name: str = "model") -> None:
    if not hasattr(value, "model") or not hasattr(getattr(value, "model", None), "diffusion_model"):
        raise ValueError(f"{node}: '{name}' must be a MODEL output (e.g. from Load Checkpoint)")


def check_clip(node: str, value, name: str = "clip") -> None:
    if not hasattr(value, "tokenize"):
        raise ValueError(f"{node}: '{name}' must be a CLIP output (e.g. from Load Checkpoint)")


def check_vae(node: str, value, name: str = "vae") -> None:
    if not hasattr(value, "encode"):
        raise ValueError(f"{node}: '{name}' must be a VAE output (e.g. from Load Checkpoint)")


def check_text(node: str, name: str, value) -> str:
    """A single line of text, stripped."""
    if not isinstance(value, str) or "\n" in value:
        raise ValueError(f"{node}: {name} must be a single line of text, got {value!r}")
    return value.strip()


def check_choice(node: str, name: str, value, choices) -> str:
    if value not in choices:
        raise ValueError(f"{node}: {name} must be one of {', '.join(choices)}, got {value!r}")
    return value


def check_flag(node: str, name: str, value) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{node}: {name} must be true or false, got {value!r}")
    return value


def check_number(node: str, name: str, value, limit: float) -> float:
    """A finite number with ``abs(value) <= limit``."""
    if not isinstance(value, (int, float)) or value != value or abs(value) > limit:
        raise ValueError(f"{node}: {name} must be a number between -{limit:g} and {limit:g}, got {value!r}")
    return float(value)
