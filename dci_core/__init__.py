"""The method itself: ICO training, DCI sampling, the concept format and the toy world.

Math modules import torch only and are testable without a ComfyUI server. The few modules that must touch
ComfyUI objects are named ``comfy_*`` so that a ComfyUI API change is fixed in one place.
"""
