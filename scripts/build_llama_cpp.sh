#!/usr/bin/env bash
# Build llama-cpp-python from its pinned sdist into a wheel that is portable AND fast: llama.cpp's CPU code is
# compiled once per instruction-set level (x86-64: from plain SSE2 up to AVX-512 VNNI/BF16 and AMX; arm64 Linux: from
# armv8.0 up to SVE2/SME), each a small library of its own, and at run time picks the best the CPU has
# (GGML_BACKEND_DL + GGML_CPU_ALL_VARIANTS; shared/llama_backend.py loads them). One wheel then runs on any x86-64
# machine and is as fast as a -march=native build on each: a build for AVX2 alone left a third of an AVX-512 CPU's
# speed unused (docs/results/llama_cpu_variants).
#
#   scripts/build_llama_cpp.sh VERSION SHA256 OUT_DIR PIP [extra CMake args...]
#
# llama-cpp-python's own CMakeLists installs only the libraries it names (ggml-cpu, not its variants), so the sdist
# is unpacked and one block appended that installs the variants beside the others; nothing else is changed.
set -euo pipefail
VERSION=$1 SHA256=$2 OUT=$3 PIP=$4
shift 4
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

"$PIP" download --disable-pip-version-check -q --no-deps --no-binary :all: -d "$WORK" "llama-cpp-python==$VERSION"
SDIST="$WORK/llama_cpp_python-$VERSION.tar.gz"
echo "$SHA256  $SDIST" | sha256sum -c --quiet - || { echo "llama-cpp-python $VERSION: sdist sha256 mismatch" >&2; exit 1; }
tar -xzf "$SDIST" -C "$WORK"
SRC="$WORK/llama_cpp_python-$VERSION"
grep -q 'llama_cpp_python_install_target(ggml-cpu)' "$SRC/CMakeLists.txt" \
    || { echo "llama-cpp-python $VERSION: its CMakeLists no longer installs ggml-cpu; update $0" >&2; exit 1; }
cat >>"$SRC/CMakeLists.txt" <<'EOF'

# picospec (scripts/build_llama_cpp.sh): install ggml's CPU variants (GGML_CPU_ALL_VARIANTS) beside ggml-cpu
if(LLAMA_BUILD AND GGML_BACKEND_DL)
    get_property(_picospec_targets DIRECTORY vendor/llama.cpp/ggml/src PROPERTY BUILDSYSTEM_TARGETS)
    foreach(_t IN LISTS _picospec_targets)
        if(_t MATCHES "^ggml-cpu-")
            llama_cpp_python_install_target(${_t})
        endif()
    endforeach()
endif()
EOF

CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_BACKEND_DL=ON -DGGML_CPU_ALL_VARIANTS=ON -DLLAMA_BUILD_TESTS=OFF \
-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF $*" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
    "$PIP" wheel --disable-pip-version-check -q --no-deps -w "$WORK/out" "$SRC"
WHEEL=$(ls "$WORK"/out/llama_cpp_python-"$VERSION"-*.whl)
VARIANTS=$("$(dirname "$PIP")/python" -c 'import re, sys, zipfile
print(sum(bool(re.search(r"lib/libggml-cpu-[^/]*\.so$", n)) for n in zipfile.ZipFile(sys.argv[1]).namelist()))' "$WHEEL")
[ "$VARIANTS" -gt 0 ] || { echo "llama-cpp-python $VERSION: the wheel holds no CPU variant library" >&2; exit 1; }
mkdir -p "$OUT"
mv "$WHEEL" "$OUT/"
echo "llama-cpp-python $VERSION: $(basename "$WHEEL") with $VARIANTS CPU variants in $OUT"
