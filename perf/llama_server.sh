#!/usr/bin/env bash
# Print the path of llama.cpp's own `llama-server`, the speed anchor of the serving benches,
# built once from the llama.cpp that the pinned llama-cpp-python sdist vendors (the same engine
# version axserving runs), with the README's CPU flags, and cached:
#   ${AXS_PERF_CACHE:-~/.cache/axserving/perf}/llama-server-<version>/llama-server
# The first run downloads the sdist from the package index and compiles (about 10 minutes on
# 2 cores); later runs print the cached path at once. Build output goes to stderr.
#
#   BIN=$(perf/llama_server.sh) && "$BIN" --model MODEL.gguf -t 2 -np 8 --port 18093
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
VERSION=$($PY -c "import importlib.metadata as m; print(m.version('llama_cpp_python'))")
CACHE=${AXS_PERF_CACHE:-$HOME/.cache/axserving/perf}/llama-server-$VERSION
BIN=$CACHE/llama-server
if [ -x "$BIN" ]; then
  echo "$BIN"
  exit 0
fi
WORK=$(mktemp -d /tmp/axs-llama-server-XXXXXX)
trap 'rm -rf "$WORK"' EXIT
echo "building llama-server $VERSION (once; about 10 minutes on 2 cores)" >&2
$PY -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$WORK" >&2
tar -xzf "$WORK/llama_cpp_python-$VERSION.tar.gz" -C "$WORK"
SRC="$WORK/llama_cpp_python-$VERSION/vendor/llama.cpp"
# The README's CMAKE_ARGS (any x86-64 CPU with AVX2), static, the server alone; no network.
cmake -S "$SRC" -B "$WORK/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
  -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
  -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
  -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON >&2
cmake --build "$WORK/build" --target llama-server -j "$(nproc)" >&2
mkdir -p "$CACHE"
cp "$WORK/build/bin/llama-server" "$BIN.partial"
mv "$BIN.partial" "$BIN"
echo "$BIN"
