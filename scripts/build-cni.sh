#!/usr/bin/env bash
# Builds the CNI forwarder build/weave-net: a static binary that runs on nodes without Python or a libc
# of their own (kind, minikube). Needs gcc and libc6-dev (scripts/setup.sh installs them).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p build
out=build/weave-net
if [ ! -x "$out" ] || [ cni/weave-net.c -nt "$out" ]; then
  gcc -static -Os -std=c11 -Wall -Wextra -Werror -D_FORTIFY_SOURCE=2 -o "$out.tmp" cni/weave-net.c
  strip "$out.tmp" 2>/dev/null || true
  mv "$out.tmp" "$out"
fi
echo "$PWD/$out"
