"""scripts/setup's one-line errors: a wrong COMFYUI_PATH, an old ComfyUI, no python3.11, a full disk, no registry."""
import os
import subprocess
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parents[2]
LIB = PACK_ROOT / "scripts" / "lib.sh"


def run_bash(script, env_extra=None, path=None):
    env = dict(os.environ, ASTRIA_CACHE=str(Path(env_extra.pop("CACHE")) if env_extra and "CACHE" in env_extra
                                              else "/nonexistent-astria-cache"))
    env.pop("COMFYUI_PATH", None)
    env.pop("COMFYUI_PYTHON", None)
    env.update(env_extra or {})
    if path is not None:
        env["PATH"] = path
    return subprocess.run(["/bin/bash", "-c", f"source {LIB}; {script}"], capture_output=True, text=True, env=env)


def test_comfyui_path_that_is_not_a_tree(tmp_path):
    result = run_bash("resolve_host", {"COMFYUI_PATH": str(tmp_path)})
    assert result.returncode == 1
    assert result.stderr.strip() == f"error: COMFYUI_PATH={tmp_path} is not a ComfyUI tree (no main.py/folder_paths.py/comfy/ there)"


def test_comfyui_path_that_does_not_exist(tmp_path):
    result = run_bash("resolve_host", {"COMFYUI_PATH": str(tmp_path / "nope")})
    assert result.returncode == 1 and "does not exist" in result.stderr


def fake_tree(folder, version):
    (folder / "comfy").mkdir(parents=True)
    (folder / "main.py").write_text("")
    (folder / "folder_paths.py").write_text("")
    (folder / "comfyui_version.py").write_text(f'__version__ = "{version}"\n')
    return folder


def test_comfyui_older_than_0_3_75_is_refused(tmp_path):
    tree = fake_tree(tmp_path / "old", "0.3.60")
    result = run_bash("resolve_host", {"COMFYUI_PATH": str(tree)})
    assert result.returncode == 1
    assert "is ComfyUI 0.3.60; this pack needs 0.3.75 or newer" in result.stderr


def test_a_newer_tree_is_accepted_with_its_venv_python(tmp_path):
    tree = fake_tree(tmp_path / "new", "0.4.2")
    (tree / "venv" / "bin").mkdir(parents=True)
    (tree / "venv" / "bin" / "python").write_text("#!/bin/sh\n")
    (tree / "venv" / "bin" / "python").chmod(0o755)
    result = run_bash('resolve_host; echo "$HOST_PY $OWN_HOST"', {"COMFYUI_PATH": str(tree)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{tree}/venv/bin/python 0"


def test_no_python311_says_what_to_install(tmp_path):
    result = run_bash("find_python311", {"PYTHON": ""}, path=str(tmp_path))
    assert result.returncode == 1
    assert "python3.11 not found" in result.stderr and "PYTHON=" in result.stderr


def test_a_full_disk_is_reported_before_building(tmp_path):
    result = run_bash(f"NEEDED_FREE_GB=100000000; check_disk {tmp_path}")
    assert result.returncode == 1
    assert "GB free at" in result.stderr and "ASTRIA_CACHE" in result.stderr


def test_an_unreachable_registry_is_one_clear_line(tmp_path):
    fake_python = tmp_path / "python"
    fake_python.write_text("#!/bin/sh\necho 'ERROR: Could not find a version (Connection refused)' >&2\nexit 1\n")
    fake_python.chmod(0o755)
    result = run_bash(f"pip_or_die {fake_python} 'torch' install torch")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "package registry is unreachable" in lines[0]
