"""Pure logic of the pack: parsing, settings, LoRA resolution, tiling, the Astria client. Never imports ComfyUI."""
