#!/usr/bin/env bash
# The public headers are the API: each must compile on its own with only the SDK's include
# directories, and none may include a third-party header (protobuf, libwebsockets, SQLite,
# OpenSSL), so applications never see our dependencies.
#   check_headers.sh <source-dir> <binary-dir> <c++ compiler>
set -euo pipefail
src="$1"
bin="$2"
cxx="$3"
status=0
for h in "$src"/include/chat/*.h; do
  name="chat/$(basename "$h")"
  if grep -nE '^\s*#\s*include\s*[<"](google/|libwebsockets|lws[-_]|sqlite3|openssl/|CLI/|doctest)' "$h"; then
    echo "FAIL: $name includes a third-party header"
    status=1
  fi
  if ! echo "#include \"$name\"" | "$cxx" -std=c++20 -fsyntax-only -Wall -Wextra -Werror \
      -I "$src/include" -I "$bin/include" -x c++ - ; then
    echo "FAIL: $name does not compile on its own"
    status=1
  fi
done
[ $status -eq 0 ] && echo "all public headers are self-contained and free of third-party includes"
exit $status
