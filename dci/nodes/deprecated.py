"""Node IDs that were renamed stay loadable here: a workflow saved with an old ID keeps working.

ComfyUI shows a node whose class has ``DEPRECATED = True`` with a deprecation badge and hides it from search,
but runs it as before. When a node is renamed, its old ID goes into ``NODE_CLASS_MAPPINGS`` below as
``alias("OldID", "Old display name", NewClass)``. No node has been renamed since 0.1.0, so the mapping is empty.
"""

from __future__ import annotations


def alias(old_id: str, old_name: str, current: type) -> type:
    """A class for a retired node ID that behaves exactly like ``current`` (same inputs, outputs, function)."""
    return type(old_id, (current,), {"NODE_ID": old_id, "DISPLAY_NAME": f"{old_name} (deprecated)",
                                     "DEPRECATED": True})


NODE_CLASS_MAPPINGS: dict[str, type] = {}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {}
