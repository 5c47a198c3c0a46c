"""Where the host ComfyUI and the generated test models are: set by scripts/test, with the cache defaults."""
import os
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("ASTRIA_CACHE", Path.home() / ".cache" / "comfyui-astria"))
COMFY_DIR = Path(os.environ.get("COMFYUI_PATH", CACHE / "host-0.3.75" / "ComfyUI"))
MODELS_DIR = Path(os.environ.get("ASTRIA_TEST_MODELS", CACHE / "models-v1"))
PACK_FOLDER_NAME = "ComfyUI-Astria"
HOST_ON_CPU = os.environ.get("ASTRIA_TEST_DEVICE", "cpu") != "gpu"
"""ComfyUI runs with --cpu in tests unless ASTRIA_TEST_DEVICE=gpu (the CUDA check: bench/cuda_checks.sh)."""


def pack_link_folder() -> Path:
    """A custom_nodes folder holding only a `ComfyUI-Astria` link to this clone (made if missing)."""
    folder = CACHE / "run" / "tests-custom-nodes" / str(abs(hash(str(PACK_ROOT))) % 10**8)
    folder.mkdir(parents=True, exist_ok=True)
    link = folder / PACK_FOLDER_NAME
    if not link.is_symlink() or link.resolve() != PACK_ROOT:
        if link.is_symlink():
            link.unlink()
        link.symlink_to(PACK_ROOT, target_is_directory=True)
    return folder


def models_yaml(path: Path, custom_nodes: Path | None = None) -> Path:
    """Write an extra_model_paths yaml that adds the test model folders (and a custom_nodes folder)."""
    lines = ["astria_test_models:", f"    base_path: {MODELS_DIR}"]
    lines += [f"    {kind}: {kind}" for kind in
              ("checkpoints", "loras", "embeddings", "vae", "upscale_models", "controlnet")]
    if custom_nodes is not None:
        lines += ["astria_test_pack:", f"    custom_nodes: {custom_nodes}"]
    path.write_text("\n".join(lines) + "\n")
    return path
