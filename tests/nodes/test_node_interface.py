"""The nodes' interface is frozen (IDs, input names and order, types, defaults, outputs), the pack exists once
in the process, and the small node-level promises hold (dropdowns, deprecated IDs)."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FROZEN = Path(__file__).resolve().parents[1] / "data" / "node_interface.json"


def interface(node_id: str) -> dict:
    """A node's interface as ``tests/data/node_interface.json`` records it (choice lists as "COMBO")."""
    import nodes

    cls = nodes.NODE_CLASS_MAPPINGS[node_id]

    def entry(name, spec):
        kind = "COMBO" if isinstance(spec[0], list) else spec[0]
        return [name, kind, dict(sorted((spec[1] if len(spec) > 1 else {}).items()))]

    inputs = cls.INPUT_TYPES()
    return {
        "display_name": nodes.NODE_DISPLAY_NAME_MAPPINGS.get(node_id),
        "inputs": {sec: [entry(n, s) for n, s in inputs.get(sec, {}).items()] for sec in ("required", "optional")},
        "return_types": list(cls.RETURN_TYPES), "return_names": list(getattr(cls, "RETURN_NAMES", None) or []),
        "output_tooltips": list(getattr(cls, "OUTPUT_TOOLTIPS", ()) or ()), "function": cls.FUNCTION,
        "category": cls.CATEGORY, "description": getattr(cls, "DESCRIPTION", ""),
        "output_node": getattr(cls, "OUTPUT_NODE", False),
    }


def test_every_node_keeps_its_id_inputs_widget_order_and_outputs(comfy):
    """Recorded from release 0.1.0's code: shipped workflows keep loading only while this holds."""
    import nodes

    frozen = json.loads(FROZEN.read_text())
    ours = sorted(k for k in nodes.NODE_CLASS_MAPPINGS if k.startswith("DCI"))
    assert ours == sorted(frozen)
    for node_id in ours:
        assert json.loads(json.dumps(interface(node_id))) == frozen[node_id], node_id


def test_concept_dropdowns_list_concepts_but_not_training_states(comfy):
    import nodes

    from dev.fixtures import concepts_folder

    (concepts_folder() / "listed.safetensors").write_bytes(b"x")
    (concepts_folder() / "listed.train-state.safetensors").write_bytes(b"x")
    for node_id in ("DCILoadConcept", "DCIExportConcept"):
        names = nodes.NODE_CLASS_MAPPINGS[node_id].INPUT_TYPES()["required"]["concept_name"][0]
        assert "listed.safetensors" in names and not any(n.endswith(".train-state.safetensors") for n in names)


def test_a_renamed_node_stays_loadable_under_its_old_id(comfy):
    from dci.nodes.deprecated import NODE_CLASS_MAPPINGS, alias
    from dci.nodes.info import DCIModelInfo

    old = alias("DCIModelInspect", "DCI Model Inspect", DCIModelInfo)
    assert old.DEPRECATED is True and old.DISPLAY_NAME == "DCI Model Inspect (deprecated)"
    assert old.INPUT_TYPES() == DCIModelInfo.INPUT_TYPES() and old.FUNCTION == DCIModelInfo.FUNCTION
    assert issubclass(old, DCIModelInfo) and NODE_CLASS_MAPPINGS == {}


def test_the_pack_exists_once_and_tests_use_the_modules_comfyui_loaded(comfy):
    import nodes

    import dci.comfyui.tokenizer

    package = comfy.load_pack()
    assert dci.comfyui.tokenizer is sys.modules[f"{package}.dci.comfyui.tokenizer"]
    for node_id, cls in nodes.NODE_CLASS_MAPPINGS.items():
        if node_id.startswith("DCI"):
            local = cls.__module__.removeprefix(f"{package}.")
            assert getattr(importlib.import_module(local), cls.__name__) is cls, node_id
    files = [getattr(m, "__file__", None) for name, m in sys.modules.items() if name.startswith(f"{package}.")]
    others = [n for n, m in sys.modules.items()
              if getattr(m, "__file__", None) in files and n != "dci" and not n.startswith((f"{package}.", "dci."))]
    assert files and others == []


def test_importing_the_pack_before_comfyui_loads_it_is_refused():
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import dci.method.dbim; from dev import harness; "
            "harness.load_pack()")
    run = subprocess.run([sys.executable, "-c", code, str(REPO)], capture_output=True, text=True, env=os.environ,
                         timeout=300)
    assert run.returncode != 0 and "imported before ComfyUI loaded the pack" in run.stderr
