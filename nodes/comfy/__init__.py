"""Thin V3 node glue: the only place that imports ComfyUI (comfy.*, folder_paths, server)."""
