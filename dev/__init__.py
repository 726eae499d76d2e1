"""Development tooling: never imported by ComfyUI."""
