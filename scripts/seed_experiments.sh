#!/usr/bin/env bash
# Re-run the reference report's experiments (frozen vs full, 512 avgpool vs 256 vs maxavg head,
# RGB vs RGBY, BCE vs weighted BCE vs focal, F1 at 0.5 vs tuned, per-label F1 vs frequency) and
# assemble one comparison (comparison.md / .json) plus a `fasthpa report` of every run.
#
#   scripts/seed_experiments.sh ROOT [--quick] [--out DIR] [--epochs N] [-- TRAINER FLAGS]
#
# ROOT is a Kaggle-layout dataset root. --quick runs a miniature on CPU in minutes: when ROOT has
# no train.csv a small synthetic dataset is written there first. Every option is documented in
# `python benchmarks/seed_experiments.py --help`.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ $# -lt 1 || "$1" == -* && "$1" != "-h" && "$1" != "--help" ]]; then
    echo "usage: scripts/seed_experiments.sh ROOT [--quick] [options]  (--help for all)" >&2
    exit 2
fi
# the repository's virtual environment when there is one, else the python on PATH
python="${PYTHON:-}"
if [[ -z "$python" ]]; then
    if [[ -x "$repo/.venv/bin/python" ]]; then python="$repo/.venv/bin/python"; else python=python3; fi
fi
export MPLBACKEND=Agg
exec "$python" "$repo/benchmarks/seed_experiments.py" "$@"
