#!/usr/bin/env bash
# Install (idempotent) and run the whole test suite on the CPU; GPU-only tests skip themselves.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/python -m pytest "$@"
