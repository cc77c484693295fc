#!/bin/sh
# CMake flags for building llama-cpp-python here: this CPU's vector extensions, named one by one from
# /proc/cpuinfo instead of -march=native, with AMX always off. Some virtual machines advertise AMX tiles
# without enabling them, and a native build then dies with SIGILL on its first matrix product; listing the
# features also makes the build (and the cached wheel's key) the same on every machine with this CPU.
# Only the shared libraries the Python package loads are built: no tools, tests, server or multimodal library.
flags=$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null)
has() { case " $flags " in *" $1 "*) echo ON ;; *) echo OFF ;; esac; }
avx512=$(has avx512f)
[ "$(has avx512bw)" = OFF ] || [ "$(has avx512dq)" = OFF ] || [ "$(has avx512vl)" = OFF ] && avx512=OFF
printf '%s ' -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF \
  -DLLAMA_BUILD_SERVER=OFF -DGGML_NATIVE=OFF \
  -DGGML_SSE42=$(has sse4_2) -DGGML_AVX=$(has avx) -DGGML_AVX2=$(has avx2) -DGGML_FMA=$(has fma) \
  -DGGML_F16C=$(has f16c) -DGGML_BMI2=$(has bmi2) -DGGML_AVX_VNNI=$(has avx_vnni) \
  -DGGML_AVX512=$avx512
if [ "$avx512" = ON ]; then
  printf '%s ' -DGGML_AVX512_VBMI=$(has avx512vbmi) -DGGML_AVX512_VNNI=$(has avx512_vnni) \
    -DGGML_AVX512_BF16=$(has avx512_bf16)
fi
printf '%s ' -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF
echo
