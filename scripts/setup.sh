#!/usr/bin/env bash
# Installs what weaved and its tests need on a Debian/Ubuntu machine, into a venv at .venv.
# Idempotent: a second run only checks. Used by scripts/lab.sh, scripts/test.sh and .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
  echo "weaved setup: run as root (network namespaces need it): sudo $0" >&2
  exit 1
fi

# Debian packages: the kernel tools the lab and the tests drive.
need_apt=()
command -v python3 >/dev/null || need_apt+=(python3)
python3 -c 'import venv, ensurepip' 2>/dev/null || need_apt+=(python3-venv)
command -v ip >/dev/null || need_apt+=(iproute2)
command -v nft >/dev/null || need_apt+=(nftables)
command -v ping >/dev/null || need_apt+=(iputils-ping)
command -v setpriv >/dev/null || need_apt+=(util-linux)
command -v docker-compose >/dev/null || need_apt+=(docker-compose)  # validates docker-compose.yml offline
# The CNI forwarder is C, built static here (build/weave-net).
command -v gcc >/dev/null || need_apt+=(gcc)
# The sleeve's C hot loop is a CPython extension: the headers of the Python the venv is made from.
python3 -c 'import os, sysconfig; assert os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h"))' \
  2>/dev/null || need_apt+=(python3-dev)
# It seals the sleeve with OpenSSL's libcrypto (EVP): its headers.
[ -f /usr/include/openssl/evp.h ] || need_apt+=(libssl-dev)
# ... and, where the CPU has AES-NI and PCLMULQDQ, with libgcrypt (cheaper per chunk; EVP is the fallback).
[ -f /usr/include/gcrypt.h ] || need_apt+=(libgcrypt20-dev)
[ -f /usr/lib/x86_64-linux-gnu/libc.a ] || [ -f /usr/lib/aarch64-linux-gnu/libc.a ] || need_apt+=(libc6-dev)
# Real CNI clients and reference plugins for tests/cni (see docs/cni.md).
command -v containerd >/dev/null || need_apt+=(containerd)
command -v runc >/dev/null || need_apt+=(runc)
[ -x /usr/lib/cni/portmap ] || need_apt+=(containernetworking-plugins)
command -v podman >/dev/null || need_apt+=(podman)
[ -x /bin/busybox ] || need_apt+=(busybox-static)
command -v iptables >/dev/null || need_apt+=(iptables)
command -v curl >/dev/null || need_apt+=(curl)
command -v go >/dev/null || need_apt+=(golang-go)
[ -d /usr/share/gocode/src/github.com/containernetworking/cni/libcni ] || need_apt+=(golang-github-appc-cni-dev)
command -v iperf3 >/dev/null || need_apt+=(iperf3)  # weaved lab bench, tests/netns
command -v ethtool >/dev/null || need_apt+=(ethtool)  # weaved lab bench --loss, tests/netns (single-packet wire)
command -v sockperf >/dev/null || need_apt+=(sockperf)  # weaved lab bench (request/response rate)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "weaved setup: installing Debian packages: ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

python3 - <<'PY'
import sys
if sys.version_info < (3, 11):
    sys.exit(f"weaved needs Python 3.11 or newer, this is {sys.version.split()[0]}")
PY

# The venv keeps us clear of the system Python (PEP 668 on Debian 12).
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
extras="${WEAVED_EXTRAS:-}"
stamp=".venv/.weaved-installed${extras:+-$extras}"
# setup.py and the C hot loop too: the editable install compiles weaved/adapters/_sleevepump.c in place.
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ setup.py -nt "$stamp" ] \
   || [ weaved/adapters/_sleevepump.c -nt "$stamp" ] || ! ls weaved/adapters/_sleevepump*.so >/dev/null 2>&1; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".${extras:+[$extras]}"
  touch "$stamp"
fi

# The CNI plugin binary runtimes execute: a static C forwarder (no Python needed on the node).
scripts/build-cni.sh >/dev/null
