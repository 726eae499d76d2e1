"""The pack's code, imported by ComfyUI through the repository's ``__init__.py``."""
