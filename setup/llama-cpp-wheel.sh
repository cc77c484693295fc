#!/bin/sh
# Build llama-cpp-python from its source archive once per set of CMake flags and keep the wheel in the user
# cache, so later environments (and a fresh clone on the same machine) install it in seconds.
# usage: setup/llama-cpp-wheel.sh PIP VERSION  -> prints the wheel's path
set -eu
pip=$1
version=$2
args=$(sh "$(dirname "$0")/llama-cpp-cmake-args.sh")
key=$(printf '%s %s' "$version" "$args" | sha256sum | cut -c1-12)
dir="${XDG_CACHE_HOME:-$HOME/.cache}/layerwise/wheels/llama-cpp-python-$version-$key"
if ! ls "$dir"/llama_cpp_python-*.whl >/dev/null 2>&1; then
  mkdir -p "$dir"
  tmp=$(mktemp -d "$dir.partial.XXXXXX")
  echo "building llama-cpp-python $version from source (a few minutes; once per machine): $args" >&2
  CMAKE_ARGS="$args" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
    "$pip" wheel -q --no-deps --no-cache-dir --no-binary llama-cpp-python "llama-cpp-python==$version" -w "$tmp" >&2
  mv "$tmp"/llama_cpp_python-*.whl "$dir"/
  rmdir "$tmp"
fi
ls "$dir"/llama_cpp_python-*.whl
