"""ComfyUI-Astria's code: `core` is pure logic (no ComfyUI import), `comfy` is the thin node glue."""
