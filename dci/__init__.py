"""The pack's code, one folder per layer; data flows one way, nodes → comfyui → method and files.

- ``method/``: the method's math in plain torch (DBIM, token spans, ICO captions, the two-branch rows).
- ``files/``: concept files and the files of other tools, torch + safetensors only, one atomic writer.
- ``comfyui/``: the adapters that import ComfyUI, one module per extension point; ``comfyui/seams.py`` lists
  the ComfyUI internals the pack relies on.
- ``nodes/``: thin node classes, one module per family.
- ``toyworld/``: the toy world's renderer and model loader, which its nodes need.

A lint rule (ruff ``banned-api``) keeps ComfyUI out of ``method/`` and ``files/``.
"""
