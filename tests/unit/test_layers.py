"""The layers of ``dci/`` import only downwards (README, "Layout"): nodes → comfyui → method and files.

ruff keeps ComfyUI and safetensors out of the torch-only layers; this test checks the direction between our
own layers, resolving the relative imports the pack uses (ComfyUI loads it under a name made from its path,
so it can't import itself by an absolute name).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ALLOWED = {  # layer → the layers its modules may import (besides itself)
    "method": set(),
    "files": {"method"},
    "comfyui": {"method", "files"},
    "toyworld": set(),
    "nodes": {"method", "files", "comfyui", "toyworld"},
}


def imported_layers(path: Path) -> set[str]:
    """The ``dci`` layers (or ``dev``/``tests``) a module of the pack imports."""
    package = path.relative_to(REPO).with_suffix("").parts[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = list(package[: len(package) - node.level + 1])
            target = base + (node.module.split(".") if node.module else [])
            names = [target] if node.module else [target + [a.name] for a in node.names]
            found.update(t[1] for t in names if len(t) > 1 and t[0] == "dci")
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            found.update(m.split(".")[0] for m in modules if m.split(".")[0] in ("dci", "dev", "tests"))
    return found


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_a_layer_imports_only_the_layers_below_it(layer):
    modules = sorted((REPO / "dci" / layer).rglob("*.py"))
    assert modules
    for path in modules:
        wrong = imported_layers(path) - ALLOWED[layer] - {layer}
        assert not wrong, f"{path.relative_to(REPO)} imports {sorted(wrong)}"


def test_the_entry_point_imports_the_nodes_only_and_nothing_imports_dev_tooling():
    assert imported_layers(REPO / "__init__.py") == {"nodes"}
    assert imported_layers(REPO / "dci" / "__init__.py") == set()
