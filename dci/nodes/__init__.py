"""Thin node classes, one module per family; this module only merges their registrations.

Every module in this folder that defines ``NODE_CLASS_MAPPINGS`` is registered. Node IDs carry the ``DCI``
prefix (IDs that clash with built-in ones are silently ignored by ComfyUI) and never change once shipped in a
workflow; renamed nodes stay loadable through ``deprecated.py``.
"""

import importlib
import pkgutil

NODE_CLASS_MAPPINGS: dict[str, type] = {}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {}

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    _family = importlib.import_module(f".{_info.name}", __name__)
    for _node_id in getattr(_family, "NODE_CLASS_MAPPINGS", {}):
        if _node_id in NODE_CLASS_MAPPINGS:
            raise RuntimeError(f"node ID {_node_id} is registered twice")
    NODE_CLASS_MAPPINGS.update(getattr(_family, "NODE_CLASS_MAPPINGS", {}))
    NODE_DISPLAY_NAME_MAPPINGS.update(getattr(_family, "NODE_DISPLAY_NAME_MAPPINGS", {}))
