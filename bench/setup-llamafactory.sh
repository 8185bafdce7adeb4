#!/usr/bin/env bash
# Create LlamaFactory 0.9.5's virtual environment for bench/throughput.py, outside the clone:
#   ${KUBETUNE_CACHE_DIR:-$HOME/.cache/kubetune}/llamafactory-0.9.5
# Idempotent: does nothing when the venv exists and `llamafactory-cli version` works.
# pip resolves torch/transformers within LlamaFactory's own pins (torch from PyPI runs on CPU);
# pip's cache is used. Prints the venv's path on its last line.
set -euo pipefail

VERSION="${LLAMAFACTORY_VERSION:-0.9.5}"
CACHE="${KUBETUNE_CACHE_DIR:-$HOME/.cache/kubetune}"
VENV="$CACHE/llamafactory-$VERSION"
PYTHON="${PYTHON:-python3}"

if [ -x "$VENV/bin/llamafactory-cli" ] && "$VENV/bin/llamafactory-cli" version >/dev/null 2>&1; then
    echo "LlamaFactory $VERSION already set up" >&2
    echo "$VENV"
    exit 0
fi

mkdir -p "$CACHE"
rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install --upgrade pip >&2
# The torch of kubetune's own venv (2.13.0 from PyPI runs on CPU), so both use the same kernels;
# bitsandbytes for QLoRA; the rest is LlamaFactory's own requirements, within its pins.
TORCH="${LLAMAFACTORY_TORCH:-2.13.0}"
"$VENV/bin/pip" install "llamafactory==$VERSION" "torch==$TORCH" bitsandbytes >&2
"$VENV/bin/llamafactory-cli" version >&2
echo "$VENV"
