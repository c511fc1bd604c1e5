#!/usr/bin/env bash
# Quick start, command 2: install, then run the whole test suite, the linters and the type checker.
#   sudo scripts/test.sh            # everything (unit, simulated network, daemons, real namespaces)
#   sudo scripts/test.sh -k mesh    # extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."
WEAVED_EXTRAS=test bash scripts/setup.sh
.venv/bin/ruff check weaved tests bench
.venv/bin/mypy
exec .venv/bin/pytest "$@"
