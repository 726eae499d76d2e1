"""The adapters between the method and ComfyUI: the only code that imports ComfyUI (at module top), one module
per extension point. ``seams.py`` is the upgrade checklist of the ComfyUI internals used."""
