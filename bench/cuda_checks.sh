#!/usr/bin/env bash
# The CUDA checks and GPU figures, in one run on a machine with an NVIDIA GPU:
#   1. the host test tier on the GPU (ASTRIA_TEST_DEVICE=gpu), tests/host/test_cuda.py first (a real GPU
#      out-of-memory error retried with half the tile),
#   2. bench/vae_tiling.py at 512, 1024 and 2048 px (untiled, the host's tiled VAE, ours, and TiledDiffusion's
#      Tiled VAE when TD_FOLDER names its folder),
#   3. bench/only_upscale.py --gpu (ours vs the same job from built-in nodes).
# Usage: COMFYUI_PATH=/path/to/ComfyUI [COMFYUI_PYTHON=python3] [TD_FOLDER=...] bash bench/cuda_checks.sh OUT_DIR
# The python needs torch with CUDA and ComfyUI's requirements. Test models are generated into
# $ASTRIA_TEST_MODELS (default /tmp/astria-cache/models-v1) when missing. Each part has its own time limit
# (seconds: MODELS_S, CUDA_TESTS_S, VAE_S, HOST_S, UPSCALE_S) so one slow part cannot starve the rest; the
# output of each part is written to OUT_DIR as well as printed. VAE_ARGS and UPSCALE_ARGS replace the benches'
# size arguments; ASTRIA_TEST_DEVICE=cpu with small sizes makes a dry run on a machine without a GPU.
set -uo pipefail
out=${1:?usage: bench/cuda_checks.sh OUT_DIR}
mkdir -p "$out"
cd "$(dirname "$0")/.." || exit 2
py=${COMFYUI_PYTHON:-python3}
: "${COMFYUI_PATH:?set COMFYUI_PATH to a ComfyUI tree}"
export COMFYUI_PATH PYTHONUNBUFFERED=1
export ASTRIA_CACHE=${ASTRIA_CACHE:-/tmp/astria-cache}
export ASTRIA_TEST_MODELS=${ASTRIA_TEST_MODELS:-$ASTRIA_CACHE/models-v1}
failed=()

part() {  # part NAME SECONDS COMMAND...: run with a time limit, tee to OUT_DIR/NAME.txt, note a failure
    local name=$1 seconds=$2 rc=0
    shift 2
    echo "== $name (limit ${seconds}s, $(date +%T))"
    timeout "$seconds" "$@" 2>&1 | tee "$out/$name.txt" || rc=$?
    [[ $rc -eq 0 ]] || { echo "== $name: exit $rc"; failed+=("$name"); }
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$py" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__,
      torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO CUDA')"

make_models() {  # the same three generators as scripts/lib.sh, one after another (they share output files)
    local partial=$ASTRIA_TEST_MODELS.partial
    rm -rf "$partial" && mkdir -p "$partial" || return 1
    "$py" tools/make_tiny_sd15.py "$partial" --comfy "$COMFYUI_PATH" >"$partial/sd15.log" 2>&1 &&
        "$py" tools/make_tiny_sd15.py "$partial" --comfy "$COMFYUI_PATH" --vae pixel --vae-file \
            >"$partial/pixel.log" 2>&1 &&
        "$py" tools/make_tiny_extras.py "$partial" --comfy "$COMFYUI_PATH" >"$partial/extras.log" 2>&1 ||
        { tail -n 5 "$partial"/*.log; return 1; }
    rm -rf "$ASTRIA_TEST_MODELS" && mv "$partial" "$ASTRIA_TEST_MODELS" && touch "$ASTRIA_TEST_MODELS/.built"
}
if [[ ! -f $ASTRIA_TEST_MODELS/.built ]]; then
    export py
    part models "${MODELS_S:-150}" bash -c "$(declare -f make_models); make_models"
fi

export ASTRIA_TEST_DEVICE=${ASTRIA_TEST_DEVICE:-gpu}  # cpu: a dry run of this script on a machine without a GPU
part cuda_tests "${CUDA_TESTS_S:-120}" "$py" -m pytest -p no:cacheprovider -v --tb=short -m host tests/host/test_cuda.py \
    tests/host/test_tiling_nodes.py tests/host/test_tiled_vae.py
part vae_tiling "${VAE_S:-240}" "$py" bench/vae_tiling.py ${VAE_ARGS:---sizes 512 1024 --full} \
    ${TD_FOLDER:+--td-folder "$TD_FOLDER"}
part host_tier "${HOST_S:-150}" "$py" -m pytest -p no:cacheprovider -v --tb=short -m host tests/host \
    --ignore tests/host/test_cuda.py --ignore tests/host/test_tiling_nodes.py --ignore tests/host/test_tiled_vae.py
part only_upscale "${UPSCALE_S:-150}" "$py" bench/only_upscale.py ${UPSCALE_ARGS:---gpu --sizes 512 1024} \
    --comfy-args "${COMFY_ARGS:-}"

echo "== done $(date +%T); failed parts: ${failed[*]:-none}"
[[ ${#failed[@]} -eq 0 ]]
