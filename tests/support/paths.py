"""Where the host ComfyUI and the generated test models are: set by scripts/test, with the cache defaults."""
import hashlib
import importlib.util
import os
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("ASTRIA_CACHE", Path.home() / ".cache" / "comfyui-astria"))
COMFY_DIR = Path(os.environ.get("COMFYUI_PATH", CACHE / "host-0.3.75" / "ComfyUI"))
MODELS_DIR = Path(os.environ.get("ASTRIA_TEST_MODELS", CACHE / "models-v1"))
PACK_FOLDER_NAME = "ComfyUI-Astria"
HOST_ON_CPU = os.environ.get("ASTRIA_TEST_DEVICE", "cpu") != "gpu"
"""ComfyUI runs with --cpu in tests unless ASTRIA_TEST_DEVICE=gpu (the CUDA check: bench/cuda_checks.sh)."""


LINK_FOLDERS = CACHE / "run" / "tests-custom-nodes"


def pack_link_folder() -> Path:
    """A custom_nodes folder holding only a `ComfyUI-Astria` link to this clone (made if missing), named by the
    clone's path so every test process of a clone shares it; stale link folders are removed first."""
    folder = LINK_FOLDERS / hashlib.sha1(str(PACK_ROOT).encode()).hexdigest()[:16]
    remove_stale_link_folders(keep=folder)
    folder.mkdir(parents=True, exist_ok=True)
    link = folder / PACK_FOLDER_NAME
    if not link.is_symlink() or link.resolve() != PACK_ROOT:
        if link.is_symlink():
            link.unlink()
        link.symlink_to(PACK_ROOT, target_is_directory=True)
    return folder


def remove_stale_link_folders(keep: Path) -> list[Path]:
    """Remove the link folders that link to a clone that is gone, or to this clone under another name (the old
    per-process names); other clones' folders stay, their tests may be running. Returns what was removed."""
    removed = []
    for folder in sorted(LINK_FOLDERS.iterdir()) if LINK_FOLDERS.is_dir() else []:
        link = folder / PACK_FOLDER_NAME
        if folder == keep or not link.is_symlink():
            continue
        target = Path(os.readlink(link))
        if target.exists() and target.resolve() != PACK_ROOT:
            continue
        try:
            link.unlink()  # the link only, never what it points at
            folder.rmdir()
        except OSError:  # another process got there first, or someone put a file there: leave it
            continue
        removed.append(folder)
    return removed


def pack_module(relative: str):
    """A pure module of the pack loaded from its file, for benches and tools (the repo root never goes on
    sys.path: ComfyUI has its own `nodes`)."""
    spec = importlib.util.spec_from_file_location(f"astria_{Path(relative).stem}", PACK_ROOT / relative)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def models_yaml(path: Path, custom_nodes: Path | None = None) -> Path:
    """Write an extra_model_paths yaml that adds the test model folders (and a custom_nodes folder)."""
    lines = ["astria_test_models:", f"    base_path: {MODELS_DIR}"]
    lines += [f"    {kind}: {kind}" for kind in
              ("checkpoints", "loras", "embeddings", "vae", "upscale_models", "controlnet")]
    if custom_nodes is not None:
        lines += ["astria_test_pack:", f"    custom_nodes: {custom_nodes}"]
    path.write_text("\n".join(lines) + "\n")
    return path
