# Browser-tier setup for scripts/test (sourced after lib.sh, never run): Debian's Chromium and Python Playwright.
#   $ASTRIA_CACHE/browser-<pytag>/   playwright (pip --target), added to TEST_PYTHONPATH; never the host's packages
# Playwright drives the system Chromium (no browser download); the browser tests skip only when no Chromium exists.

BROWSER_DEPS="playwright==1.65.2"

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
}
