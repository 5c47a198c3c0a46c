"""Shared test setup: load the pack under the alias `comfyui_astria` without putting the repo on sys.path.

ComfyUI has its own top-level module `nodes`, so the repo root must never be importable as a path entry.
"""
import importlib.util
import sys
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parent.parent
PACK_ALIAS = "comfyui_astria"


def _load_pack_alias():
    if PACK_ALIAS in sys.modules:
        return sys.modules[PACK_ALIAS]
    spec = importlib.util.spec_from_file_location(
        PACK_ALIAS, PACK_ROOT / "__init__.py", submodule_search_locations=[str(PACK_ROOT)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK_ALIAS] = module
    spec.loader.exec_module(module)
    return module


_load_pack_alias()
