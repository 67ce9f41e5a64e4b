#!/usr/bin/env bash
# Builds llama.cpp's own HTTP server (`llama-server`) and `llama-bench` from the llama.cpp tree vendored in
# the llama-cpp-python==0.3.36 source distribution, i.e. the same llama.cpp revision the project's GGUF
# comparisons use, and installs the two binaries into
#     ${LLAMA_SERVER_PREFIX:-$HOME/.cache/lamina/llama.cpp-0.3.36}/bin
# llama-server is a benchmark peer for benchmarks/server_bench.py (Lamina vs llama-server, both over HTTP
# streaming), NOT a dependency of the project: nothing in server/ or models/ needs it.
#
# Idempotent: exits at once when the binary is already installed. Needs cmake, a C/C++ compiler and pip; no
# network beyond pip (curl/OpenSSL, the prebuilt web-UI download and npm are all switched off). The build is
# static (-DBUILD_SHARED_LIBS=OFF), so the installed binaries need no libllama/libggml next to them.
# About 6 minutes on 2 cores (AMD EPYC, -j2).
#
#     bash scripts/build-llama-server.sh                      # default prefix
#     LLAMA_SERVER_PREFIX=/opt/llama bash scripts/build-llama-server.sh
#     JOBS=8 PYTHON=.venv/bin/python bash scripts/build-llama-server.sh
set -euo pipefail

VERSION=0.3.36
PREFIX="${LLAMA_SERVER_PREFIX:-$HOME/.cache/lamina/llama.cpp-$VERSION}"
PY="${PYTHON:-python3}"
JOBS="${JOBS:-2}"

if [ -x "$PREFIX/bin/llama-server" ]; then
  echo "$PREFIX/bin/llama-server"
  exit 0
fi

for tool in cmake c++ cc; do
  command -v "$tool" >/dev/null || { echo "error: $tool not found (apt-get install -y cmake g++)" >&2; exit 1; }
done

TMP="$(mktemp -d "${TMPDIR:-/tmp}/llama-server-build.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT

echo "downloading llama-cpp-python==$VERSION sdist into $TMP" >&2
"$PY" -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$TMP"
sdist="$(ls "$TMP"/llama_cpp_python-"$VERSION".tar.gz)"
tar -xzf "$sdist" -C "$TMP"
SRC="$TMP/llama_cpp_python-$VERSION/vendor/llama.cpp"
[ -f "$SRC/CMakeLists.txt" ] || { echo "error: no vendor/llama.cpp in $sdist" >&2; exit 1; }

# Options checked against this tree's CMakeLists: LLAMA_CURL is only a deprecated no-op here (kept for older
# trees); LLAMA_OPENSSL / LLAMA_BUILD_{BORINGSSL,LIBRESSL} would look for or fetch TLS; LLAMA_USE_PREBUILT_UI
# downloads the web UI at build time and LLAMA_BUILD_UI runs npm; GGML_OPENMP_FETCH fetches LLVM OpenMP.
echo "configuring $SRC" >&2
cmake -S "$SRC" -B "$TMP/build" \
  -DCMAKE_BUILD_TYPE=Release \
  -DBUILD_SHARED_LIBS=OFF \
  -DGGML_NATIVE=ON \
  -DGGML_OPENMP_FETCH=OFF \
  -DLLAMA_CURL=OFF \
  -DLLAMA_OPENSSL=OFF \
  -DLLAMA_BUILD_BORINGSSL=OFF \
  -DLLAMA_BUILD_LIBRESSL=OFF \
  -DLLAMA_BUILD_UI=OFF \
  -DLLAMA_USE_PREBUILT_UI=OFF \
  -DLLAMA_BUILD_TESTS=OFF \
  -DLLAMA_BUILD_EXAMPLES=OFF \
  -DLLAMA_BUILD_APP=OFF \
  -DLLAMA_BUILD_TOOLS=ON \
  -DLLAMA_BUILD_SERVER=ON >&2

echo "building llama-server and llama-bench with -j$JOBS" >&2
cmake --build "$TMP/build" --config Release --target llama-server llama-bench -j "$JOBS" >&2

mkdir -p "$PREFIX/bin"
# A static build leaves no shared libs; if one still got built, install it next to the binaries.
shopt -s nullglob
libs=("$TMP"/build/bin/*.so*)
if [ "${#libs[@]}" -gt 0 ]; then
  cp -a "${libs[@]}" "$PREFIX/bin/"
fi
# The LLaMA SentencePiece vocabulary that benchmarks/llama7b_bench.py puts into its GGUF files.
mkdir -p "$PREFIX/models"
cp -f "$SRC/models/ggml-vocab-llama-spm.gguf" "$PREFIX/models/"
# llama-server goes last: its presence is what marks the install as done.
for exe in llama-bench llama-server; do
  install -m 0755 "$TMP/build/bin/$exe" "$PREFIX/bin/$exe.tmp"
  mv -f "$PREFIX/bin/$exe.tmp" "$PREFIX/bin/$exe"
done
"$PREFIX/bin/llama-server" --version >&2 || true
echo "$PREFIX/bin/llama-server"
