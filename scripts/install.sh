#!/usr/bin/env bash
# Shared, idempotent install used by scripts/demo.sh and scripts/test.sh:
# creates .venv if missing, installs the torch/torchvision pair, the project (editable) with its
# test tools, and NVIDIA DALI where it can be installed (Linux x86_64). Re-running is cheap: a
# stamp of the inputs skips pip when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_VERSION="${FASTHPA_TORCH_VERSION:-2.14.1}"
TORCHVISION_VERSION="${FASTHPA_TORCHVISION_VERSION:-0.29.1}"
PYTHON="${PYTHON:-python3}"
VENV=".venv"

if ! "$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' 2>/dev/null; then
    echo "error: fasthpa needs Python 3.10 or newer; '$PYTHON' is $("$PYTHON" --version 2>&1)." >&2
    exit 2
fi

if [ ! -x "$VENV/bin/python" ]; then
    echo "[install] creating $VENV with $("$PYTHON" --version)"
    "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"

extras="test,tensorboard"
if [ "$(uname -s)" = "Linux" ] && [ "$(uname -m)" = "x86_64" ] && [ "${FASTHPA_NO_DALI:-0}" != "1" ]; then
    extras="test,tensorboard,dali"
fi

stamp="$VENV/.fasthpa-install-stamp"
want="$(cat pyproject.toml scripts/install.sh | sha256sum | cut -d' ' -f1) torch=$TORCH_VERSION tv=$TORCHVISION_VERSION extras=$extras"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$PY" -c 'import fasthpa, torch, torchvision' 2>/dev/null; then
    echo "[install] up to date ($VENV)"
    exit 0
fi

echo "[install] torch==$TORCH_VERSION torchvision==$TORCHVISION_VERSION, fasthpa[$extras] into $VENV"
"$PY" -m pip install --quiet --upgrade pip
"$PY" -m pip install --quiet "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"
if ! "$PY" -m pip install --quiet -e ".[$extras]"; then
    if [ "$extras" != "test,tensorboard" ]; then
        echo "[install] NVIDIA DALI could not be installed; continuing without it (the PyTorch loader is used)."
        extras="test,tensorboard"
        "$PY" -m pip install --quiet -e ".[test,tensorboard]"
    else
        exit 1
    fi
fi
"$PY" -c 'import fasthpa, fasthpa.kernels' >/dev/null
echo "$want" > "$stamp"
echo "[install] done"
