#!/bin/sh
# Usage: run.sh <chat build dir> <consumer source dir> <cmake> <c++ compiler> <ON|OFF sanitize>
#               [build type]
# Installs the chat build into a temporary prefix, builds the consumer against it with
# find_package(chat CONFIG REQUIRED), and runs it. Exits non-zero on any failure.
set -eu

build_dir=$1
consumer_dir=$2
cmake=$3
cxx=$4
sanitize=$5
build_type=${6:-Debug}
[ -n "$build_type" ] || build_type=Debug

tmp=$(mktemp -d "${TMPDIR:-/tmp}/chat-package-XXXXXX")
trap 'rm -rf "$tmp"' EXIT INT TERM

"$cmake" --install "$build_dir" --prefix "$tmp/prefix"

flags=""
if [ "$sanitize" = "ON" ]; then
  flags="-fsanitize=address,undefined -fno-omit-frame-pointer"
fi

"$cmake" -S "$consumer_dir" -B "$tmp/build" \
  -DCMAKE_PREFIX_PATH="$tmp/prefix" \
  -DCMAKE_CXX_COMPILER="$cxx" \
  -DCMAKE_BUILD_TYPE="$build_type" \
  -DCMAKE_CXX_FLAGS="$flags" \
  -DCMAKE_EXE_LINKER_FLAGS="$flags"
"$cmake" --build "$tmp/build" -j2
"$tmp/build/consumer"

# The same consumer through pkg-config (static libraries, so --static pulls in the private
# dependencies), with the prefix pointed at the temporary install.
if command -v pkg-config >/dev/null 2>&1; then
  pc_flags=$(PKG_CONFIG_PATH="$tmp/prefix/lib/pkgconfig" \
    pkg-config --define-variable=prefix="$tmp/prefix" --static --cflags --libs chat)
  # shellcheck disable=SC2086
  "$cxx" -std=c++20 $flags "$consumer_dir/main.cc" $pc_flags -o "$tmp/consumer-pc"
  "$tmp/consumer-pc"
else
  echo "run.sh: pkg-config not found" >&2
  exit 1
fi
