"""DCI sampling in ComfyUI: the prompt encoder's conditioning, the attn2 patch, the row wrapper, the guider."""
