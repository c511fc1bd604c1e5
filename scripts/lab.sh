#!/usr/bin/env bash
# Quick start, command 1: install, then bring up a local multi-node weaved lab in network namespaces.
#   sudo scripts/lab.sh            # 5 nodes, lab name "lab"
#   sudo scripts/lab.sh --nodes 3  # any `weaved lab up` flags
# Tear down with: sudo .venv/bin/weaved lab down
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ $# -eq 0 ]; then
  set -- --nodes 5
fi
exec .venv/bin/weaved lab up "$@"
