"""Files: the concept file, the files of other tools and the trainer's resume state; torch + safetensors only,
and every write goes through ``atomic``."""
