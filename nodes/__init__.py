"""Thin node classes, one module per family; this module only merges their registrations.

Node IDs carry the ``DCI`` prefix (IDs that clash with built-in ones are silently ignored by ComfyUI) and
never change once shipped in a workflow; renamed nodes stay loadable through ``deprecated.py``.
"""

from . import concepts, info

_FAMILIES = (info, concepts)

NODE_CLASS_MAPPINGS: dict[str, type] = {}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {}
for _family in _FAMILIES:
    for _node_id in _family.NODE_CLASS_MAPPINGS:
        if _node_id in NODE_CLASS_MAPPINGS:
            raise RuntimeError(f"node ID {_node_id} is registered twice")
    NODE_CLASS_MAPPINGS.update(_family.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(_family.NODE_DISPLAY_NAME_MAPPINGS)
