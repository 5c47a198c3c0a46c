"""nodes/core must never import ComfyUI: its logic runs and is tested without a host."""
import ast
import subprocess
import sys
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parents[2]
HOST_MODULES = {"comfy", "comfy_api", "comfy_extras", "comfy_execution", "folder_paths", "server", "nodes",
                "execution", "node_helpers", "latent_preview", "comfy_api_nodes", "app"}


def test_core_sources_import_nothing_from_the_host():
    offenders = []
    for path in sorted((PACK_ROOT / "nodes" / "core").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            offenders += [f"{path.name}:{node.lineno} imports {n}" for n in names if n.split(".")[0] in HOST_MODULES]
    assert offenders == []


def test_importing_every_core_module_loads_no_host_module():
    modules = [p.stem for p in (PACK_ROOT / "nodes" / "core").glob("*.py") if p.stem != "__init__"]
    assert modules, "nodes/core has no modules"
    script = f"""
import importlib.util, sys
spec = importlib.util.spec_from_file_location("pack", {str(PACK_ROOT / "__init__.py")!r},
                                              submodule_search_locations=[{str(PACK_ROOT)!r}])
pack = importlib.util.module_from_spec(spec); sys.modules["pack"] = pack; spec.loader.exec_module(pack)
failed = []
for name in {modules!r}:
    try:
        importlib.import_module("pack.nodes.core." + name)
    except ModuleNotFoundError as error:
        if error.name in ("torch", "aiohttp", "PIL", "numpy"):
            continue  # a system python without the host's libraries; the source scan above still checks it
        raise
host = sorted(m for m in sys.modules if m.split(".")[0] in {sorted(HOST_MODULES)!r})
print(host)
assert not host, host
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd="/")
    assert result.returncode == 0, result.stderr + result.stdout


def test_pack_import_runs_nothing_but_definitions():
    tree = ast.parse((PACK_ROOT / "__init__.py").read_text())
    kinds = {type(node).__name__ for node in tree.body}
    assert kinds <= {"Expr", "Assign", "AsyncFunctionDef", "FunctionDef"}, kinds
