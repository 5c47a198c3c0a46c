# Browser-tier setup for scripts/test (sourced after lib.sh, never run): Debian's Chromium, Python Playwright and the
# newest ComfyUI frontend (the browser tier runs against the host's own frontend and this one):
#   $ASTRIA_CACHE/browser-<pytag>/     playwright (pip --target), added to TEST_PYTHONPATH; never the host's packages
#   $ASTRIA_CACHE/frontend-<version>/  comfyui-frontend-package (pip --target), served with --front-end-root
# Playwright drives the system Chromium (no browser download); the browser tests skip only when no Chromium exists,
# except in CI (CI=true), where a missing Chromium is a failure.

BROWSER_DEPS="playwright==1.65.2"
NEWEST_FRONTEND_VERSION="1.58.1"

# Install Chromium (apt, as root only) and Playwright for the host python; export ASTRIA_CHROMIUM and TEST_PYTHONPATH.
ensure_browser_deps() {
    local chromium
    chromium=${ASTRIA_CHROMIUM:-$(command -v chromium || command -v chromium-browser || true)}
    if [[ -z "$chromium" ]]; then
        if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null 2>&1; then
            say "installing Debian's chromium for the browser tests (first run only)"
            local log
            log=$(mktemp)
            if DEBIAN_FRONTEND=noninteractive apt-get update -qq >"$log" 2>&1 &&
                DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium fonts-dejavu-core >>"$log" 2>&1; then
                chromium=$(command -v chromium || true)
            else
                say "could not install chromium (last line: $(tail -n 1 "$log")); the browser tests will be skipped"
            fi
            rm -f "$log"
        else
            say "no Chromium: the browser tests will be skipped (install it: apt-get install chromium, or set ASTRIA_CHROMIUM)"
        fi
    fi
    if [[ -z "$chromium" && "${CI:-}" == "true" ]]; then
        die "no Chromium in CI: the browser tier must run there (apt-get install chromium, or set ASTRIA_CHROMIUM)"
    fi
    if [[ -n "$chromium" ]]; then export ASTRIA_CHROMIUM="$chromium"; fi
    local tag target
    tag=$("$HOST_PY" -c 'import sys; print(f"py{sys.version_info[0]}{sys.version_info[1]}")')
    target="$ASTRIA_CACHE/browser-$tag"
    if [[ ! -f "$target/.built" || "$(cat "$target/.built")" != "$BROWSER_DEPS" ]]; then
        rm -rf "$target"
        # shellcheck disable=SC2086
        pip_or_die "$HOST_PY" "the browser test tools ($BROWSER_DEPS)" install --target "$target" $BROWSER_DEPS
        echo "$BROWSER_DEPS" >"$target/.built"
    fi
    TEST_PYTHONPATH="${TEST_PYTHONPATH:+$TEST_PYTHONPATH:}$target"
    export TEST_PYTHONPATH
    ensure_newest_frontend
}

# The newest ComfyUI frontend as static files for --front-end-root (the host venv keeps its own pinned one).
ensure_newest_frontend() {
    local target="$ASTRIA_CACHE/frontend-$NEWEST_FRONTEND_VERSION"
    local spec="comfyui-frontend-package==$NEWEST_FRONTEND_VERSION"
    if [[ ! -f "$target/.built" || "$(cat "$target/.built")" != "$spec" ]]; then
        rm -rf "$target"
        pip_or_die "$HOST_PY" "the newest ComfyUI frontend ($spec)" install --no-deps --target "$target" "$spec"
        echo "$spec" >"$target/.built"
    fi
    export ASTRIA_NEWEST_FRONTEND_ROOT="$target/comfyui_frontend_package/static"
    export ASTRIA_NEWEST_FRONTEND_VERSION="$NEWEST_FRONTEND_VERSION"
}
