"""Writes the toy-world concepts' training renders as PNG files: the "few photos" a user would bring.

For every concept in ``dev.toyworld.concepts.CONCEPTS``, ``--count`` renders of its narrow training
context (the concept's own background, large, centred with ±4 px jitter; ``concepts.training_scenes``) go to
``assets/toyworld/concepts/<concept>/<concept>_<i>.png`` (128×128 RGB). The renders are a pure function of
``--seed``, and the PNGs are written without timestamps, so re-running gives identical files.

Usage: python3 dev/host.py python -m dev.toyworld.export_concepts [--out DIR] [--count 5] [--seed 0]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEFAULT_OUT = REPO / "assets" / "toyworld" / "concepts"


def export(out: Path, count: int, seed: int) -> list[Path]:
    """Writes the PNGs; returns their paths."""
    from PIL import Image

    from dev.toyworld.concepts import CONCEPTS, training_images

    written = []
    for name, concept in CONCEPTS.items():
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        for i, pixels in enumerate(training_images(concept, count, seed)):
            path = folder / f"{name}_{i}.png"
            tmp = path.with_name(f".{path.name}.tmp")
            Image.fromarray(pixels, mode="RGB").save(tmp, format="PNG", optimize=True)
            os.replace(tmp, path)  # a reader never sees half a PNG
            written.append(path)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (one subfolder per concept)")
    parser.add_argument("--count", type=int, default=5, help="renders per concept")
    parser.add_argument("--seed", type=int, default=0, help="seed of the renders' jitter")
    args = parser.parse_args()
    if args.count < 1:
        sys.exit("--count must be at least 1")
    sys.path.insert(0, str(REPO))
    for path in export(args.out, args.count, args.seed):
        print(path.relative_to(REPO) if path.is_relative_to(REPO) else path)


if __name__ == "__main__":
    main()
