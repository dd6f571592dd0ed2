#!/usr/bin/env bash
# Fetch the two llama.cpp clients that tests/test_gguf.py checks our GGUF exports against:
#   1. llama.cpp's own converter (convert_hf_to_gguf.py, its conversion/ package and gguf-py),
#      from the llama-cpp-python source distribution on PyPI (vendor/llama.cpp/): ~77 MB download;
#   2. llama.cpp itself, as the npm package node-llama-cpp with its prebuilt CPU binaries
#      (no build, no install scripts run): ~83 MB in node_modules on Linux x64. Needs node >= 20.
# Both are pinned, so the comparison does not move under the tests. Nothing here is imported by
# rwkvtune; the tests only run these clients. Usage:
#   tests/clients/fetch_llamacpp.sh [DEST]     (default: $RWKVTUNE_CLIENTS or ~/.cache/rwkvtune-clients)
# then run the tests with RWKVTUNE_CLIENTS=DEST if DEST is not the default.
set -euo pipefail
LLAMA_CPP_PYTHON=0.3.36
NODE_LLAMA_CPP=3.21.1
DEST="${1:-${RWKVTUNE_CLIENTS:-${XDG_CACHE_HOME:-$HOME/.cache}/rwkvtune-clients}}"
PYTHON="${PYTHON:-python}"
mkdir -p "$DEST"
DEST="$(cd "$DEST" && pwd)"

if [ ! -f "$DEST/llama.cpp/convert_hf_to_gguf.py" ]; then
  work="$(mktemp -d "$DEST/.fetch.XXXXXX")"
  trap 'rm -rf "$work"' EXIT
  "$PYTHON" -m pip download "llama-cpp-python==$LLAMA_CPP_PYTHON" --no-deps --no-binary :all: -d "$work"
  top="llama_cpp_python-$LLAMA_CPP_PYTHON/vendor/llama.cpp"
  tar -xzf "$work/llama_cpp_python-$LLAMA_CPP_PYTHON.tar.gz" -C "$work" \
      "$top/convert_hf_to_gguf.py" "$top/conversion" "$top/gguf-py" "$top/models/templates" "$top/LICENSE"
  rm -rf "$DEST/llama.cpp"
  mv "$work/$top" "$DEST/llama.cpp"
  echo "llama.cpp converter: $DEST/llama.cpp/convert_hf_to_gguf.py"
fi

if ! command -v npm >/dev/null; then
  echo "npm not found: skipping node-llama-cpp (the llama.cpp run test will be skipped)" >&2
  exit 0
fi
if [ ! -f "$DEST/node/node_modules/node-llama-cpp/package.json" ]; then
  mkdir -p "$DEST/node"
  cd "$DEST/node"
  [ -f package.json ] || echo '{"private": true}' > package.json
  case "$(uname -s)-$(uname -m)" in
    # Only the plain CPU binaries: the default install also pulls the CUDA and Vulkan builds (~730 MB).
    Linux-x86_64) npm install --no-audit --no-fund --omit=optional "node-llama-cpp@$NODE_LLAMA_CPP" \
                      "@node-llama-cpp/linux-x64@$NODE_LLAMA_CPP" ;;
    *) npm install --no-audit --no-fund "node-llama-cpp@$NODE_LLAMA_CPP" ;;
  esac
  echo "node-llama-cpp: $DEST/node/node_modules/node-llama-cpp"
fi
