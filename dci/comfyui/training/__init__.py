"""ICO / Custom Diffusion training in ComfyUI: settings, the checked plan, the text encoder with gradients,
the UNet patch and the loop."""
