"""Layout-and-Retouch in ComfyUI: step-blended sampling, reference inversion, the retouch MODEL patch."""
