"""How many sampling steps each DCI split gives the two branches and the concept branch alone.

``split`` is a noise level (``phase_end_sigma``: ComfyUI's ``percent_to_sigma``), so the number of steps it
covers depends on the scheduler and the step count. One line per split:

split=<s> two_branch_steps=<n> concept_only_steps=<n> end_sigma=<σ> first_concept_only_sigma=<σ or none>

Usage: python3 dev/host.py python -m dev.split_steps [--splits 0.3,0.5,0.7,0.8,0.9,1] [--steps 20]
       [--scheduler normal] [--denoise 1] [--model FILE]
(the bundled toy model by default; it samples on SD1.x's schedule, so the counts hold for SD1.x models too).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def split_table(model, splits: list[float], steps: int, scheduler: str, denoise: float = 1.0) -> list[dict]:
    """For each split: its end sigma, how many of the schedule's steps run both branches, how many the concept
    branch alone, and the sigma at which the concept branch takes over (None: it never runs alone)."""
    import comfy.samplers

    from dci.comfyui.sampling.guider import phase_end_sigma
    from dci.method.branches import two_branch_steps

    sigmas = comfy.samplers.KSampler(model, steps=steps, device="cpu", sampler="euler", scheduler=scheduler,
                                     denoise=denoise).sigmas
    rows = []
    for split in splits:
        end = phase_end_sigma(model, split)
        both = two_branch_steps(sigmas, end)
        alone = len(sigmas) - 1 - both
        rows.append({"split": split, "two_branch_steps": both, "concept_only_steps": alone, "end_sigma": end,
                     "first_concept_only_sigma": float(sigmas[both]) if alone else None})
    return rows


def format_row(row: dict) -> str:
    first = row["first_concept_only_sigma"]
    return (f"split={row['split']:g} two_branch_steps={row['two_branch_steps']} "
            f"concept_only_steps={row['concept_only_steps']} end_sigma={row['end_sigma']:.4f} "
            f"first_concept_only_sigma={'none' if first is None else f'{first:.4f}'}")


def parse_splits(text: str) -> list[float]:
    try:
        splits = [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise SystemExit(f"--splits: a comma list of numbers between 0 and 1, e.g. 0.3,0.5,0.7; got {text!r}") from None
    bad = [s for s in splits if not 0.0 <= s <= 1.0]
    if not splits or bad:
        raise SystemExit(f"--splits: every split must be between 0 and 1; got {text!r}")
    return splits


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--splits", default="0.3,0.5,0.7,0.8,0.9,1")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--scheduler", default="normal")
    ap.add_argument("--denoise", type=float, default=1.0)
    ap.add_argument("--model", type=Path, default=None, help="a toy-world file (default: the bundled one)")
    args = ap.parse_args(argv)
    splits = parse_splits(args.splits)
    if args.steps < 1:
        ap.error("--steps must be at least 1")
    if not 0.0 < args.denoise <= 1.0:
        ap.error("--denoise must be in (0, 1]")

    from . import harness

    harness.boot()
    import comfy.samplers

    if args.scheduler not in comfy.samplers.SCHEDULER_NAMES:
        ap.error(f"--scheduler must be one of {', '.join(comfy.samplers.SCHEDULER_NAMES)}")
    name = ("toyworld_base.safetensors" if args.model is None
            else harness.add_model_file(args.model, name="toyworld/split_steps_model.safetensors"))
    (model, _clip, _vae), _ = harness.run_node("DCIToyWorldLoader", model_name=name)
    for row in split_table(model, splits, args.steps, args.scheduler, args.denoise):
        print(format_row(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
